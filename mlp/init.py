"""Weight initialisation schemes, all drawn from a seeded ``numpy.random.Generator``."""
from __future__ import annotations

import numpy as np

INIT_SCHEMES = ("he", "xavier", "normal")


def init_std(scheme: str, fan_in: int, fan_out: int, weight_scale: float) -> float:
    """Standard deviation of the zero-mean Gaussian a scheme draws from.

    he:     sqrt(2 / fan_in), keeps activation variance constant through ReLUs.
    xavier: sqrt(2 / (fan_in + fan_out)), Glorot & Bengio, for tanh/sigmoid.
    normal: the fixed ``weight_scale`` (the cs231n notes' ``0.01 * randn``).
    """
    if scheme == "he":
        return float(np.sqrt(2.0 / fan_in))
    if scheme == "xavier":
        return float(np.sqrt(2.0 / (fan_in + fan_out)))
    if scheme == "normal":
        return float(weight_scale)
    raise ValueError(f"unknown init scheme {scheme!r}; choose from {', '.join(INIT_SCHEMES)}")


def init_weight(shape: tuple[int, ...], fan_in: int, fan_out: int, scheme: str,
                weight_scale: float, rng: np.random.Generator | None, dtype) -> np.ndarray:
    """A weight array of ``shape``; zeros when ``rng`` is None (to be filled by a load)."""
    if rng is None:
        return np.zeros(shape, dtype=dtype)
    std = init_std(scheme, fan_in, fan_out, weight_scale)
    return (std * rng.standard_normal(shape)).astype(dtype)
