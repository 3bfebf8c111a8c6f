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

Each trial's arithmetic is the solo ``Network``'s, operation for operation, on
the trial's own matrices: a trial whose sizes are the stack's widths gets the
bits it gets alone, whoever shares its stack. A padded trial's products run
over rows padded with zeros, which BLAS may sum in another order: its numbers
equal the solo ones to rounding, and depend on the widths only, never on the
other trials.

All of a trial's parameters live in one row of ``flat``: (T, P), so that an
optimizer step is one pass over the stack, and the trials' own ``Network``
objects are rebound to views of their rows: they always show the stacked
parameters, for saving, evaluating and snapshots.
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

    Layer k has W[k]: (T, w_k, w_{k+1}) and b[k]: (T, 1, w_{k+1}), views of
    ``flat``: (T, P); ``widths`` = (w_0, ..., w_{L+1}) defaults to the largest
    sizes of the stack. reg, label_smoothing: (T,); dropout: (T, L).
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
        offsets, o = [], 0
        for fan_in, fan_out in self.shapes:
            offsets.append((o, o + fan_in * fan_out))
            o += fan_in * fan_out + fan_out
        self.offsets, self.num_params = offsets, o
        # 1 where a parameter is a weight (L2 applies), 0 on biases
        self.is_weight = np.zeros(o, dtype=self.dtype)
        for w_start, w_end in offsets:
            self.is_weight[w_start:w_end] = 1
        self.nets, self.layouts = list(nets), layouts
        self.flat = np.zeros((len(nets), o), dtype=self.dtype)
        self.flat_grad = np.zeros_like(self.flat)
        self._set_vectors(np.array([n.reg for n in nets], dtype=np.float64),
                          np.array([n.label_smoothing for n in nets], dtype=np.float64),
                          np.array([layout.dropout for layout in layouts], dtype=np.float64)
                          .reshape(len(nets), self.depth))
        self._views()
        for t, (net, layout) in enumerate(zip(nets, layouts, strict=True)):
            for k, index in enumerate(layout.linear_index):
                fan_in, fan_out = layout.sizes[k], layout.sizes[k + 1]
                self.W[k][t, :fan_in, :fan_out] = net.layers[index].params["W"]
                self.b[k][t, 0, :fan_out] = net.layers[index].params["b"]
        self.bind()
        self.rngs: list[list[np.random.Generator | None]] = [[None] * self.depth for _ in nets]

    # ---- layout ------------------------------------------------------------------
    @property
    def size(self) -> int:
        """T, the number of trials in the stack."""
        return len(self.nets)

    def _set_vectors(self, reg, label_smoothing, dropout):
        self.reg, self.label_smoothing, self.dropout = reg, label_smoothing, dropout
        self.reg_flat = (reg[:, None] * self.is_weight).astype(self.dtype)
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

    def _views(self):
        """W[l], b[l], dW[l], db[l] as views of flat and flat_grad."""
        t = self.size
        self.W, self.b, self.dW, self.db = [], [], [], []
        for (fan_in, fan_out), (start, end) in zip(self.shapes, self.offsets, strict=True):
            for flat, weights, biases in ((self.flat, self.W, self.b), (self.flat_grad, self.dW, self.db)):
                weights.append(flat[:, start:end].reshape(t, fan_in, fan_out))
                biases.append(flat[:, end:end + fan_out].reshape(t, 1, fan_out))

    def param_views(self, array: np.ndarray, t: int) -> dict[str, np.ndarray]:
        """Trial t's parameters, named as in its Network, as views of ``array``: (T, P)
        (``flat``, ``flat_grad``, or an optimizer slot of the same layout)."""
        layout, net = self.layouts[t], self.nets[t]
        views = {}
        for k, index in enumerate(layout.linear_index):
            (start, end), (fan_in, fan_out) = self.offsets[k], self.shapes[k]
            size_in, size_out = layout.sizes[k], layout.sizes[k + 1]
            name = f"{index}.{net.layers[index].kind}"
            views[f"{name}.W"] = array[t, start:end].reshape(fan_in, fan_out)[:size_in, :size_out]
            views[f"{name}.b"] = array[t, end:end + size_out]
        return views

    def bind(self) -> None:
        """Point every trial's Network at its row of ``flat``."""
        for t, net in enumerate(self.nets):
            views = self.param_views(self.flat, t)
            for name, view in views.items():
                index, _, param = name.split(".")
                net.layers[int(index)].params[param] = view

    def keep(self, index: np.ndarray) -> None:
        """Keep only the trials ``index`` (in that order), parameters and gradients with
        them. The networks of the others keep their last parameters (their views hold
        the old rows); the widths stay, and with them every kept trial's arithmetic."""
        index = np.asarray(index, dtype=np.intp)
        self.flat, self.flat_grad = self.flat[index], self.flat_grad[index]
        self.nets = [self.nets[i] for i in index]
        self.layouts = [self.layouts[i] for i in index]
        self.rngs = [self.rngs[i] for i in index]
        self._set_vectors(self.reg[index], self.label_smoothing[index], self.dropout[index])
        self._views()
        self.bind()

    def reseed(self, make_rng: Callable[[int, int], np.random.Generator]) -> None:
        """Give trial t's dropout in hidden layer k the generator ``make_rng(t, i)``, i being
        the Dropout's index among the trial's own layers (as ``Network.reseed`` does)."""
        for t, layout in enumerate(self.layouts):
            for k, index in enumerate(layout.dropout_index):
                if index is not None:
                    self.rngs[t][k] = make_rng(t, index)

    # ---- forward / backward ---------------------------------------------------------
    def forward(self, X: np.ndarray, train: bool = False) -> np.ndarray:
        """X: (N, D) shared by every trial, or (T, N, D) one batch per trial -> scores (T, N, C)."""
        x = X
        self._inputs, self._outputs, self._drop_masks, self._act_masks = [X], [], [], {}
        for k in range(self.depth):
            a = np.matmul(x, self.W[k])
            a += self.b[k]
            h = self._activate(a, k)
            self._outputs.append(h)
            mask = self._dropout_mask(k, h.shape[1]) if train and self.has_dropout[k] else None
            self._drop_masks.append(mask)
            if mask is not None:
                # in place for the ReLU, whose backward needs only the sign of its output
                x = np.multiply(h, mask, out=h if self.activation == "relu" else None)
            else:
                x = h
            self._inputs.append(x)
        scores = np.matmul(x, self.W[-1])
        scores += self.b[-1]
        return scores

    def _activate(self, a: np.ndarray, k: int) -> np.ndarray:
        """The activation of hidden layer k, as its layer computes it; in place where
        the backward does not need the input."""
        kind = self.activation
        if kind == "relu":
            return np.maximum(a, 0, out=a)
        if kind == "tanh":
            return np.tanh(a, out=a)
        if kind == "leaky_relu":
            self._act_masks[k] = mask = a > 0
            return np.where(mask, a, self.alpha * a)
        out = 0.5 * (1 + np.tanh(0.5 * a))
        if self.unit_masks[k] is not None:
            out *= self.unit_masks[k]
        return out

    def _dropout_mask(self, k: int, n: int) -> np.ndarray:
        """Inverted dropout's mask for hidden layer k: (T, n, width), each trial's drawn from
        its own generator exactly as its Dropout layer draws it; 1 for trials without."""
        mask = np.ones((self.size, n, self.widths[k + 1]), dtype=self.dtype)
        for t in np.flatnonzero(self.dropout[:, k]):
            p, size = self.dropout[t, k], self.layouts[t].sizes[k + 1]
            keep = self.rngs[t][k].random((n, size)) >= p
            mask[t, :, :size] = keep.astype(self.dtype) / (1 - p)
        return mask

    def backward(self, dscores: np.ndarray) -> None:
        """dscores: (T, N, C); fills ``flat_grad`` (every dW[l], db[l]) and adds L2's reg * W."""
        d = dscores
        for k in range(self.depth, -1, -1):
            x = self._inputs[k]
            np.matmul(x.T if x.ndim == 2 else x.transpose(0, 2, 1), d, out=self.dW[k])
            np.sum(d, axis=1, keepdims=True, out=self.db[k])
            if k == 0:
                break
            dx = np.matmul(d, self.W[k].transpose(0, 2, 1))
            if self._drop_masks[k - 1] is not None:
                dx *= self._drop_masks[k - 1]
            d = self._activation_backward(dx, k - 1)
        if self.reg.any():
            # reg * W on weights, reg * 0 on biases: one pass over every parameter
            self.flat_grad += self.reg_flat * self.flat

    def _activation_backward(self, dout: np.ndarray, k: int) -> np.ndarray:
        kind = self.activation
        if kind == "relu":
            # dout * (x > 0): the sign of the ReLU's output (0 or 1, after dropout too)
            h = self._inputs[k + 1]
            return np.multiply(dout, np.sign(h, out=h), out=dout)
        if kind == "leaky_relu":
            mask = self._act_masks[k]
            return np.where(mask, dout, self.alpha * dout)
        out = self._outputs[k]
        if kind == "tanh":
            return dout * (1 - out ** 2)
        return dout * out * (1 - out)

    # ---- losses ----------------------------------------------------------------------
    def data_loss(self, scores: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-trial mean loss (T,) and dscores (T, N, C); y: (N,) or (T, N)."""
        if self.loss_name == "softmax":
            return softmax_cross_entropy(scores, y, self.label_smoothing)
        return svm_hinge(scores, y)

    def reg_loss(self) -> np.ndarray:
        """0.5 * reg * sum(W**2) over every weight, per trial: (T,). Each weight's sum of
        squares is one BLAS dot over the trial's row, as ``np.vdot`` takes it alone."""
        total = 0
        for k in range(self.depth + 1):
            start, end = self.offsets[k]
            w = self.flat[:, start:end]
            # float() of each dot in the solo sum: added in float64 whatever the dtype
            total = total + np.matmul(w[:, None, :], w[:, :, None])[:, 0, 0].astype(np.float64)
        return np.where(self.reg == 0, 0.0, 0.5 * self.reg * total)

    def loss_and_scores(self, X: np.ndarray, y: np.ndarray, train: bool = True
                        ) -> tuple[np.ndarray, np.ndarray]:
        """Per-trial loss (data + L2): (T,), and the scores (T, N, C) of this forward pass;
        fills the gradients."""
        scores = self.forward(X, train)
        loss, dscores = self.data_loss(scores, y)
        self.backward(dscores)
        return loss + self.reg_loss(), scores

    # ---- inference ---------------------------------------------------------------------
    def scores(self, X: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Evaluation-mode class scores, in batches of rows. X: (N, D) -> (T, N, C)."""
        if len(X) <= batch_size:
            return self.forward(X, train=False)
        return np.concatenate([self.forward(X[i:i + batch_size], train=False)
                               for i in range(0, len(X), batch_size)], axis=1)

    def evaluate(self, X: np.ndarray, y: np.ndarray, batch_size: int = 1024
                 ) -> tuple[np.ndarray, np.ndarray]:
        """(loss including L2, accuracy) per trial, in evaluation mode: two (T,) arrays."""
        scores = self.scores(X, batch_size)
        loss, _ = self.data_loss(scores, y)
        return loss + self.reg_loss(), np.count_nonzero(scores.argmax(axis=2) == y, axis=1) / len(y)


def _picks(scores: np.ndarray, y: np.ndarray) -> tuple:
    """The index of each row's true class: scores[_picks(scores, y)] is (T, N)."""
    t, n, _ = scores.shape
    # advanced indices only: the picked (T, N) comes out C-ordered, so that its sum over N
    # is numpy's pairwise sum of a contiguous row, as the solo loss sums it
    return (np.arange(t)[:, None], np.arange(n), y)


def softmax_cross_entropy(scores: np.ndarray, y: np.ndarray, label_smoothing: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray]:
    """``mlp.losses.softmax_cross_entropy`` of every trial: scores (T, N, C), y (N,) or
    (T, N), label_smoothing (T,) -> loss (T,), dscores (T, N, C)."""
    t, n, c = scores.shape
    shifted = scores - scores.max(axis=2, keepdims=True)
    probs = np.exp(shifted)
    sums = probs.sum(axis=2, keepdims=True)
    probs /= sums
    log_probs = shifted
    log_probs -= np.log(sums)
    pick = _picks(scores, y)
    loss = -log_probs[pick].sum(axis=1).astype(np.float64) / n     # as the solo loss: float(sum) / n
    smoothed = np.flatnonzero(label_smoothing)
    if smoothed.size == 0:
        probs[pick] -= 1
    else:
        # rare in a stack: the smoothed trials one by one, as the solo loss takes them
        rows = np.arange(n)
        for i in smoothed:
            e, yi = label_smoothing[i], (y if y.ndim == 1 else y[i])
            target = np.full((n, c), e / c, dtype=scores.dtype)
            target[rows, yi] += 1.0 - e
            loss[i] = -float(np.vdot(target, log_probs[i])) / n
            probs[i] -= target
        plain = np.flatnonzero(label_smoothing == 0)
        if plain.size:
            ti = plain[:, None]
            probs[ti, rows, y if y.ndim == 1 else y[plain]] -= 1
    probs /= n
    return loss, probs


def svm_hinge(scores: np.ndarray, y: np.ndarray, margin: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """``mlp.losses.svm_hinge`` of every trial: scores (T, N, C), y (N,) or (T, N)."""
    t, n, _ = scores.shape
    pick = _picks(scores, y)
    margins = np.maximum(0, scores - scores[pick][:, :, None] + margin)
    margins[pick] = 0
    loss = margins.reshape(t, -1).sum(axis=1).astype(np.float64) / n
    dscores = (margins > 0).astype(scores.dtype)
    dscores[pick] = -dscores.sum(axis=2)
    dscores /= n
    return loss, dscores
