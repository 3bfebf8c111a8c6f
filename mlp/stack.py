"""Many MLPs as one computation: a stack.

Trials that share their data and their number of steps (the seeds, L2
strengths, learning rates and hidden sizes of one sweep) train together. Every
parameter carries a leading trial axis, W: (T, fan_in, fan_out), and each layer
is one batched matrix product (``np.matmul`` loops BLAS over the stack in C)
instead of T trips through Python.

Hidden sizes are padded to the stack's ``widths``: a padded unit has zero
weights in and out and a zero bias, so its activation is zero (the sigmoid's
0.5 is masked to zero), every gradient on it is exactly zero, and every
optimizer leaves a zero parameter with a zero gradient at zero.

Each trial's numbers equal its solo ``Network``'s to rounding (the stack runs
other operations: see "forward / backward" below), and depend on the stack's
widths only, never on the other trials: every product is a BLAS call on the
trial's own matrices, every other operation elementwise or along the trial's
own rows.

Every parameter of every trial lives in one array, ``flat``, layer by layer
([W; b] of each trial), so that an optimizer step is one pass over the stack;
the trials' own ``Network`` objects are rebound to views of their parts of it:
they always show the stacked parameters, for saving, evaluating and snapshots.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from mlp.layers import Dropout, LeakyReLU, Linear, ReLU, Sigmoid, Tanh
from mlp.network import Network

ACTIVATION_KINDS = {ReLU: "relu", LeakyReLU: "leaky_relu", Tanh: "tanh", Sigmoid: "sigmoid"}


@dataclass(frozen=True)
class MLPLayout:
    """The shape of a network ``build_mlp`` makes: [Linear -> activation (-> Dropout)] * L -> Linear.

    sizes: (D, h_1, ..., h_L, C); linear_index / dropout_index: the layer index of
    each Linear and of each hidden layer's Dropout (None without); dropout: the
    drop probability of each hidden layer (0 without).
    """

    sizes: tuple[int, ...]
    activation: str
    alpha: float
    linear_index: tuple[int, ...]
    dropout: tuple[float, ...]
    dropout_index: tuple[int | None, ...]


def mlp_layout(net: Network) -> MLPLayout:
    """The layout of ``net``; ValueError if it is not an MLP of that form."""
    layers = net.layers
    sizes, linear_index, dropout, dropout_index, kinds, alphas = [], [], [], [], set(), set()
    i = 0
    while True:
        if i >= len(layers) or not isinstance(layers[i], Linear):
            raise ValueError(f"not an MLP: expected a Linear layer at position {i}")
        linear_index.append(i)
        if not sizes:
            sizes.append(layers[i].in_features)
        sizes.append(layers[i].out_features)
        i += 1
        if i == len(layers):
            break
        kind = ACTIVATION_KINDS.get(type(layers[i]))
        if kind is None:
            raise ValueError(f"not an MLP: {type(layers[i]).__name__} after a Linear layer")
        kinds.add(kind)
        alphas.add(getattr(layers[i], "alpha", 0.0))
        i += 1
        if i < len(layers) and isinstance(layers[i], Dropout):
            dropout.append(layers[i].p)
            dropout_index.append(i)
            i += 1
        else:
            dropout.append(0.0)
            dropout_index.append(None)
    if len(kinds) > 1 or len(alphas) > 1:
        raise ValueError("not an MLP of one activation")
    return MLPLayout(tuple(sizes), kinds.pop() if kinds else "relu", alphas.pop() if alphas else 0.0,
                     tuple(linear_index), tuple(dropout), tuple(dropout_index))


def stack_signature(net: Network) -> tuple:
    """What networks must share to be stacked: depth, input and output sizes, activation,
    loss and dtype (hidden sizes, L2, dropout and label smoothing may differ)."""
    layout = mlp_layout(net)
    return (len(layout.sizes), layout.sizes[0], layout.sizes[-1], layout.activation, layout.alpha,
            net.loss_name, net.dtype.name)


class MLPStack:
    """T MLPs of one depth trained as one computation.

    Layer k is one block [W[k]; b[k]]: (T, w_k + 1, w_{k+1}), the bias its last
    row; W[k]: (T, w_k, w_{k+1}) and b[k]: (T, 1, w_{k+1}) are views of it, and
    the blocks are consecutive in ``flat``: (T * P,), gradients likewise in
    ``flat_grad``. ``widths`` = (w_0, ..., w_{L+1}) defaults to the largest sizes
    of the stack. reg, label_smoothing: (T,); dropout: (T, L).
    """

    def __init__(self, nets: Sequence[Network], widths: Sequence[int] | None = None):
        if not nets:
            raise ValueError("a stack needs at least one network")
        layouts = [mlp_layout(net) for net in nets]
        signature = stack_signature(nets[0])
        for net in nets[1:]:
            if stack_signature(net) != signature:
                raise ValueError("these networks cannot share a stack (depth, input or output size, "
                                 "activation, loss or dtype differ)")
        first = layouts[0]
        natural = tuple(max(layout.sizes[i] for layout in layouts) for i in range(len(first.sizes)))
        widths = natural if widths is None else tuple(int(w) for w in widths)
        if len(widths) != len(natural) or any(w < n for w, n in zip(widths, natural, strict=True)) \
                or widths[0] != natural[0] or widths[-1] != natural[-1]:
            raise ValueError(f"widths {widths} do not hold the stack's sizes {natural}")
        self.widths = widths
        self.depth = len(widths) - 2
        self.activation, self.alpha = first.activation, first.alpha
        self.loss_name, self.dtype = nets[0].loss_name, nets[0].dtype
        self.shapes = [(widths[k], widths[k + 1]) for k in range(self.depth + 1)]
        self.block_sizes = [(fan_in + 1) * fan_out for fan_in, fan_out in self.shapes]
        self._install(list(nets), layouts, np.zeros(len(nets) * sum(self.block_sizes), self.dtype),
                      np.array([n.reg for n in nets], dtype=np.float64),
                      np.array([n.label_smoothing for n in nets], dtype=np.float64),
                      np.array([layout.dropout for layout in layouts], dtype=np.float64)
                      .reshape(len(nets), self.depth))
        for t, (net, layout) in enumerate(zip(nets, layouts, strict=True)):
            for k, index in enumerate(layout.linear_index):
                fan_in, fan_out = layout.sizes[k], layout.sizes[k + 1]
                self.W[k][t, :fan_in, :fan_out] = net.layers[index].params["W"]
                self.b[k][t, 0, :fan_out] = net.layers[index].params["b"]
        self.bind()
        self.rngs: list[list[np.random.Generator | None]] = [[None] * self.depth for _ in nets]

    # ---- layout ------------------------------------------------------------------
    def blocks(self, array: np.ndarray) -> list[np.ndarray]:
        """The layers' blocks (T, w_k + 1, w_{k+1}) of ``array``, laid out as ``flat``."""
        out, start = [], 0
        for (fan_in, fan_out), size in zip(self.shapes, self.block_sizes, strict=True):
            out.append(array[start:start + self.size * size].reshape(self.size, fan_in + 1, fan_out))
            start += self.size * size
        return out

    def copy_rows(self, dst: np.ndarray, src: np.ndarray, index: np.ndarray) -> None:
        """dst's rows of trials ``index`` := src's (both laid out as ``flat``)."""
        for into, source in zip(self.blocks(dst), self.blocks(src), strict=True):
            into[index] = source[index]

    def take(self, array: np.ndarray, index: np.ndarray) -> np.ndarray:
        """The rows of trials ``index`` of ``array`` (laid out as ``flat``), as a new array."""
        return np.concatenate([block[index].ravel() for block in self.blocks(array)])

    def _install(self, nets, layouts, flat, reg, label_smoothing, dropout) -> None:
        """Adopt the trials, their parameters (flat) and their vectors; views follow."""
        self.nets, self.layouts, self.flat = nets, layouts, flat
        self.size = t = len(nets)           # T
        self.flat_grad = np.zeros_like(flat)
        self._scratch = np.empty_like(flat)
        self._buffers: dict[tuple, np.ndarray] = {}
        self._picks: dict[int, tuple] = {}              # id(y) -> (y, picks) of a shared y
        self.reg, self.label_smoothing, self.dropout = reg, label_smoothing, dropout
        self.any_reg, self.all_reg = bool(reg.any()), bool(reg.all())
        self.any_smoothing = bool(label_smoothing.any())
        self.param_blocks, self.grad_blocks = self.blocks(self.flat), self.blocks(self.flat_grad)
        # each trial's W as one row-major row (T, fan_in * fan_out), for L2's sums of squares
        self.weight_rows = [block.reshape(t, (fan_in + 1) * fan_out)[:, :fan_in * fan_out]
                            for block, (fan_in, fan_out) in zip(self.param_blocks, self.shapes, strict=True)]
        self.weight_pairs = [(w[:, None, :], w[:, :, None]) for w in self.weight_rows]   # w w^T
        self.half_reg = 0.5 * reg
        self.W = [block[:, :-1] for block in self.param_blocks]
        self.b = [block[:, -1:] for block in self.param_blocks]
        self.dW = [block[:, :-1] for block in self.grad_blocks]
        self.db = [block[:, -1:] for block in self.grad_blocks]
        # each element's trial (to spread a per-trial lr over every parameter), and L2's
        # strength on every parameter: reg on weights, 0 on biases
        self.trial_of = np.concatenate([np.repeat(np.arange(t), size) for size in self.block_sizes])
        is_weight = np.concatenate([np.tile(np.r_[np.ones(fan_in * fan_out), np.zeros(fan_out)], t)
                                    for fan_in, fan_out in self.shapes])
        self.reg_flat = (reg[self.trial_of] * is_weight).astype(self.dtype)
        self.has_dropout = [bool(dropout[:, k].any()) for k in range(self.depth)]
        # the sigmoid's padded units output 0.5: masked to zero where a layer is padded
        self.unit_masks = []
        for k in range(self.depth):
            width = self.widths[k + 1]
            sizes = np.array([layout.sizes[k + 1] for layout in self.layouts])
            if self.activation == "sigmoid" and (sizes < width).any():
                self.unit_masks.append((np.arange(width) < sizes[:, None]).astype(self.dtype)[:, None, :])
            else:
                self.unit_masks.append(None)

    def param_views(self, array: np.ndarray, t: int) -> dict[str, np.ndarray]:
        """Trial t's parameters, named as in its Network, as views of ``array`` (``flat``,
        ``flat_grad``, or an optimizer slot of the same layout)."""
        layout, net = self.layouts[t], self.nets[t]
        views = {}
        for k, (block, index) in enumerate(zip(self.blocks(array), layout.linear_index, strict=True)):
            size_in, size_out = layout.sizes[k], layout.sizes[k + 1]
            name = f"{index}.{net.layers[index].kind}"
            views[f"{name}.W"] = block[t, :size_in, :size_out]
            views[f"{name}.b"] = block[t, -1, :size_out]
        return views

    def bind(self) -> None:
        """Point every trial's Network at its rows of ``flat``."""
        for t, net in enumerate(self.nets):
            for name, view in self.param_views(self.flat, t).items():
                index, _, param = name.split(".")
                net.layers[int(index)].params[param] = view

    def keep(self, index: np.ndarray) -> None:
        """Keep only the trials ``index`` (in that order), parameters and gradients with
        them. The networks of the others keep their last parameters (their views hold
        the old rows); the widths stay, and with them every kept trial's arithmetic."""
        index = np.asarray(index, dtype=np.intp)
        flat, grad = self.take(self.flat, index), self.take(self.flat_grad, index)
        self.rngs = [self.rngs[i] for i in index]
        self._install([self.nets[i] for i in index], [self.layouts[i] for i in index], flat,
                      self.reg[index], self.label_smoothing[index], self.dropout[index])
        self.flat_grad[...] = grad
        self.bind()

    def input(self, X: np.ndarray) -> np.ndarray:
        """X: (..., N, D) as the first layer takes it, [X, 1] (see ``forward``). Pass data
        through it once: minibatches gathered from [X, 1] have their ones."""
        if X.shape[-1] == self.widths[0] + 1:
            return X
        return np.concatenate([X, np.ones((*X.shape[:-1], 1), dtype=self.dtype)], axis=-1)

    def reseed(self, make_rng: Callable[[int, int], np.random.Generator]) -> None:
        """Give trial t's dropout in hidden layer k the generator ``make_rng(t, i)``, i being
        the Dropout's index among the trial's own layers (as ``Network.reseed`` does)."""
        for t, layout in enumerate(self.layouts):
            for k, index in enumerate(layout.dropout_index):
                if index is not None:
                    self.rngs[t][k] = make_rng(t, index)

    # ---- forward / backward ---------------------------------------------------------
    # A hidden layer's output lives in a buffer (T, n, w + 1) whose last column is 1, so
    # that the next layer is one product [x, 1] @ [W; b] (its block), its bias carried in
    # the product. The output layer is computed transposed, scores^T = [W; b]^T [x, 1]^T:
    # (T, C, n), so that the loss's passes along a few classes are passes over C rows of
    # n contiguous numbers (numpy loops in C once per row along a short last axis).
    # Products sum in BLAS's order, not the solo layers': a trial's numbers equal its solo
    # run's to rounding (1e-10 of each array's magnitude over hundreds of steps, tested).
    def forward(self, X: np.ndarray, train: bool = False) -> np.ndarray:
        """X: (n, D) shared by every trial, or (T, n, D) one batch per trial, with or
        without the ones column ``input`` adds -> scores transposed, (T, C, n). With
        ``train``, dropout is drawn and each hidden layer keeps the factor its backward
        multiplies by (the activation's derivative times the dropout mask)."""
        x = self.input(X)
        n = x.shape[-2]
        self._inputs, self._factors = [x], []
        for k in range(self.depth):
            z = self._buffer("z", k, n, 1.0)                         # [z, 1]
            np.matmul(x, self.param_blocks[k], out=z[..., :-1])
            self._factors.append(self._activate(z, k, train))
            self._inputs.append(z)
            x = z
        out = self._buffer("scores", self.depth, n)
        if x.shape[-1] >= WIDE:     # measured: x @ [W; b], then a transposing copy, is faster
            scores = self._buffers.get(("scores rows", n))
            if scores is None:
                scores = self._buffers["scores rows", n] = np.empty((self.size, n, self.widths[-1]),
                                                                     self.dtype)
            np.matmul(x, self.param_blocks[-1], out=scores)
            np.copyto(out, scores.transpose(0, 2, 1))
            return out
        xT = x.T if x.ndim == 2 else x.transpose(0, 2, 1)
        return np.matmul(self.param_blocks[-1].transpose(0, 2, 1), xT, out=out)

    def _buffer(self, kind: str, k: int, n: int, last: float | None = None) -> np.ndarray:
        """A buffer kept from step to step: (T, n, w_{k+1} + 1) for hidden layer k, its last
        column ``last``; (T, C, n) for the scores (``last`` None)."""
        key = (kind, k, n)
        buffer = self._buffers.get(key)
        if buffer is None:
            if last is None:
                buffer = np.empty((self.size, self.widths[k + 1], n), self.dtype)
            else:
                buffer = np.empty((self.size, n, self.widths[k + 1] + 1), self.dtype)
                buffer[..., -1] = last
            self._buffers[key] = buffer
        return buffer

    def _zeros(self, shape: tuple) -> np.ndarray:
        """Zeros of this shape, kept with the stack's buffers (and dropped with them when
        trials leave): np.maximum against an array of zeros is vectorised, against the
        scalar 0 it is not (see mlp.kernels.elementwise.zeros_like_rows)."""
        zeros = self._buffers.get(("zeros", shape))
        if zeros is None:
            zeros = self._buffers["zeros", shape] = np.zeros(shape, self.dtype)
        return zeros

    def _activate(self, z1: np.ndarray, k: int, train: bool) -> np.ndarray | None:
        """Hidden layer k's activation (and dropout), in place on z1 = [z, 1] (the ones
        stay ones); in training, the factor (T, n, w + 1) its backward multiplies by."""
        kind = self.activation
        drop = self._dropout_mask(k, z1.shape[1]) if train and self.has_dropout[k] else None
        if kind in ("relu", "leaky_relu"):
            if not train:
                if kind == "relu":
                    return np.maximum(z1, self._zeros(z1.shape), out=z1)
            factor = np.greater(z1, 0, out=self._buffer("factor", k, z1.shape[1], 1.0))
            if kind == "leaky_relu":                     # 1 where z > 0, alpha elsewhere
                factor *= 1 - self.alpha
                factor += self.alpha
            if drop is not None:
                factor *= drop
            z1 *= factor                                 # relu(z) * mask in one pass
            return factor if train else None
        z = z1[..., :-1]
        if kind == "tanh":
            np.tanh(z, out=z)
        else:
            np.tanh(np.multiply(z, 0.5, out=z), out=z)    # 0.5 (1 + tanh(z / 2))
            z += 1
            z *= 0.5
            if self.unit_masks[k] is not None:            # a padded unit's 0.5 made 0
                z *= self.unit_masks[k]
        if not train:
            return None
        factor = self._buffer("factor", k, z1.shape[1], 1.0)
        f = factor[..., :-1]
        if kind == "tanh":                                # 1 - out^2
            np.multiply(z, z, out=f)
            np.subtract(1, f, out=f)
        else:                                             # out (1 - out)
            np.subtract(1, z, out=f)
            f *= z
        if drop is not None:
            z1 *= drop
            factor *= drop
        return factor

    def _dropout_mask(self, k: int, n: int) -> np.ndarray:
        """Inverted dropout's mask for hidden layer k: (T, n, width + 1), each trial's drawn
        from its own generator exactly as its Dropout layer draws it; 1 for trials
        without (and in the extra column)."""
        mask = np.ones((self.size, n, self.widths[k + 1] + 1), dtype=self.dtype)
        for t in np.flatnonzero(self.dropout[:, k]):
            p, size = self.dropout[t, k], self.layouts[t].sizes[k + 1]
            keep = self.rngs[t][k].random((n, size)) >= p
            mask[t, :, :size] = keep.astype(self.dtype) / (1 - p)
        return mask

    def backward(self, dscores_t: np.ndarray) -> None:
        """dscores_t: (T, C, n), the scores' gradient transposed; fills ``flat_grad``
        (every [dW; db]) and adds L2's reg * W."""
        d = dscores_t.transpose(0, 2, 1)                  # (T, n, C)
        for k in range(self.depth, -1, -1):
            x = self._inputs[k]
            xT = x.T if x.ndim == 2 else x.transpose(0, 2, 1)
            np.matmul(xT, d, out=self.grad_blocks[k])     # [x, 1]^T d = [dW; db]
            if k == 0:
                break
            dz1 = self._buffer("dz", k - 1, x.shape[-2], 0.0)                # [dz, 0]
            np.matmul(d, self.W[k].transpose(0, 2, 1), out=dz1[..., :-1])
            dz1 *= self._factors[k - 1]
            d = dz1[..., :-1]
        if self.any_reg:
            # reg * W on weights, reg * 0 on biases: one pass over every parameter
            self.flat_grad += np.multiply(self.reg_flat, self.flat, out=self._scratch)

    # ---- losses ----------------------------------------------------------------------
    def _picks_of(self, y: np.ndarray, n: int) -> np.ndarray:
        """Flat indices of the true classes in a (T, C, n) array: (T, n). y: (n,) or (T, n)."""
        if y.ndim == 1:             # one y for every trial (a full batch, the validation split)
            known = self._picks.get(id(y))
            if known is None or known[0] is not y:
                known = self._picks[id(y)] = (y, picks(self.size, self.widths[-1], y))
            return known[1]
        return picks(self.size, self.widths[-1], y)

    def data_loss(self, scores_t: np.ndarray, y: np.ndarray, gradient: bool = True
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Per-trial mean loss (T,), right answers (T,) and, with ``gradient``, the scores'
        gradient (T, C, n) (made in place of ``scores_t``). scores_t: (T, C, n); y: (n,)
        or (T, n)."""
        pick = self._picks_of(y, scores_t.shape[2])
        if self.loss_name == "softmax":
            return softmax_cross_entropy(scores_t, y, pick, self.label_smoothing if self.any_smoothing
                                         else None, gradient)
        return svm_hinge(scores_t, y, pick, gradient=gradient)

    def reg_loss(self) -> np.ndarray:
        """0.5 * reg * sum(W**2) over every weight, per trial: (T,). Each layer's sum of
        squares is one BLAS dot per trial (a stack of one: one np.dot a layer)."""
        if not self.any_reg:
            return np.zeros(self.size)
        if self.size == 1:
            return self.half_reg * sum(float(np.dot(row[0], row[0])) for row in self.weight_rows)
        total = 0
        for row, column in self.weight_pairs:
            total = total + np.matmul(row, column)[:, 0, 0]
        loss = self.half_reg * total
        return loss if self.all_reg else np.where(self.reg == 0, 0.0, loss)

    def train_step(self, X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One forward and backward pass in training mode: per-trial loss (data + L2) (T,)
        and right answers (T,); fills the gradients."""
        scores_t = self.forward(X, train=True)
        loss, correct, dscores_t = self.data_loss(scores_t, y)
        self.backward(dscores_t)
        return loss + self.reg_loss(), correct

    def loss_and_scores(self, X: np.ndarray, y: np.ndarray, train: bool = True
                        ) -> tuple[np.ndarray, np.ndarray]:
        """Per-trial loss (data + L2): (T,), and the scores (T, n, C) of this forward pass;
        fills the gradients."""
        scores_t = self.forward(X, train)
        scores = scores_t.transpose(0, 2, 1).copy()
        loss, _, dscores_t = self.data_loss(scores_t, y)
        self.backward(dscores_t)
        return loss + self.reg_loss(), scores

    # ---- inference ---------------------------------------------------------------------
    def scores(self, X: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Evaluation-mode class scores, in batches of rows. X: (N, D) -> (T, N, C)."""
        return np.concatenate([self.forward(X[i:i + batch_size], train=False).transpose(0, 2, 1)
                               for i in range(0, len(X), batch_size)], axis=1)

    def loss_and_accuracy(self, X: np.ndarray, y: np.ndarray, batch_size: int = 1024
                          ) -> tuple[np.ndarray, np.ndarray]:
        """(loss including L2, accuracy) per trial, in evaluation mode: two (T,) arrays."""
        if len(X) <= batch_size:
            loss, correct, _ = self.data_loss(self.forward(X, train=False), y, gradient=False)
        else:
            loss, correct = np.zeros(self.size), 0
            for i in range(0, len(X), batch_size):
                part, right, _ = self.data_loss(self.forward(X[i:i + batch_size], train=False),
                                                y[i:i + batch_size], gradient=False)
                loss, correct = loss + part * len(y[i:i + batch_size]), correct + right
            loss = loss / len(X)
        return loss + self.reg_loss(), correct / len(y)


# From this many inputs (units + 1) the output layer's product runs faster untransposed
# (measured: 2-100-3, 300 examples: 7.7 + 0.5 us against 10.2 us; 2-3-3 nets, 64 to a
# stack, slower: 42 against 29 us).
WIDE = 16


def picks(t: int, c: int, y: np.ndarray) -> np.ndarray:
    """The flat index of each example's true class in a (t, c, n) array: (t, n); y: (n,)
    or (t, n)."""
    n = y.shape[-1]
    return (np.arange(t)[:, None] * c + y) * n + np.arange(n)


def right_answers(scores_t: np.ndarray, top: np.ndarray, true: np.ndarray, y: np.ndarray) -> np.ndarray:
    """How many examples each trial classifies right, as argmax (the first of equal
    scores) decides: (T,). scores_t: (T, C, n); top: their max over C (T, n); true: the
    true class's score (T, n). Unless some example has two top scores (or NaNs), right
    is true == top."""
    if np.count_nonzero(np.equal(scores_t, top[:, None, :])) == top.size:
        return np.add.reduce(np.equal(true, top), axis=1)
    return np.add.reduce(np.equal(scores_t.argmax(axis=1), y), axis=1)


def softmax_cross_entropy(scores_t: np.ndarray, y: np.ndarray, pick: np.ndarray,
                          label_smoothing: np.ndarray | None = None, gradient: bool = True
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``mlp.losses.softmax_cross_entropy`` of every trial on transposed scores: scores_t
    (T, C, n), y (n,) or (T, n), pick: ``picks`` of y, label_smoothing (T,) or None ->
    loss (T,), right answers (T,), dscores_t (T, C, n) made in place of scores_t (None
    without ``gradient``). Raw ufunc calls: at a few hundred examples numpy's per-call
    overhead is most of the time."""
    t, c, n = scores_t.shape
    top = np.maximum.reduce(scores_t, axis=1)
    true = scores_t.reshape(-1).take(pick)
    correct = right_answers(scores_t, top, true, y)
    shifted = np.subtract(scores_t, top[:, None, :], out=scores_t)
    # -log p_true = log(sum_c exp(s_c - max)) - (s_true - max), summed over the examples
    true_shifted = np.add.reduce(np.subtract(true, top, out=true), axis=1)
    if label_smoothing is not None:
        # the target (1 - e) onehot + e / C adds e (s_true - max) - e / C sum_c (s_c - max)
        smoothing = label_smoothing * true_shifted - label_smoothing / c * np.add.reduce(
            shifted.reshape(t, -1), axis=1)
    probs = np.exp(shifted, out=shifted)
    sums = np.add.reduce(probs, axis=1)
    loss = np.add.reduce(np.log(sums), axis=1)
    loss -= true_shifted
    if label_smoothing is not None:
        loss += smoothing
    loss /= n
    if not gradient:
        return loss, correct, None
    sums *= n                                   # (probs - target) / n in one division
    probs /= sums[:, None, :]
    flat = probs.reshape(-1)
    if label_smoothing is None:
        flat[pick] -= 1 / n
    else:
        flat[pick] -= ((1 - label_smoothing) / n)[:, None]
        probs -= (label_smoothing / (c * n))[:, None, None]
    return loss, correct, probs


def svm_hinge(scores_t: np.ndarray, y: np.ndarray, pick: np.ndarray, margin: float = 1.0,
              gradient: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``mlp.losses.svm_hinge`` of every trial on transposed scores: scores_t (T, C, n),
    y (n,) or (T, n), pick: ``picks`` of y -> loss (T,), right answers (T,), dscores_t."""
    t, c, n = scores_t.shape
    top = scores_t.max(axis=1)
    true = scores_t.reshape(-1).take(pick)
    correct = right_answers(scores_t, top, true, y)
    margins = np.subtract(scores_t, true[:, None, :], out=scores_t)
    margins += margin
    np.maximum(margins, 0, out=margins)
    flat = margins.reshape(-1)
    flat[pick] = 0
    loss = margins.sum(axis=(1, 2)) / n
    if not gradient:
        return loss, correct, None
    dscores_t = np.greater(margins, 0, out=margins)      # 1.0 where a margin is violated
    dscores_t.reshape(-1)[pick] = -dscores_t.sum(axis=1)
    dscores_t *= 1 / n
    return loss, correct, dscores_t
