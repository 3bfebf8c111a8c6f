"""Optimizers with per-parameter state, and learning-rate schedules.

Each optimizer updates parameters in place: ``step(params, grads)`` with the
dicts ``Network.params`` / ``Network.grads``. ``lr`` is an attribute the
trainer sets from the schedule before every step.
"""
from __future__ import annotations

import math

import numpy as np


class Optimizer:
    """Updates parameters in place from their gradients.

    ``lr`` is the current learning rate (the trainer sets it from the schedule
    before every step); ``base_lr`` is the one it was made with. Per parameter
    name, ``lr_scales`` multiplies the learning rate (BatchNorm biases learning
    faster, say) and a scale of 0 freezes the parameter: it is not updated and
    keeps no state. ``weight_decay`` shrinks every updated parameter by that
    fraction per step at the base learning rate (``weight_decay * lr / base_lr``
    as the schedule moves, whatever the parameter's scale): it is added to the
    gradient as ``weight_decay / (base_lr * scale) * w``, so it flows through
    momentum like an L2 term, but its strength does not change with the choice
    of ``lr`` (airbench's decoupled parametrisation). It applies to every
    parameter, biases included, unlike the network's ``reg``.
    """

    default_lr = 1e-2

    def __init__(self, lr: float | None = None, weight_decay: float = 0.0):
        self.lr = self.default_lr if lr is None else float(lr)
        self.base_lr = self.lr
        self.weight_decay = float(weight_decay)
        self.lr_scales: dict[str, float] = {}
        self.state: dict[str, dict[str, np.ndarray]] = {}

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        for name, w in params.items():
            scale = self.lr_scales.get(name, 1.0)
            if scale == 0:
                continue
            if name not in self.state:
                self.state[name] = self.init_state(w)
            dw = grads[name]
            if self.weight_decay:
                dw = dw + (self.weight_decay / (self.base_lr * scale)) * w
            self.update(w, dw, self.state[name], self.lr * scale)

    def init_state(self, w: np.ndarray) -> dict[str, np.ndarray]:
        return {}

    def update(self, w: np.ndarray, dw: np.ndarray, state: dict, lr: float) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, np.ndarray]:
        """Flat ``{"param/slot": array}`` for checkpoints."""
        return {f"{name}/{slot}": np.asarray(v) for name, s in self.state.items() for slot, v in s.items()}

    def load_state_dict(self, flat: dict[str, np.ndarray]) -> None:
        self.state = {}
        for key, value in flat.items():
            name, slot = key.rsplit("/", 1)
            self.state.setdefault(name, {})[slot] = np.array(value)


class SGD(Optimizer):
    """w -= lr * dw."""

    default_lr = 1e-1

    def update(self, w, dw, state, lr):
        w -= lr * dw


class Momentum(Optimizer):
    """v = mu * v + dw;  w -= lr * v.

    With a constant lr this is the cs231n form (v = mu * v - lr * dw; w += v)
    with v scaled by -lr; keeping the learning rate out of the velocity makes a
    scheduled lr act on the step it is set for, as PyTorch's SGD does.
    """

    default_lr = 1e-2

    def __init__(self, lr=None, mu: float = 0.9, weight_decay: float = 0.0):
        super().__init__(lr, weight_decay)
        self.mu = float(mu)

    def init_state(self, w):
        return {"v": np.zeros_like(w)}

    def update(self, w, dw, state, lr):
        v = state["v"]
        v *= self.mu
        v += dw
        w -= lr * v


class Nesterov(Momentum):
    """Nesterov momentum: v = mu * v + dw;  w -= lr * (dw + mu * v).

    With a constant lr this is the cs231n form (v_prev = v; v = mu * v - lr * dw;
    w += -mu * v_prev + (1 + mu) * v), as PyTorch's nesterov=True is."""

    def update(self, w, dw, state, lr):
        v = state["v"]
        v *= self.mu
        v += dw
        step = self.mu * v
        step += dw
        step *= lr
        w -= step


class Adagrad(Optimizer):
    """cache += dw**2;  w -= lr * dw / (sqrt(cache) + eps)."""

    default_lr = 1e-2

    def __init__(self, lr=None, eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(lr, weight_decay)
        self.eps = float(eps)

    def init_state(self, w):
        return {"cache": np.zeros_like(w)}

    def update(self, w, dw, state, lr):
        cache = state["cache"]
        cache += dw * dw
        w -= lr * dw / (np.sqrt(cache) + self.eps)


class RMSprop(Optimizer):
    """cache = decay * cache + (1 - decay) * dw**2;  w -= lr * dw / (sqrt(cache) + eps)."""

    default_lr = 1e-3

    def __init__(self, lr=None, decay: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(lr, weight_decay)
        self.decay, self.eps = float(decay), float(eps)

    def init_state(self, w):
        return {"cache": np.zeros_like(w)}

    def update(self, w, dw, state, lr):
        cache = state["cache"]
        cache *= self.decay
        cache += (1 - self.decay) * dw * dw
        w -= lr * dw / (np.sqrt(cache) + self.eps)


class Adam(Optimizer):
    """Kingma & Ba. The step count t is incremented before the bias correction:
    m = b1 m + (1-b1) dw;  v = b2 v + (1-b2) dw^2;
    w -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)."""

    default_lr = 1e-3

    def __init__(self, lr=None, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(lr, weight_decay)
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)

    def init_state(self, w):
        return {"m": np.zeros_like(w), "v": np.zeros_like(w), "t": np.zeros(())}

    def update(self, w, dw, state, lr):
        state["t"] += 1
        t = float(state["t"])
        m, v = state["m"], state["v"]
        m *= self.beta1
        m += (1 - self.beta1) * dw
        v *= self.beta2
        v += (1 - self.beta2) * dw * dw
        m_hat = m / (1 - self.beta1 ** t)
        v_hat = v / (1 - self.beta2 ** t)
        w -= lr * m_hat / (np.sqrt(v_hat) + self.eps)


class Adadelta(Optimizer):
    """Zeiler's Adadelta, as in the ConvNetJS CIFAR-10 demo:
    g2 = rho g2 + (1-rho) dw^2;  dx = -sqrt(x2 + eps) / sqrt(g2 + eps) * dw;
    x2 = rho x2 + (1-rho) dx^2;  w += lr * dx.  lr = 1 is Zeiler's (and ConvNetJS's) rule."""

    default_lr = 1.0

    def __init__(self, lr=None, rho: float = 0.95, eps: float = 1e-6, weight_decay: float = 0.0):
        super().__init__(lr, weight_decay)
        self.rho, self.eps = float(rho), float(eps)

    def init_state(self, w):
        return {"g2": np.zeros_like(w), "x2": np.zeros_like(w)}

    def update(self, w, dw, state, lr):
        g2, x2 = state["g2"], state["x2"]
        g2 *= self.rho
        g2 += (1 - self.rho) * dw * dw
        dx = -np.sqrt(x2 + self.eps) / np.sqrt(g2 + self.eps) * dw
        x2 *= self.rho
        x2 += (1 - self.rho) * dx * dx
        w += lr * dx


OPTIMIZERS: dict[str, type[Optimizer]] = {
    "sgd": SGD, "momentum": Momentum, "nesterov": Nesterov, "adagrad": Adagrad,
    "rmsprop": RMSprop, "adam": Adam, "adadelta": Adadelta,
}


def make_optimizer(name: str, lr: float | None = None, momentum: float = 0.9,
                   weight_decay: float = 0.0) -> Optimizer:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    cls = OPTIMIZERS[name]
    if issubclass(cls, Momentum):
        return cls(lr, mu=momentum, weight_decay=weight_decay)
    return cls(lr, weight_decay=weight_decay)


# ---- learning-rate schedules -----------------------------------------------------
SCHEDULES = ("constant", "step", "cosine", "linear")


class Schedule:
    """Learning rate as a function of training progress in epochs (fractional).

    constant: base_lr.
    step:     base_lr * lr_decay ** floor(epoch / step_size)  (a decay every step_size epochs).
    cosine:   a linear warm-up over ``warmup`` epochs from ``warmup_from`` * base_lr,
              then half a cosine from base_lr down to min_lr at ``total`` epochs.
    linear:   the same warm-up, then a straight line down to min_lr at ``total``
              (airbench's triangle).
    ``warmup_share``, when given, makes the warm-up that share of ``total``
    (airbench peaks at 23 % of its run) instead of ``warmup`` epochs. ``total``
    may move while training runs (a time budget re-plans it); a share moves with it.
    """

    def __init__(self, kind: str, base_lr: float, total: float = 1.0, step_size: int = 1,
                 lr_decay: float = 0.1, warmup: float = 0.0, min_lr: float = 0.0,
                 warmup_from: float = 0.0, warmup_share: float | None = None):
        if kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {kind!r}; choose from {', '.join(SCHEDULES)}")
        self.kind, self.base_lr, self.total = kind, float(base_lr), float(total)
        self.step_size, self.lr_decay = int(step_size), float(lr_decay)
        self.min_lr, self.warmup_from = float(min_lr), float(warmup_from)
        self.warmup_epochs, self.warmup_share = float(warmup), warmup_share

    @property
    def warmup(self) -> float:
        """The warm-up in epochs, now: ``warmup_share`` of the current total, or fixed."""
        return self.warmup_epochs if self.warmup_share is None else self.warmup_share * self.total

    def __call__(self, epoch: float) -> float:
        if self.kind == "constant":
            return self.base_lr
        if self.kind == "step":
            return self.base_lr * self.lr_decay ** math.floor(epoch / self.step_size)
        if self.warmup and epoch < self.warmup:
            start = self.warmup_from * self.base_lr
            return start + (self.base_lr - start) * (epoch + 1e-12) / self.warmup
        span = max(self.total - self.warmup, 1e-12)
        progress = min(max((epoch - self.warmup) / span, 0.0), 1.0)
        if self.kind == "linear":
            return self.base_lr + (self.min_lr - self.base_lr) * progress
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * progress))
