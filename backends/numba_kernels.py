"""The Numba kernel table of the numpy backend.

Each ``numba_<op>.py`` module defines plain-Python loops ``_<op>_loop`` and their compiled
twins ``<op>_numba = njit(cache=True, nogil=True)(_<op>_loop)`` (``nogil``: a kernel lets go of
the interpreter lock, so the microbatches of ``train_step(..., workers=N)`` run kernels side by
side), plus a ``KERNELS`` dict mapping the kernel name (the same name the refmtp op asks
``backend.kernel(...)`` for) to a wrapper with the exact signature of the plain array reference
in ``refmtp/``. No fastmath anywhere.
Set ``NUMBA_DISABLE_JIT=1`` to run every kernel as plain Python when debugging.
"""
from refmtp.backends import (numba_accept, numba_adamw, numba_attention, numba_moe, numba_rmsnorm, numba_rope, numba_swiglu,
                             numba_topk, numba_xent)

import importlib
import os

import numba


def kernel_threads() -> int:
    """Numba's thread count for the ``prange`` kernels: ``REFMTP_NUMBA_THREADS`` or 1.

    One by default: between the GEMMs OpenBLAS's threads spin-wait on the same cores, and a
    second pool of Numba threads there halved the training step at 2 BLAS threads (issue-17 config:
    1398 against 3209 tokens/s, docs/performance.md). The kernels' results do not depend on it.
    """
    raw = os.environ.get("REFMTP_NUMBA_THREADS", "1")
    try:
        n = int(raw)
    except ValueError:
        n = 1
    return max(1, min(n, numba.config.NUMBA_NUM_THREADS))


def set_thread_count() -> None:
    """Numba's thread count for the calling thread (it is per thread): kernel_threads()."""
    numba.set_num_threads(kernel_threads())


def concurrent_launch_safe() -> bool:
    """Whether two threads may run the prange kernels at once: Numba's OpenMP and TBB threading
    layers allow it; its fallback layer, "workqueue" (neither library found), aborts the process
    when two threads enter it together."""
    try:
        return numba.threading_layer() != "workqueue"  # the layer is chosen at the first prange call
    except ValueError:  # not chosen yet: workqueue unless asked for, or OpenMP/TBB cannot load
        pass
    if numba.config.THREADING_LAYER == "workqueue":
        return False
    for pool in ("omppool", "tbbpool"):
        try:
            importlib.import_module(f"numba.np.ufunc.{pool}")
            return True
        except ImportError:
            continue
    return False


set_thread_count()  # the importing thread; training's worker threads call it themselves

KERNELS: dict = {}
for _mod in (numba_rope, numba_xent, numba_moe, numba_accept, numba_attention, numba_swiglu, numba_rmsnorm,
             numba_adamw, numba_topk):
    KERNELS.update(_mod.KERNELS)
