"""The Backend object shared by numpy and cupy, and the host-side random generator."""
from __future__ import annotations

import os

import numpy as np

DTYPES = ("float32", "float64")

# Kernels (Numba on numpy, RawKernels on cupy) are on by default; the plain array path is the
# reference. REFMTP_KERNELS=0 or set_kernels_enabled(False) turns them off everywhere.
_KERNELS_ENABLED = os.environ.get("REFMTP_KERNELS", "1") not in ("0", "false", "False", "no")


def set_kernels_enabled(flag: bool) -> bool:
    """Switch the kernel table on or off globally; returns the previous setting."""
    global _KERNELS_ENABLED
    previous = _KERNELS_ENABLED
    _KERNELS_ENABLED = bool(flag)
    return previous


def kernels_enabled() -> bool:
    return _KERNELS_ENABLED


def topk_ref(scores, k: int):
    """(idx int64, values) of the ``k`` largest entries along the last axis of NaN-free ``scores``
    (``1 <= k <= n``; :meth:`Backend.topk` checks both): a stable argsort of ``-scores``, so the
    order is descending and equal scores (``-0.0 == 0.0`` too) go to the lowest index first.

    Kernel: ``topk`` (backends/numba_topk.py).
    """
    from array_api_compat import array_namespace

    xp = array_namespace(scores)
    idx = xp.argsort(-scores, axis=-1, stable=True)[..., :k]
    return idx, xp.take_along_axis(scores, idx, axis=-1)


class BackendUnavailable(RuntimeError):
    """A backend was asked for but cannot run here; the message says what is missing."""


class HostRNG:
    """Seeded random numbers drawn on the host with numpy's PCG64, then moved to the device.

    Because every draw happens on the host, numpy and cupy runs started from one seed see
    bit-identical initial weights, data windows and acceptance coins.
    """

    def __init__(self, backend: "Backend", seed: int):
        self.backend = backend
        self.seed = int(seed)
        self.gen = np.random.Generator(np.random.PCG64(self.seed))

    # -- draws (host) -> device ------------------------------------------------------------
    def normal(self, shape, std=1.0, dtype="float64", mean=0.0):
        a = self.gen.standard_normal(size=shape)  # always float64 on the host
        a = a * float(std) + float(mean)
        return self.backend.asarray(a, dtype=dtype)

    def uniform(self, shape, low=0.0, high=1.0, dtype="float64"):
        a = self.gen.uniform(low, high, size=shape)
        return self.backend.asarray(a, dtype=dtype)

    def integers(self, low, high, shape):
        a = self.gen.integers(low, high, size=shape, dtype=np.int64)
        return self.backend.asarray(a, dtype="int64")

    def host_integers(self, low, high, shape):
        """Integers kept on the host (e.g. data window offsets)."""
        return self.gen.integers(low, high, size=shape, dtype=np.int64)

    def host_uniform(self, shape=None):
        return self.gen.random(size=shape)

    # -- state, for exact resume ------------------------------------------------------------
    def get_state(self) -> dict:
        return self.gen.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.gen.bit_generator.state = state


class Backend:
    """One object per backend: array namespace, dtypes, RNG, non-standard ops, kernel table.

    Subclasses set ``name``, ``xp`` (array-api-compat namespace) and ``_raw`` (numpy or cupy
    module) and implement ``asarray``/``to_numpy``/``scatter_add`` and ``_load_kernels``.
    """

    name: str = "?"
    xp = None
    _raw = None

    def __init__(self):
        self._kernels: dict | None = None

    def __repr__(self):
        return f"<refmtp backend {self.name}>"

    # -- dtypes ------------------------------------------------------------------------------
    def dtype(self, name):
        """Map "float32"/"float64"/"int64"/"int32"/"bool" (or a dtype) to this backend's dtype."""
        if not isinstance(name, str):
            name = np.dtype(name).name
        if name not in ("float32", "float64", "int64", "int32", "bool", "uint8", "float16"):
            raise ValueError(f"unsupported dtype {name!r}: use float32 or float64")
        return getattr(self.xp, name)

    @staticmethod
    def check_float_dtype(name: str) -> str:
        if name not in DTYPES:
            raise ValueError(f"unsupported dtype {name!r}: choose float32 or float64")
        return name

    # -- creation / movement -----------------------------------------------------------------
    def asarray(self, a, dtype=None):
        raise NotImplementedError

    def to_numpy(self, a) -> np.ndarray:
        raise NotImplementedError

    def zeros(self, shape, dtype="float64"):
        return self.xp.zeros(shape, dtype=self.dtype(dtype))

    def rng(self, seed: int) -> HostRNG:
        return HostRNG(self, seed)

    # -- non-standard ops ------------------------------------------------------------------
    def prepare_training(self) -> None:
        """Called by every training step before its work (numpy: keep freed heap memory); no-op here."""

    def prepare_worker_thread(self) -> None:
        """Called once in each thread that runs a training step's microbatches side by side
        (``train_step(..., workers=N)``; numpy: Numba's thread count, which is per thread); no-op here."""

    def concurrent_microbatches(self) -> bool:
        """Whether ``train_step(..., workers=N)`` may run microbatches side by side on threads:
        numpy when Numba's threading layer allows concurrent kernels (a CPU gains cores); not on a
        GPU, whose one stream would only serialise them (they then run one after another)."""
        return False

    def scatter_add(self, out, idx, vals):
        """``out[idx[i]] += vals[i]`` along axis 0 with repeated indices summed (in place).

        Never ``out[idx] += vals``: that silently drops duplicates.
        """
        raise NotImplementedError

    def gather(self, x, idx, axis=-1):
        """``take_along_axis``: ``out[..., j] = x[..., idx[..., j]]``."""
        return self.xp.take_along_axis(x, idx, axis=axis)

    def topk(self, scores, k: int):
        """Indices and values of the ``k`` largest entries along the last axis.

        Order: descending score; equal scores resolve to the LOWEST index first, identically on
        every backend (a stable argsort of ``-scores``). NaN scores raise.
        """
        xp = self.xp
        n = scores.shape[-1]
        if not 1 <= k <= n:
            raise ValueError(f"topk: k={k} must be between 1 and the last dimension {n}")
        if bool(xp.any(xp.isnan(scores))):
            raise ValueError("topk: scores contain NaN")
        return (self.kernel("topk") or topk_ref)(scores, k)

    # -- kernels -----------------------------------------------------------------------------
    def kernel(self, name: str):
        """The accelerated kernel registered under ``name``, or None (plain array path).

        None when kernels are switched off (REFMTP_KERNELS=0 / set_kernels_enabled(False)) or
        when this backend has no kernel of that name.
        """
        if not kernels_enabled():
            return None
        return self.kernel_table().get(name)

    def kernel_table(self) -> dict:
        if self._kernels is None:
            self._kernels = self._load_kernels()
        return self._kernels

    def _load_kernels(self) -> dict:
        return {}

    # -- info --------------------------------------------------------------------------------
    def describe(self) -> dict:
        return {"name": self.name}
