"""The numpy backend (CPU): array-api-compat's numpy namespace plus Numba kernels."""
from __future__ import annotations

import ctypes
import ctypes.util

import numpy as np
from array_api_compat import numpy as np_xp

from refmtp.backends.base import Backend, kernels_enabled

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_HEAP_KEPT = False


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the OS.

    A training step frees its forward caches (hundreds of MB) in the backward; by default glibc
    hands blocks over 128 KiB back with munmap (or trims the heap top), so the next step's arrays
    start on fresh pages and every page faults and is zeroed again (about 5% of a small-preset
    step here). With mmap used only above 32 MiB and no trimming, the step reuses its own heap;
    the resident memory stays at the step's peak between steps (trimmed only beyond 2 GiB, the
    largest value mallopt takes). Process-wide and idempotent;
    numerics are unchanged. Returns whether the setting was applied (False off glibc).
    """
    global _HEAP_KEPT
    if _HEAP_KEPT:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    _HEAP_KEPT = bool(mallopt(_M_MMAP_THRESHOLD, 32 * 2 ** 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))
    return _HEAP_KEPT


def _rows_kernel_fits(out, idx, vals) -> bool:
    """Whether the row scatter-add kernel applies (otherwise np.add.at, whose semantics it copies)."""
    if not (kernels_enabled() and isinstance(out, np.ndarray) and isinstance(idx, np.ndarray)
            and isinstance(vals, np.ndarray)):
        return False
    if out.ndim != 2 or not out.flags.c_contiguous or out.dtype not in (np.float32, np.float64):
        return False
    if idx.ndim != 1 or idx.dtype != np.int64 or not idx.size or vals.dtype != out.dtype:
        return False
    if vals.shape != (idx.size, out.shape[1]) or not vals.flags.c_contiguous:
        return False
    return bool(idx.min() >= 0 and idx.max() < out.shape[0])


class NumpyBackend(Backend):
    name = "numpy"
    xp = np_xp
    _raw = np

    def asarray(self, a, dtype=None):
        if type(a).__module__.split(".")[0] == "cupy":
            a = a.get()  # explicit device -> host copy
        if dtype is None:
            return np.asarray(a)
        return np.asarray(a, dtype=self.dtype(dtype))

    def to_numpy(self, a) -> np.ndarray:
        return np.asarray(a)

    def scatter_add(self, out, idx, vals):
        if _rows_kernel_fits(out, idx, vals):
            from refmtp.backends.numba_scatter import scatter_add_rows_numba

            scatter_add_rows_numba(out, idx, vals)  # np.add.at's adds in its order (backends/numba_scatter.py)
        else:
            np.add.at(out, idx, vals)
        return out

    def prepare_training(self) -> None:
        keep_freed_memory()

    def prepare_worker_thread(self) -> None:
        # Numba's thread count is per thread (a new thread starts at NUMBA_NUM_THREADS, all the
        # cores): without this, every worker's prange kernels would start a pool of their own
        from refmtp.backends import numba_kernels

        numba_kernels.set_thread_count()

    def concurrent_microbatches(self) -> bool:
        from refmtp.backends import numba_kernels

        return numba_kernels.concurrent_launch_safe()

    def _load_kernels(self) -> dict:
        # Numba kernels compile lazily on first call (cache=True keeps them between runs).
        from refmtp.backends import numba_kernels

        return numba_kernels.KERNELS

    def describe(self) -> dict:
        info = {"name": self.name, "numpy": np.__version__}
        try:
            import numba

            info["numba"] = numba.__version__
        except ImportError:  # pragma: no cover - numba is a hard dependency
            info["numba"] = "missing"
        return info
