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

Every parameter of every trial lives in one array, ``flat``, layer by layer
([W; b] of each trial), so that an optimizer step is one pass over the stack;
the trials' own ``Network`` objects are rebound to views of their parts of it:
they always show the stacked parameters, for saving, evaluating and snapshots.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from mlp.layers import Dropout, LeakyReLU, Linear, ReLU, Sigmoid, Tanh
from mlp.losses import LOSSES
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


@functools.cache
def bias_in_product(n: int, fan_in: int, fan_out: int, dtype: str) -> tuple[bool, bool]:
    """Whether this machine's BLAS may carry a layer's bias as one more row of its weights,
    for a batch of n rows: (forward) [x, 1] @ [W; b] with exactly the bits of x @ W + b;
    (backward) [x, 1]^T @ d with exactly those of x^T @ d and, in its last row, of
    np.sum(d, axis=0). True when the kernels for these sizes add along the inner
    dimension in order, one multiply-add at a time. Measured here: OpenBLAS's SkylakeX
    kernels do for the gradients (but with one column) and for short products; its
    Haswell and Zen kernels sum the gradients in another order. Checked once per size."""
    rng = np.random.default_rng([n, fan_in, fan_out])

    def numbers(*shape):
        # magnitudes from 1e-6 to 1e6: any other order of a sum changes its rounding
        return (rng.standard_normal(shape) * 10.0 ** rng.uniform(-6, 6, shape)).astype(dtype)

    forward, backward = True, True
    for _ in range(3):
        x, w, b, d = numbers(n, fan_in), numbers(fan_in, fan_out), numbers(fan_out), numbers(n, fan_out)
        x1, wb = np.c_[x, np.ones(n, dtype)], np.r_[w, b[None]]
        expected = x @ w
        expected += b
        grad = x1.T @ d
        forward &= bool(np.array_equal(x1 @ wb, expected))
        backward &= bool(np.array_equal(grad[:-1], x.T @ d) and np.array_equal(grad[-1], np.sum(d, axis=0)))
    return forward, backward


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
        self._fold_cache: dict[tuple, tuple[bool, bool]] = {}
        self._picks: tuple = (None, None, None)       # (shape, y, picks) of the last shared y
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
    # Every layer's input carries one more column: ones going forward, [x, 1], so that a
    # layer is one product [x, 1] @ [W; b] (its block) wherever the BLAS gives that the
    # bits of x @ W + b (``bias_in_product``); zeros coming back, so that the elementwise
    # passes of the backward run over whole buffers, and [x, 1]^T @ d is [dW; db] at once.
    def forward(self, X: np.ndarray, train: bool = False) -> np.ndarray:
        """X: (N, D) shared by every trial, or (T, N, D) one batch per trial -> scores (T, N, C)."""
        x = self.input(X)
        self._inputs, self._outputs, self._drop_masks, self._act_masks = [x], [], [], {}
        for k in range(self.depth):
            shape = (self.size, x.shape[-2])
            h1 = self._buffer("forward", k, shape, 1.0)             # [h, 1]
            h = h1[..., :-1]
            self._affine(x, k, out=h)
            dropout = self._dropout_mask(k, shape[1]) if train and self.has_dropout[k] else None
            if self.activation == "relu":
                np.maximum(h1, 0, out=h1)                     # in place; the ones stay ones
                out = h1
                if dropout is not None:
                    h1 *= dropout                             # the backward needs only h > 0
            elif dropout is None:
                out = self._activate(h, k, out=h)
            else:
                out = self._activate(h, k, out=np.empty(h.shape, self.dtype))   # kept for the backward
                np.multiply(out, dropout[..., :-1], out=h)
            self._outputs.append(out)
            self._drop_masks.append(dropout)
            self._inputs.append(h1)
            x = h1
        return self._affine(x, self.depth)

    def _folds(self, x: np.ndarray, k: int) -> tuple[bool, bool]:
        """Whether layer k's product carries its bias, forward and backward, for input x."""
        key = (k, x.shape[-2])
        folds = self._fold_cache.get(key)
        if folds is None:
            folds = self._fold_cache[key] = bias_in_product(x.shape[-2], self.widths[k], self.widths[k + 1],
                                                            self.dtype.str)
        return folds

    def _affine(self, x: np.ndarray, k: int, out: np.ndarray | None = None) -> np.ndarray:
        """Layer k: x @ W + b: (T, N, w_{k+1}), for x = [x, 1]."""
        if self._folds(x, k)[0]:
            return np.matmul(x, self.param_blocks[k], out=out)
        a = np.matmul(x[..., :-1], self.W[k], out=out)
        if a.shape[-1] >= SEQUENTIAL_SUM or a.shape[0] * a.shape[1] < BY_ROWS:
            a += self.b[k]
        else:       # a few outputs (the classes): column by column, as in by_rows
            for j in range(a.shape[-1]):
                a[..., j] += self.b[k][..., j]
        return a

    def _buffer(self, kind: str, k: int, shape: tuple[int, int], last: float) -> np.ndarray:
        """A (T, n, w_{k+1} + 1) buffer for hidden layer k, its last column ``last``, kept
        from step to step: the column is written once, the memory reused."""
        key = (kind, k, shape)
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = self._buffers[key] = np.empty((*shape, self.widths[k + 1] + 1), self.dtype)
            buffer[..., -1] = last
        return buffer

    def _activate(self, a: np.ndarray, k: int, out: np.ndarray) -> np.ndarray:
        """The activation (but the ReLU) of hidden layer k into ``out``, as its layer computes it."""
        kind = self.activation
        if kind == "tanh":
            return np.tanh(a, out=out)
        if kind == "leaky_relu":
            self._act_masks[k] = mask = a > 0
            out[...] = np.where(mask, a, self.alpha * a)
            return out
        out[...] = 0.5 * (1 + np.tanh(0.5 * a))
        if self.unit_masks[k] is not None:
            out *= self.unit_masks[k]
        return out

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

    def backward(self, dscores: np.ndarray) -> None:
        """dscores: (T, N, C); fills ``flat_grad`` (every dW[k], db[k]) and adds L2's reg * W."""
        d = dscores
        for k in range(self.depth, -1, -1):
            x = self._inputs[k]
            xT = x.T if x.ndim == 2 else x.transpose(0, 2, 1)
            if self._folds(x, k)[1]:                      # [x, 1]^T @ d = [dW; db]
                np.matmul(xT, d, out=self.grad_blocks[k])
            else:
                np.matmul(xT[..., :-1, :], d, out=self.dW[k])
                np.sum(d, axis=1, keepdims=True, out=self.db[k])
            if k == 0:
                break
            dx1 = self._buffer("backward", k - 1, x.shape[:2], 0.0)     # [dx, 0]
            np.matmul(d, self.W[k].transpose(0, 2, 1), out=dx1[..., :-1])
            if self._drop_masks[k - 1] is not None:
                dx1 *= self._drop_masks[k - 1]
            d = self._activation_backward(dx1, k - 1)
        if self.any_reg:
            # reg * W on weights, reg * 0 on biases: one pass over every parameter
            self.flat_grad += np.multiply(self.reg_flat, self.flat, out=self._scratch)

    def _activation_backward(self, dout1: np.ndarray, k: int) -> np.ndarray:
        """dout1 = [dout, 0]: (T, n, w + 1) -> the gradient on hidden layer k's input
        (a view (T, n, w))."""
        kind = self.activation
        if kind == "relu":
            # dout * (x > 0), and x > 0 where the ReLU's output is (after dropout too, which
            # zeroed dout where it zeroed the output); the extra column stays 0
            mask = np.greater(self._inputs[k + 1], 0, out=self._buffer("mask", k, dout1.shape[:2], 1.0))
            return np.multiply(dout1, mask, out=dout1)[..., :-1]     # 1.0 or 0.0, as True or False
        dout = dout1[..., :-1]
        if kind == "leaky_relu":
            return np.where(self._act_masks[k], dout, self.alpha * dout)
        out = self._outputs[k]
        if kind == "tanh":
            return dout * (1 - out ** 2)
        return dout * out * (1 - out)

    # ---- losses ----------------------------------------------------------------------
    def data_loss(self, scores: np.ndarray, y: np.ndarray, gradient: bool = True
                  ) -> tuple[np.ndarray, np.ndarray | None]:
        """Per-trial mean loss (T,) and dscores (T, N, C) (None without ``gradient``);
        y: (N,) or (T, N)."""
        if self.size == 1 and y.ndim < 3:
            # a stack of one: the solo loss itself, in fewer (if slower) numpy calls
            solo = LOSSES[self.loss_name]
            labels = y if y.ndim == 1 else y[0]
            loss, dscores = solo(scores[0], labels, float(self.label_smoothing[0])) \
                if self.loss_name == "softmax" else solo(scores[0], labels)
            return np.array([loss]), dscores[None]
        if y.ndim == 1:             # one y for every trial (a full batch, the validation split)
            if self._picks[1] is not y or self._picks[0] != scores.shape:
                self._picks = (scores.shape, y, picks(scores, y))
            pick = self._picks[2]
        else:
            pick = picks(scores, y)
        if self.loss_name == "softmax":
            return softmax_cross_entropy(scores, y, self.label_smoothing if self.any_smoothing else None,
                                         gradient, pick)
        return svm_hinge(scores, y, gradient=gradient, pick=pick)

    def reg_loss(self) -> np.ndarray:
        """0.5 * reg * sum(W**2) over every weight, per trial: (T,). Each weight's sum of
        squares is one BLAS dot over the trial's row, as ``np.vdot`` takes it alone."""
        if not self.any_reg:
            return np.zeros(self.size)
        total = 0
        for row, column in self.weight_pairs:
            # float() of each dot in the solo sum: added in float64 whatever the dtype
            total = total + np.matmul(row, column)[:, 0, 0].astype(np.float64, copy=False)
        loss = self.half_reg * total
        return loss if self.all_reg else np.where(self.reg == 0, 0.0, loss)

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
        loss, _ = self.data_loss(scores, y, gradient=False)
        return loss + self.reg_loss(), np.add.reduce(scores.argmax(axis=2) == y, axis=1) / len(y)


def picks(scores: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The flat index of each row's true class: scores.reshape(-1)[picks(scores, y)] is
    (T, N), C-ordered, so that its sum over N is numpy's pairwise sum of a contiguous row,
    as the solo loss sums it. y: (N,) or (T, N)."""
    t, n, c = scores.shape
    return (np.arange(t)[:, None] * n + np.arange(n)) * c + y


# numpy sums a row of fewer numbers than this left to right (longer rows pairwise)
SEQUENTIAL_SUM = 8
# rows (T * N) from which by_rows works column by column: below, the per-row loop is cheaper
# than a call per class (measured: about even near 2,000 rows of 3 classes)
BY_ROWS = 4096


def row_max(a: np.ndarray) -> np.ndarray:
    """a.max(axis=2, keepdims=True) for a: (T, N, C). A few classes go column by column: a
    reduction along a short axis loops in C once per row."""
    if a.shape[2] >= SEQUENTIAL_SUM:
        return a.max(axis=2, keepdims=True)
    out = a[:, :, :1].copy()
    for j in range(1, a.shape[2]):
        np.maximum(out, a[:, :, j:j + 1], out=out)
    return out


def row_sum(a: np.ndarray) -> np.ndarray:
    """a.sum(axis=2, keepdims=True) for a: (T, N, C), in the order numpy sums each row
    (left to right for a few classes, which go column by column)."""
    if a.shape[2] >= SEQUENTIAL_SUM:
        return a.sum(axis=2, keepdims=True)
    out = a[:, :, :1].copy()
    for j in range(1, a.shape[2]):
        out += a[:, :, j:j + 1]
    return out


def by_rows(op, a: np.ndarray, column: np.ndarray, out: np.ndarray) -> np.ndarray:
    """op(a, column, out=out) for a: (T, N, C) and column: (T, N, 1); many rows of a few
    classes go column by column (broadcast along a short axis, the ufunc loops once per row)."""
    if a.shape[2] >= SEQUENTIAL_SUM or a.shape[0] * a.shape[1] < BY_ROWS:
        return op(a, column, out=out)
    for j in range(a.shape[2]):
        op(a[:, :, j], column[:, :, 0], out=out[:, :, j])
    return out


def softmax_cross_entropy(scores: np.ndarray, y: np.ndarray, label_smoothing: np.ndarray | None = None,
                          gradient: bool = True, pick: np.ndarray | None = None
                          ) -> tuple[np.ndarray, np.ndarray | None]:
    """``mlp.losses.softmax_cross_entropy`` of every trial: scores (T, N, C), y (N,) or
    (T, N), label_smoothing (T,) or None -> loss (T,), dscores (T, N, C) (or None
    without ``gradient``: the same loss, fewer passes). ``pick``: picks(scores, y), if
    already made."""
    t, n, c = scores.shape
    shifted = by_rows(np.subtract, scores, row_max(scores), np.empty_like(scores))
    probs = np.exp(shifted)
    sums = row_sum(probs)
    if gradient:
        by_rows(np.divide, probs, sums, probs)
    log_probs = by_rows(np.subtract, shifted, np.log(sums), shifted)
    pick = picks(scores, y) if pick is None else pick
    flat_probs = probs.reshape(-1)
    loss = -log_probs.reshape(-1).take(pick).sum(axis=1).astype(np.float64, copy=False) / n  # float(sum)/n
    if not gradient:
        if label_smoothing is not None:
            for i in np.flatnonzero(label_smoothing):
                loss[i] = -float(np.vdot(_smoothed_target(label_smoothing[i], y if y.ndim == 1 else y[i],
                                                          n, c, scores.dtype), log_probs[i])) / n
        return loss, None
    if label_smoothing is None or not label_smoothing.any():
        np.put(flat_probs, pick, flat_probs.take(pick) - 1)
    else:
        # rare in a stack: the smoothed trials one by one, as the solo loss takes them
        for i in np.flatnonzero(label_smoothing):
            target = _smoothed_target(label_smoothing[i], y if y.ndim == 1 else y[i], n, c, scores.dtype)
            loss[i] = -float(np.vdot(target, log_probs[i])) / n
            probs[i] -= target
        plain = pick[label_smoothing == 0]
        np.put(flat_probs, plain, flat_probs.take(plain) - 1)
    probs /= n
    return loss, probs


def _smoothed_target(e: float, y: np.ndarray, n: int, c: int, dtype) -> np.ndarray:
    """(1 - e) * onehot(y) + e / c, as the solo loss builds it: (n, c)."""
    target = np.full((n, c), e / c, dtype=dtype)
    target[np.arange(n), y] += 1.0 - e
    return target


def svm_hinge(scores: np.ndarray, y: np.ndarray, margin: float = 1.0, gradient: bool = True,
              pick: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """``mlp.losses.svm_hinge`` of every trial: scores (T, N, C), y (N,) or (T, N)."""
    t, n, _ = scores.shape
    pick = picks(scores, y) if pick is None else pick
    true = scores.reshape(-1).take(pick)[:, :, None]
    margins = np.maximum(0, by_rows(np.subtract, scores, true, np.empty_like(scores)) + margin)
    np.put(margins.reshape(-1), pick, 0)
    loss = margins.reshape(t, -1).sum(axis=1).astype(np.float64, copy=False) / n
    if not gradient:
        return loss, None
    dscores = (margins > 0).astype(scores.dtype)
    np.put(dscores.reshape(-1), pick, -row_sum(dscores)[:, :, 0])
    dscores /= n
    return loss, dscores
