"""Backend layer: the only place in refmtp that knows about NumPy, CuPy, Numba or CUDA.

Installed, this directory is the package ``refmtp.backends``.

    from refmtp.backends import get_backend
    bk = get_backend("numpy")          # or "cupy"
    xp = bk.xp                         # array-api-compat namespace
    rng = bk.rng(seed)                 # host-side numpy Generator; draws moved to the device
    w = rng.normal((4, 8), std=0.02, dtype="float64")

The math in ``refmtp/`` finds the backend of its inputs with :func:`backend_of` (or the array
namespace with :func:`array_namespace`) and never imports numpy or cupy itself.

Asking for an unavailable backend raises :class:`BackendUnavailable` with one line naming what
is missing and how to fix it. There is no silent fallback.
"""
from __future__ import annotations

import os

from refmtp.backends import numba_cache

numba_cache.drop_stale(package=__name__)  # before any kernel module loads its cache (backends/numba_cache.py)

from refmtp.backends.base import Backend, BackendUnavailable, HostRNG, kernels_enabled, set_kernels_enabled
from refmtp.backends.numpy_backend import NumpyBackend

__all__ = [
    "Backend",
    "BackendUnavailable",
    "HostRNG",
    "get_backend",
    "backend_of",
    "array_namespace",
    "available_backends",
    "BACKEND_NAMES",
    "set_kernels_enabled",
    "kernels_enabled",
]

BACKEND_NAMES = ("numpy", "cupy")

_cache: dict[str, Backend] = {}

def get_backend(name: str | None = None) -> Backend:
    """Return the backend object for ``name`` ("numpy" or "cupy"; "strict" for the tests).

    ``None`` reads ``REFMTP_BACKEND`` (default "numpy"). Raises ValueError for an unknown
    name and BackendUnavailable when cupy or a GPU is missing. "strict" is array_api_strict
    (backends/strict_backend.py), the tests' check that refmtp/ uses only the standard.
    """
    if name is None:
        name = os.environ.get("REFMTP_BACKEND", "numpy")
    if name not in BACKEND_NAMES and name != "strict":
        raise ValueError(
            f"unknown backend {name!r}: choose one of {', '.join(BACKEND_NAMES)}"
        )
    if name not in _cache:
        if name == "numpy":
            _cache[name] = NumpyBackend()
        elif name == "strict":  # array_api_strict, for the tests' strict lane only
            from refmtp.backends.strict_backend import StrictBackend

            _cache[name] = StrictBackend()
        else:
            from refmtp.backends.cupy_backend import CupyBackend

            _cache[name] = CupyBackend()  # raises BackendUnavailable with the reason
    return _cache[name]


def available_backends() -> dict[str, str]:
    """Map each backend name to "ok" or the one-line reason it is unavailable."""
    status = {}
    for name in BACKEND_NAMES:
        try:
            get_backend(name)
            status[name] = "ok"
        except BackendUnavailable as exc:
            status[name] = str(exc)
    return status


def backend_of(*arrays) -> Backend:
    """The backend that owns ``arrays`` (all must live on the same one).

    Mixed numpy/cupy inputs raise TypeError with advice, as thinc does. Called on every op of
    a decoded token, so the kind of each array type is looked up once (``_TYPE_KIND``).
    """
    kinds = set()
    for a in arrays:
        if a is None:
            continue
        kind = _TYPE_KIND.get(type(a))
        if kind is None:
            kind = _TYPE_KIND[type(a)] = _kind_of_type(type(a))
        if kind:
            kinds.add(kind)
    if len(kinds) > 1:
        raise TypeError(
            f"refmtp got {' and '.join(sorted(kinds))} arrays in one call: move every input to "
            "one backend with backend.asarray(...) first"
        )
    name = kinds.pop() if kinds else "numpy"
    return _cache.get(name) or get_backend(name)


_TYPE_KIND: dict[type, str] = {}  # array type -> "numpy" | "cupy" | "strict" ("" for Python numbers)


def _kind_of_type(t: type) -> str:
    if issubclass(t, (int, float, bool)):
        return ""
    mod = t.__module__.split(".")[0]
    if mod in ("numpy", "cupy"):
        return mod
    if mod == "array_api_strict":
        return "strict"
    raise TypeError(
        f"refmtp got an array of type {t.__name__} ({t.__module__}); "
        "pass numpy or cupy arrays (move data with backend.asarray)"
    )


def array_namespace(*arrays):
    """The array-api-compat namespace of ``arrays`` (``xp``)."""
    return backend_of(*arrays).xp
