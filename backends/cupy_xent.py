"""CuPy RawKernels: fused softmax cross-entropy (source: backends/xent.cu).

Same contract as ``refmtp.model.ops.xent.xent_forward_ref`` / ``xent_backward_ref``.
"""
from __future__ import annotations

import numpy as np

from refmtp.backends.cupy_kernels import LazyKernel, cuda_type

_MOD = LazyKernel("xent", ["xent_forward<float>", "xent_forward<double>",
                           "xent_backward<float>", "xent_backward<double>"])
_THREADS = 256




def xent_forward(logits, targets, ignore_index=-100):
    import cupy

    logits = cupy.ascontiguousarray(logits)
    targets = cupy.ascontiguousarray(targets, dtype=cupy.int64)
    N, V = logits.shape
    losses = cupy.empty(N, dtype=logits.dtype)
    lse = cupy.empty(N, dtype=logits.dtype)
    if N:
        k = _MOD.get(f"xent_forward<{cuda_type(logits.dtype, 'xent')}>")
        k((min(N, 65535),), (_THREADS,),
          (logits, targets, np.int64(ignore_index), losses, lse, np.int32(N), np.int32(V)),
          shared_mem=_THREADS * logits.dtype.itemsize)
    return losses, lse


def xent_backward(dlosses, logits, targets, lse, ignore_index=-100):
    import cupy

    logits = cupy.ascontiguousarray(logits)
    N, V = logits.shape
    dlogits = cupy.empty_like(logits)
    if N:
        k = _MOD.get(f"xent_backward<{cuda_type(logits.dtype, 'xent')}>")
        blocks = min((N * V + _THREADS - 1) // _THREADS, 65535)
        k((blocks,), (_THREADS,),
          (cupy.ascontiguousarray(dlosses, dtype=logits.dtype), logits,
           cupy.ascontiguousarray(targets, dtype=cupy.int64), cupy.ascontiguousarray(lse),
           np.int64(ignore_index), dlogits, np.int32(N), np.int32(V)))
    return dlogits


KERNELS = {"xent_forward": xent_forward, "xent_backward": xent_backward}
