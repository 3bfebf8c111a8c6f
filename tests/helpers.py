"""Shared test helpers."""
import pickle
from pathlib import Path

import numpy as np

from experiments.cifar10 import BATCHES_DIR, CLASSES

PER_BATCH = 8


def assert_close(actual, expected, rtol: float = 1e-6, err_msg: str = "") -> None:
    """max |actual - expected| <= rtol * max |expected|, over the whole array.

    For numbers computed in another summation order (another BLAS kernel,
    another block split): an entry near zero carries the rounding error of the
    large terms that cancelled in it, so an entry-by-entry relative tolerance
    fails on some CPUs and not on others. Scaled to the array, it does not.
    """
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{err_msg} shapes {actual.shape} != {expected.shape}"
    scale = float(np.max(np.abs(expected), initial=0.0))
    error = float(np.max(np.abs(actual - expected), initial=0.0))
    assert error <= rtol * scale, (f"{err_msg} max abs error {error:.3g} > {rtol:g} x max |expected| "
                                   f"{scale:.3g} (relative {error / max(scale, 1e-300):.3g})")


def flat(output: str) -> str:
    """CLI output with Rich's box drawing and line wrapping undone, for substring checks."""
    return " ".join(output.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())


# ---- a tiny CIFAR-10 in the official layout --------------------------------------------
def make_batches(seed: int = 0, per_batch: int = PER_BATCH) -> dict[str, dict]:
    """The six pickled dicts of the official archive, ``per_batch`` images each."""
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    batches = {}
    for name in names:
        batches[name] = {b"batch_label": name.encode(),
                         b"data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
                         b"labels": [int(v) for v in rng.integers(0, 10, size=per_batch)]}
    batches["batches.meta"] = {b"label_names": [c.encode() for c in CLASSES],
                               b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    return batches


def write_batches(data_dir: Path, batches: dict[str, dict]) -> Path:
    folder = data_dir / BATCHES_DIR
    folder.mkdir(parents=True)
    for name, obj in batches.items():
        (folder / name).write_bytes(pickle.dumps(obj, protocol=2))
    return folder
