"""The numpy backend (CPU): array-api-compat's numpy namespace plus Numba kernels."""
from __future__ import annotations

import numpy as np
from array_api_compat import numpy as np_xp

from refmtp.backends.base import Backend


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
        np.add.at(out, idx, vals)
        return out

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
