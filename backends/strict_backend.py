"""The array-API-strict backend (CPU, tests only): proves ``refmtp/`` uses only the standard.

``array_api_strict`` is the standard's minimal implementation: every function, method and
promotion rule outside the array-API standard raises. Running the math on its arrays
(tests/test_strict_lane.py) checks that every backend special case lives in ``backends/``.

Everything here is written with standard functions only: no kernels, no numpy on the arrays
(numpy is used on the host for the PCG64 draws, exactly as on the other backends, and for
moving data in and out). ``get_backend("strict")`` builds it; it is not in ``BACKEND_NAMES``
(``refmtp info`` and the CLI list the user-facing backends only).
"""
from __future__ import annotations

import numpy as np

from refmtp.backends.base import Backend, BackendUnavailable


def _probe_strict():
    try:
        import array_api_strict
    except ImportError as exc:
        raise BackendUnavailable(
            f"strict backend unavailable: array_api_strict is not importable ({exc}); "
            "install it with: pip install 'refmtp[test]'"
        ) from None
    return array_api_strict


class StrictBackend(Backend):
    name = "strict"

    def __init__(self):
        super().__init__()
        self.xp = _probe_strict()
        self._raw = self.xp
        self._array_type = type(self.xp.asarray(0))

    def dtype(self, name):
        if not isinstance(name, str):  # a strict dtype object, or a numpy one
            for n in ("float32", "float64", "int64", "int32", "bool", "uint8", "float16"):
                if name == getattr(self.xp, n) or (not hasattr(name, "_np_dtype")
                                                   and np.dtype(name).name == n):
                    return getattr(self.xp, n)
        return super().dtype(name)

    def asarray(self, a, dtype=None):
        xp = self.xp
        if type(a).__module__.split(".")[0] == "cupy":
            a = a.get()  # explicit device -> host copy
        if isinstance(a, self._array_type):
            return a if dtype is None else xp.astype(a, self.dtype(dtype))
        a = np.asarray(a)
        return xp.asarray(a, dtype=None if dtype is None else self.dtype(dtype))

    def to_numpy(self, a) -> np.ndarray:
        if isinstance(a, self._array_type):
            return np.array(np.from_dlpack(a))  # a host copy, never a view into the strict array
        return np.asarray(a)

    def scatter_add(self, out, idx, vals):
        """``out[idx[i]] += vals[i]`` along axis 0, as a one-hot matmul (standard functions only).

        The sums run in matmul order, not index order, so results agree with numpy's
        ``np.add.at`` to rounding (not bit for bit).
        """
        xp = self.xp
        n = idx.shape[0]
        onehot = xp.astype(xp.arange(out.shape[0])[:, None] == idx[None, :], vals.dtype)  # (R, n)
        flat = xp.reshape(vals, (n, -1))  # (n, prod(rest))
        out += xp.reshape(onehot @ flat, out.shape)
        return out

    def describe(self) -> dict:
        return {"name": self.name, "array_api_strict": self.xp.__version__,
                "api_version": self.xp.__array_api_version__}
