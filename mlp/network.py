"""The network: an ordered container of layers, a loss, and L2 regularization."""
from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from collections.abc import Mapping

import numpy as np

import mlp.conv  # noqa: F401  registers the conv layer types, so load() can rebuild them
from mlp.kernels import fused_layers
from mlp.layers import ACTIVATIONS, Dropout, Layer, Linear, layer_from_spec
from mlp.losses import LOSSES
from mlp.parallel import single_blas_thread

FORMAT = "nnx-model"
FORMAT_VERSION = 1
_META_KEY = "__nnx__"


class ModelFileError(ValueError):
    """A file that is not a readable nnx model."""


class NamedArrays(Mapping):
    """A read-only view of a network's arrays by name (``Network.params``, ``grads``,
    ``buffers``). Each access builds it afresh from the layers, so assigning an entry
    could never reach the network: it raises, pointing at the in-place form."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self._arrays = arrays

    def __getitem__(self, name: str) -> np.ndarray:
        return self._arrays[name]

    def __iter__(self):
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    def __setitem__(self, name, value):
        raise TypeError(f"cannot replace {name!r}: the view is rebuilt from the layers at every "
                        f"access; write into the array instead: net.params[{name!r}][...] = value")

    def __repr__(self):
        return f"NamedArrays({list(self._arrays)})"


class Network:
    """A sequence of layers ending in class scores, trained with ``loss``.

    L2 regularization follows the cs231n convention: ``0.5 * reg * sum(W**2)``
    over every weight matrix (never biases), so its gradient is ``reg * W``.
    Parameters are named ``"{index}.{kind}.{name}"``, e.g. ``"0.linear.W"``.
    """

    def __init__(self, layers: list[Layer], loss: str = "softmax", reg: float = 0.0,
                 label_smoothing: float = 0.0, input_shape: tuple[int, ...] | None = None,
                 dtype=np.float64, metadata: dict | None = None):
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)}")
        if reg < 0:
            raise ValueError(f"reg must be >= 0, got {reg}")
        self.layers = list(layers)
        self.loss_name, self.reg, self.label_smoothing = loss, float(reg), float(label_smoothing)
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.dtype = np.dtype(dtype)
        self.metadata = dict(metadata or {})
        self._steps: list[tuple[Layer, bool]] | None = None   # the last forward's, for backward

    # ---- forward / backward ---------------------------------------------------
    def forward(self, x: np.ndarray, train: bool = False) -> np.ndarray:
        """x: (N, *input_shape) -> scores: (N, C). In training, a layer and the next run
        as one fused step where the first ``fuses_with`` the second (mlp/kernels), and
        the one after too where it ``absorbs`` it."""
        fuse = train and fused_layers()
        steps, layers, i = [], self.layers, 0
        with single_blas_thread():  # the layers share the batch out among threads themselves
            while i < len(layers):
                layer = layers[i]
                fused = fuse and i + 1 < len(layers) and layer.fuses_with(layers[i + 1], x)
                if fused:
                    then = layers[i + 2] if i + 2 < len(layers) else None
                    then = then if then is not None and layer.absorbs(layers[i + 1], then) else None
                    x = layer.forward_fused(x, layers[i + 1], then)
                    i += 3 if then is not None else 2
                else:
                    x = layer.forward(x, train)
                    i += 1
                steps.append((layer, fused))
        self._steps = steps
        return x

    def backward(self, dscores: np.ndarray) -> np.ndarray:
        """dscores: (N, C) -> dx: (N, *input_shape); fills every layer's grads. Follows
        the steps of the last forward, fused or not."""
        if self._steps is None:
            raise RuntimeError("backward needs a forward first (its caches)")
        with single_blas_thread():
            for layer, fused in reversed(self._steps):
                dscores = layer.backward_fused(dscores) if fused else layer.backward(dscores)
        return dscores

    def data_loss(self, scores: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        if self.loss_name == "softmax":
            return LOSSES["softmax"](scores, y, self.label_smoothing)
        return LOSSES[self.loss_name](scores, y)

    def reg_loss(self) -> float:
        if not self.reg:
            return 0.0
        # vdot of the flattened weights: no squared temporary per weight array
        return 0.5 * self.reg * sum(float(np.vdot(w, w)) for w in self.weights())

    def loss(self, X: np.ndarray, y: np.ndarray, train: bool = True
             ) -> tuple[float, dict[str, np.ndarray]]:
        """Loss (data + L2) and its gradient on every parameter. X: (N, ...), y: (N,)."""
        loss, _, grads = self.loss_and_scores(X, y, train)
        return loss, grads

    def loss_and_scores(self, X, y, train=True):
        """As ``loss`` but also returns the scores (N, C) of this forward pass."""
        scores = self.forward(X, train)
        loss, dscores = self.data_loss(scores, y)
        self.backward(dscores)
        if self.reg:
            for layer in self.layers:
                for name in layer.regularized:
                    layer.grads[name] += self.reg * layer.params[name]
        return loss + self.reg_loss(), scores, self.grads

    def reseed(self, make_rng) -> None:
        """Give every stochastic layer (one with an ``rng``) the generator
        ``make_rng(layer_index)``; the trainer does this each epoch so that
        dropout masks depend only on (seed, epoch), which makes resumed runs exact."""
        for i, layer in enumerate(self.layers):
            if hasattr(layer, "rng"):
                layer.rng = make_rng(i)

    # ---- inference -------------------------------------------------------------
    def scores(self, X: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Evaluation-mode class scores, in batches. X: (N, ...) -> (N, C)."""
        X = np.asarray(X)
        if len(X) <= batch_size:
            return self.forward(X.astype(self.dtype, copy=False), train=False)
        return np.concatenate([self.forward(X[i:i + batch_size].astype(self.dtype, copy=False))
                               for i in range(0, len(X), batch_size)])

    def predict(self, X: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Predicted class per row. X: (N, ...) -> (N,) ints."""
        return np.argmax(self.scores(X, batch_size), axis=1)

    def loss_and_accuracy(self, X, y, batch_size: int = 1024) -> tuple[float, float]:
        """(loss including L2, accuracy) in evaluation mode."""
        scores = self.scores(X, batch_size)
        loss, _ = self.data_loss(scores, y)
        return loss + self.reg_loss(), float(np.mean(np.argmax(scores, axis=1) == y))

    # ---- parameters ------------------------------------------------------------
    def _named(self, attr: str) -> NamedArrays:
        return NamedArrays({f"{i}.{layer.kind}.{name}": arr for i, layer in enumerate(self.layers)
                            for name, arr in getattr(layer, attr).items()})

    @property
    def params(self) -> NamedArrays:
        """Every trainable array by name: the layers' arrays themselves, so in-place updates
        (``net.params[k][...] = v``, ``+=``) land; replacing an entry is refused."""
        return self._named("params")

    @property
    def grads(self) -> dict[str, np.ndarray]:
        return self._named("grads")

    @property
    def buffers(self) -> dict[str, np.ndarray]:
        return self._named("buffers")

    def weights(self):
        for layer in self.layers:
            for name in layer.regularized:
                yield layer.params[name]

    @property
    def num_params(self) -> int:
        return sum(p.size for p in self.params.values())

    @property
    def num_classes(self) -> int:
        return int(self.output_shape()[-1])

    def output_shape(self) -> tuple[int, ...]:
        shape = self.input_shape
        for layer in self.layers:
            shape = layer.output_shape(shape)
        return shape

    def conv_algorithms(self) -> dict[str, str]:
        """{layer index: algorithm} of every conv layer that has run (or was loaded with
        its algorithm recorded): im2col, im2col2, winograd2 or winograd4. Saved in model files
        and checkpoints, so a loaded network computes with the same rounding."""
        return {str(i): layer.algorithm for i, layer in enumerate(self.layers)
                if getattr(layer, "algorithm", None) is not None}

    # ---- save / load -----------------------------------------------------------
    def spec(self) -> dict:
        return {"format": FORMAT, "version": FORMAT_VERSION,
                "layers": [layer.spec() for layer in self.layers],
                "loss": self.loss_name, "reg": self.reg, "label_smoothing": self.label_smoothing,
                "input_shape": list(self.input_shape) if self.input_shape else None,
                "dtype": self.dtype.name, "metadata": self.metadata,
                "conv_algorithms": self.conv_algorithms()}

    def to_bytes(self, extra: dict[str, np.ndarray] | None = None) -> bytes:
        """The ``.npz`` bytes ``save`` writes: the spec (JSON), every parameter and
        buffer, and any ``extra`` arrays (a checkpoint's optimizer state), which
        ``load`` ignores."""
        arrays = {_META_KEY: np.array(json.dumps(self.spec()))}
        arrays.update({f"param:{k}": v for k, v in self.params.items()})
        arrays.update({f"buffer:{k}": v for k, v in self.buffers.items()})
        arrays.update(extra or {})
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    def save(self, path, extra: dict[str, np.ndarray] | None = None) -> None:
        """Write ``to_bytes(extra)`` atomically: a crash leaves the old file or the new one."""
        atomic_write_bytes(path, self.to_bytes(extra))

    @classmethod
    def load(cls, path) -> Network:
        """Read a file written by ``save``; anything else raises ModelFileError."""
        if not os.path.isfile(path):
            raise ModelFileError(f"{path}: no such model file")
        if not zipfile.is_zipfile(path):
            raise ModelFileError(f"{path}: not an nnx model file (not an .npz archive)")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except Exception as exc:  # zip, npy-format and pickle errors alike
            raise ModelFileError(f"{path}: not an nnx model file ({exc})") from None
        if _META_KEY not in arrays:
            raise ModelFileError(f"{path}: not an nnx model file (no {_META_KEY} record)")
        try:
            spec = json.loads(str(arrays.pop(_META_KEY)))
        except json.JSONDecodeError:
            raise ModelFileError(f"{path}: corrupt nnx model spec") from None
        if not isinstance(spec, dict) or spec.get("format") != FORMAT:
            raise ModelFileError(f"{path}: not an nnx model file")
        if spec.get("version") != FORMAT_VERSION:
            raise ModelFileError(f"{path}: model format version {spec.get('version')} "
                                 f"is not supported (this nnx reads {FORMAT_VERSION})")
        try:
            net = cls.from_spec(spec)
        except (ValueError, TypeError, KeyError) as exc:
            raise ModelFileError(f"{path}: corrupt nnx model spec ({exc})") from None
        for prefix, named in (("param:", net.params), ("buffer:", net.buffers)):
            for name, target in named.items():
                source = arrays.get(prefix + name)
                if source is None or source.shape != target.shape:
                    raise ModelFileError(f"{path}: parameter {name} is missing or has the wrong shape")
                target[...] = source
        return net

    @classmethod
    def from_spec(cls, spec: dict) -> Network:
        dtype = np.dtype(spec.get("dtype", "float64"))
        layers = [layer_from_spec(s, dtype) for s in spec["layers"]]
        shape = spec.get("input_shape")
        for index, algorithm in (spec.get("conv_algorithms") or {}).items():
            layers[int(index)].algorithm = algorithm   # ValueError when it does not apply
        return cls(layers, loss=spec["loss"], reg=spec["reg"],
                   label_smoothing=spec.get("label_smoothing", 0.0),
                   input_shape=tuple(shape) if shape else None, dtype=dtype,
                   metadata=spec.get("metadata") or {})

    def __repr__(self):
        layers = ",\n  ".join(map(repr, self.layers))
        return f"Network(\n  {layers},\n  loss={self.loss_name}, reg={self.reg})"


def _process_umask() -> int:
    """The umask, read without changing it where the system reports it (Linux, in
    /proc since 4.7); elsewhere only by setting it and back, done once, at import."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


# The mode of every file nnx writes: what open() gives under the umask (0644 under 022,
# 0664 under 002), so results can be shared on a multi-user machine; mkstemp alone makes
# them 0600. The umask belongs to the whole process, so it is read once, not set and
# restored around each write while other threads may be creating files.
FILE_MODE = 0o666 & ~_process_umask()


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` (mode FILE_MODE) via a temporary file in the same
    folder and a rename: readers see the old file or the new one, never a part."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def build_mlp(input_dim: int, hidden: list[int], num_classes: int, *, activation: str = "relu",
              init: str = "auto", weight_scale: float = 1e-2, dropout: float = 0.0,
              loss: str = "softmax", reg: float = 0.0, seed: int = 0, dtype=np.float64,
              input_shape: tuple[int, ...] | None = None) -> Network:
    """A fully-connected net: [Linear -> activation (-> Dropout)] * len(hidden) -> Linear.

    ``hidden=[]`` gives a linear classifier. ``init="auto"`` picks He for
    ReLU-family activations and Xavier for tanh/sigmoid.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose from {', '.join(ACTIVATIONS)}")
    if init == "auto":
        init = "xavier" if activation in ("tanh", "sigmoid") else "he"
    init_rng, dropout_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    layers: list[Layer] = []
    sizes = [input_dim, *hidden]
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=False):
        layers.append(Linear(fan_in, fan_out, init=init, weight_scale=weight_scale,
                             rng=init_rng, dtype=dtype))
        layers.append(ACTIVATIONS[activation]())
        if dropout:
            layers.append(Dropout(dropout, rng=dropout_rng))
    layers.append(Linear(sizes[-1], num_classes, init=init, weight_scale=weight_scale,
                         rng=init_rng, dtype=dtype))
    return Network(layers, loss=loss, reg=reg, input_shape=input_shape or (input_dim,),
                   dtype=dtype)

