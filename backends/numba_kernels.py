"""The Numba kernel table of the numpy backend.

Each ``numba_<op>.py`` module defines plain-Python loops ``_<op>_loop`` and their compiled
twins ``<op>_numba = njit(cache=True)(_<op>_loop)``, plus a ``KERNELS`` dict mapping the
kernel name (the same name the refmtp op asks ``backend.kernel(...)`` for) to a wrapper with
the exact signature of the plain array reference in ``refmtp/``. No fastmath anywhere.
Set ``NUMBA_DISABLE_JIT=1`` to run every kernel as plain Python when debugging.
"""
from refmtp.backends import (numba_accept, numba_adamw, numba_attention, numba_moe, numba_rmsnorm, numba_rope, numba_swiglu,
                             numba_xent)

KERNELS: dict = {}
for _mod in (numba_rope, numba_xent, numba_moe, numba_accept, numba_attention, numba_swiglu, numba_rmsnorm,
             numba_adamw):
    KERNELS.update(_mod.KERNELS)
