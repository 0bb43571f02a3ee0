"""CuPy RawKernels: rope (see cupy_kernels.py for the contract).

``rope_apply(x, cos, sin)`` has the signature of :func:`refmtp.model.ops.rope.rope_apply_ref`, its
reference: x (..., T, Dr), cos/sin (T, Dr/2) -> y (..., T, Dr). The CUDA source is
``backends/rope.cu`` (``rope_apply<float>``, ``rope_apply<double>``), compiled lazily on first
call. Forward and backward both use it (backward passes ``-sin``).
"""
from __future__ import annotations

import numpy as np

from refmtp.backends.cupy_kernels import LazyKernel
from refmtp.backends.numba_rope import check_rope_args

_ROPE = LazyKernel("rope", ["rope_apply<float>", "rope_apply<double>"])  # compiled on first call
_THREADS = 256
_MAX_BLOCKS = 65535  # the grid-stride loop covers the rest


def _kernel(name: str):
    """The compiled ``rope_apply<float|double>``; compiles backends/rope.cu on first use."""
    return _ROPE.get(name)


def rope_apply(x, cos, sin):
    """CUDA twin of ``rope_apply_ref``: x (..., T, Dr), cos/sin (T, Dr/2) -> (..., T, Dr)."""
    import cupy

    check_rope_args(x, cos, sin)
    T, Dr = x.shape[-2], x.shape[-1]
    xc = cupy.ascontiguousarray(x)  # (..., T, Dr)
    y = cupy.empty_like(xc)  # (..., T, Dr)
    n_pairs = xc.size // 2
    if n_pairs == 0:
        return y
    name = "rope_apply<float>" if x.dtype == np.float32 else "rope_apply<double>"
    blocks = min((n_pairs + _THREADS - 1) // _THREADS, _MAX_BLOCKS)
    _kernel(name)(
        (blocks,), (_THREADS,),
        (xc, cupy.ascontiguousarray(cos), cupy.ascontiguousarray(sin), y,
         np.int64(n_pairs), np.int64(T), np.int64(Dr // 2)),
    )
    return y


KERNELS: dict = {"rope_apply": rope_apply}
