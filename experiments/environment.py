"""The machine a run or sweep ran on, recorded with it (config.json, a sweep's
environment.json) so that its numbers and its times can be compared with
another's: the same seed gives the same numbers only with the same BLAS kernel,
and seconds mean little without the CPU."""
from __future__ import annotations

import os
import platform
from datetime import datetime, timezone

import numpy as np

import mlp

ENVIRONMENT_FIELDS = {
    "nnx": "nnx", "python": "Python", "numpy": "NumPy", "blas": "BLAS", "blas_kernel": "BLAS kernel",
    "blas_threads": "BLAS threads", "openblas_coretype": "OPENBLAS_CORETYPE", "cpu": "CPU",
    "cores": "cores", "os": "operating system", "workers": "worker processes", "scheduler": "Dask scheduler",
    "nnx_settings": "NNX_ settings", "recorded": "recorded",
}
# The variables that change how nnx computes (kernels, conv algorithm, fused steps,
# threads, allocator): README, "Environment variables".
NNX_SETTINGS = ("NNX_KERNELS", "NNX_CONV_ALGORITHM", "NNX_FUSION", "NNX_THREADS", "NNX_SHARDS",
                "NNX_MALLOC_TUNING")


def environment() -> dict:
    """nnx, Python, NumPy and BLAS versions, the BLAS kernel OpenBLAS chose for this CPU
    (it decides the summation order), the CPU model, the operating system and the
    NNX_ variables set."""
    blas = _blas_info()
    return {"nnx": mlp.__version__, "python": platform.python_version(), "numpy": np.__version__,
            "blas": " ".join(str(blas[k]) for k in ("internal_api", "version") if blas.get(k)) or None,
            "blas_kernel": blas.get("architecture"), "blas_threads": blas.get("num_threads"),
            "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"), "cpu": cpu_model(),
            "cores": os.cpu_count(), "os": platform.platform(terse=True), "nnx_settings": nnx_settings(),
            "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def nnx_settings() -> str:
    """The NNX_ variables set for this process, as "NAME=value ...", or "none" (a report
    says "not recorded" only where a record has no such entry): NNX_KERNELS=reference,
    say, rounds differently from the fast kernels."""
    given = [f"{name}={os.environ[name]}" for name in NNX_SETTINGS if os.environ.get(name, "").strip()]
    return " ".join(given) or "none"


def _blas_info() -> dict:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:       # pragma: no cover - a dependency of nnx
        return {}
    return next((lib for lib in threadpool_info() if lib.get("user_api") == "blas"), {})


def cpu_model() -> str | None:
    """The CPU's model name (/proc/cpuinfo on Linux), else what the platform module says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None
