"""CuPy RawKernels: rope (see cupy_kernels.py for the contract).

``rope_apply(x, cos, sin)`` has the signature of :func:`refmtp.model.ops.rope.rope_apply_ref`, its
reference: x (..., T, Dr), cos/sin (T, Dr/2) -> y (..., T, Dr). The CUDA source is
``backends/rope.cu`` (``rope_apply<float>``, ``rope_apply<double>``), compiled lazily on first
call. Forward and backward both use it (backward passes ``-sin``).
"""
from __future__ import annotations

import numpy as np

from refmtp.backends.contracts import check_rope_apply
from refmtp.backends.cupy_kernels import LazyKernel, cuda_type

_ROPE = LazyKernel("rope", ["rope_apply<float>", "rope_apply<double>"])  # compiled on first call


def rope_apply(x, cos, sin):
    """CUDA twin of ``rope_apply_ref``: x (..., T, Dr), cos/sin (T, Dr/2) -> (..., T, Dr)."""
    import cupy

    check_rope_apply(x, cos, sin)
    T, Dr = x.shape[-2], x.shape[-1]
    xc = cupy.ascontiguousarray(x)  # (..., T, Dr)
    y = cupy.empty_like(xc)  # (..., T, Dr)
    n_pairs = xc.size // 2
    _ROPE.launch(f"rope_apply<{cuda_type(x.dtype, 'rope')}>", n_pairs,
                 (xc, cupy.ascontiguousarray(cos), cupy.ascontiguousarray(sin), y,
                  np.int64(n_pairs), np.int64(T), np.int64(Dr // 2)))
    return y


KERNELS: dict = {"rope_apply": rope_apply}
