"""CuPy RawKernels: fused softmax cross-entropy (source: backends/xent.cu).

Same contract as ``refmtp.model.ops.xent.xent_forward_ref`` / ``xent_backward_ref``
(checked by ``refmtp.backends.contracts``, shared with the Numba wrappers).
"""
from __future__ import annotations

import numpy as np

from refmtp.backends.contracts import check_xent_backward, check_xent_forward
from refmtp.backends.cupy_kernels import THREADS, LazyKernel, cuda_type

_MOD = LazyKernel("xent", ["xent_forward<float>", "xent_forward<double>",
                           "xent_backward<float>", "xent_backward<double>"])


def xent_forward(logits, targets, ignore_index=-100):
    import cupy

    logits = cupy.ascontiguousarray(logits)
    targets = cupy.ascontiguousarray(targets, dtype=cupy.int64)
    check_xent_forward(logits, targets)
    N, V = logits.shape
    losses = cupy.empty(N, dtype=logits.dtype)
    lse = cupy.empty(N, dtype=logits.dtype)
    # one block per row (a shared-memory tree reduction over V); blockDim a power of two
    _MOD.launch(f"xent_forward<{cuda_type(logits.dtype, 'xent')}>", N,
                (logits, targets, np.int64(ignore_index), losses, lse, np.int32(N), np.int32(V)),
                threads=THREADS, items_per_block=1, shared_mem=THREADS * logits.dtype.itemsize)
    return losses, lse


def xent_backward(dlosses, logits, targets, lse, ignore_index=-100):
    import cupy

    logits = cupy.ascontiguousarray(logits)
    dlosses = cupy.ascontiguousarray(dlosses, dtype=logits.dtype)
    targets = cupy.ascontiguousarray(targets, dtype=cupy.int64)
    lse = cupy.ascontiguousarray(lse)
    check_xent_backward(dlosses, logits, targets, lse)
    N, V = logits.shape
    dlogits = cupy.empty_like(logits)
    _MOD.launch(f"xent_backward<{cuda_type(logits.dtype, 'xent')}>", N * V,
                (dlosses, logits, targets, lse, np.int64(ignore_index), dlogits, np.int32(N),
                 np.int32(V)))
    return dlogits


KERNELS = {"xent_forward": xent_forward, "xent_backward": xent_backward}
