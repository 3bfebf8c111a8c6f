"""Losses on class scores: each returns (mean loss over the batch, dscores)."""
from __future__ import annotations

import numpy as np


def softmax(scores: np.ndarray) -> np.ndarray:
    """Class probabilities, row by row. scores: (N, C) -> (N, C); the row max is
    subtracted first so exp() cannot overflow."""
    probs = np.exp(scores - scores.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    return probs


def softmax_cross_entropy(scores: np.ndarray, y: np.ndarray,
                          label_smoothing: float = 0.0) -> tuple[float, np.ndarray]:
    """Softmax cross-entropy. scores: (N, C), y: (N,) ints in [0, C).

    Subtracting each row's max before exponentiating keeps exp() from
    overflowing without changing the softmax. With ``label_smoothing`` e the
    target is (1 - e) * onehot + e / C.
    """
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    n, c = scores.shape
    shifted = scores - scores.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    sums = probs.sum(axis=1, keepdims=True)
    probs /= sums
    log_probs = shifted
    log_probs -= np.log(sums)
    rows = np.arange(n)
    if label_smoothing:
        target = np.full_like(scores, label_smoothing / c)
        target[rows, y] += 1.0 - label_smoothing
        loss = -float(np.vdot(target, log_probs)) / n
        probs -= target
    else:
        loss = -float(np.sum(log_probs[rows, y])) / n
        probs[rows, y] -= 1
    probs /= n
    return loss, probs


def svm_hinge(scores: np.ndarray, y: np.ndarray, margin: float = 1.0) -> tuple[float, np.ndarray]:
    """Multiclass SVM (Weston-Watkins) hinge: mean_i sum_{j != y_i} max(0, s_j - s_{y_i} + margin).

    scores: (N, C), y: (N,).
    """
    n = scores.shape[0]
    rows = np.arange(n)
    margins = np.maximum(0, scores - scores[rows, y][:, None] + margin)
    margins[rows, y] = 0
    loss = float(margins.sum()) / n
    dscores = (margins > 0).astype(scores.dtype)
    dscores[rows, y] = -dscores.sum(axis=1)
    dscores /= n
    return loss, dscores


LOSSES = {"softmax": softmax_cross_entropy, "svm": svm_hinge}
