"""Weight initialisation schemes, all drawn from a seeded ``numpy.random.Generator``."""
from __future__ import annotations

import numpy as np

INIT_SCHEMES = ("he", "xavier", "normal", "dirac")


def init_std(scheme: str, fan_in: int, fan_out: int, weight_scale: float) -> float:
    """Standard deviation of the zero-mean Gaussian a scheme draws from.

    he:     sqrt(2 / fan_in), keeps activation variance constant through ReLUs.
    xavier: sqrt(2 / (fan_in + fan_out)), Glorot & Bengio, for tanh/sigmoid.
    normal: the fixed ``weight_scale`` (the cs231n notes' ``0.01 * randn``).
    (dirac draws from a uniform distribution: see ``init_weight``.)
    """
    if scheme == "he":
        return float(np.sqrt(2.0 / fan_in))
    if scheme == "xavier":
        return float(np.sqrt(2.0 / (fan_in + fan_out)))
    if scheme == "normal":
        return float(weight_scale)
    if scheme == "dirac":
        return float(np.sqrt(1.0 / (3 * fan_in)))     # the std of U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    raise ValueError(f"unknown init scheme {scheme!r}; choose from {', '.join(INIT_SCHEMES)}")


def init_weight(shape: tuple[int, ...], fan_in: int, fan_out: int, scheme: str,
                weight_scale: float, rng: np.random.Generator | None, dtype) -> np.ndarray:
    """A weight array of ``shape`` drawn from ``rng`` (None: a generator seeded with 0, so
    a layer made without one gets the same weights every time, never zeros).

    dirac (airbench's identity init, for conv filters (F, C, K, K)): PyTorch's default
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)), then the first min(F, C) filters replaced by
    the identity (filter i passes channel i through its centre tap, K // 2), so a
    stack of such convs starts near the identity map. Other shapes just get the
    uniform draw.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    if scheme == "dirac":
        bound = 1.0 / np.sqrt(fan_in)
        w = rng.uniform(-bound, bound, shape)
        if len(shape) == 4:
            n, (k_h, k_w) = min(shape[0], shape[1]), shape[2:]
            w[:n] = 0.0
            w[np.arange(n), np.arange(n), k_h // 2, k_w // 2] = 1.0
        return w.astype(dtype)
    std = init_std(scheme, fan_in, fan_out, weight_scale)
    return (std * rng.standard_normal(shape)).astype(dtype)
