"""The cupy backend (NVIDIA GPU): array-api-compat's cupy namespace plus CuPy RawKernels.

Importing this module never touches the GPU; constructing :class:`CupyBackend` checks that
cupy imports and that a CUDA device answers, and raises BackendUnavailable otherwise.
"""
from __future__ import annotations

import numpy as np

from refmtp.backends.base import Backend, BackendUnavailable


def _probe_cupy():
    """Return the cupy module, or raise BackendUnavailable naming what is missing."""
    try:
        import cupy
    except ImportError as exc:
        raise BackendUnavailable(
            f"cupy backend unavailable: cupy is not importable ({exc}); "
            "install it with: pip install 'refmtp[cupy]' (needs an NVIDIA GPU and CUDA 12)"
        ) from None
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError, driver missing, ...
        raise BackendUnavailable(
            f"cupy backend unavailable: no CUDA device (getDeviceCount failed: {exc}); "
            "run on a machine with an NVIDIA GPU and driver, or use --backend numpy"
        ) from None
    if n < 1:
        raise BackendUnavailable(
            "cupy backend unavailable: cupy imports but reports 0 CUDA devices; "
            "use --backend numpy"
        )
    return cupy


class CupyBackend(Backend):
    name = "cupy"

    def __init__(self):
        super().__init__()
        cupy = _probe_cupy()
        from array_api_compat import cupy as cp_xp

        self._raw = cupy
        self.xp = cp_xp

    def asarray(self, a, dtype=None):
        cupy = self._raw
        if dtype is None:
            return cupy.asarray(a)
        return cupy.asarray(a, dtype=self.dtype(dtype))

    def to_numpy(self, a) -> np.ndarray:
        if isinstance(a, np.ndarray):
            return a
        return self._raw.asnumpy(a)  # explicit device -> host copy

    def scatter_add(self, out, idx, vals):
        # Not cupyx.scatter_add: its float atomicAdd sums duplicates in a scheduling-dependent
        # order (run-to-run differences in the last bit). The RawKernel in scatter_add.cu adds
        # them in index order, bit-identical to np.add.at on the numpy backend.
        from refmtp.backends.cupy_scatter import scatter_add

        return scatter_add(out, idx, vals)

    def _load_kernels(self) -> dict:
        from refmtp.backends import cupy_table  # the wrappers, deferred until a GPU is used

        return cupy_table.collect()

    def describe(self) -> dict:
        cupy = self._raw
        props = cupy.cuda.runtime.getDeviceProperties(0)
        name = props["name"]
        if isinstance(name, bytes):
            name = name.decode()
        return {
            "name": self.name,
            "cupy": cupy.__version__,
            "gpu": name,
            "driver": cupy.cuda.runtime.driverGetVersion(),
            "runtime": cupy.cuda.runtime.runtimeGetVersion(),
        }
