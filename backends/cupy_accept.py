"""CuPy RawKernel: ``verify_drafts_batch`` (RNG-v1 acceptance for N requests) from ``accept.cu``.

Same signature and bit-identical results as ``refmtp.inference.acceptance.verify_drafts_batch_ref``
(one thread per request, sequential float64 CDF; see the header of accept.cu). Compiled lazily
on first call for (p/q dtype, logits dtype) in {float, double}^2. Inputs are validated by the
public ``verify_drafts_batch`` before dispatch; this wrapper only fixes dtypes and layout.
"""
from __future__ import annotations

import numpy as np

from refmtp.backends.cupy_kernels import LazyKernel, cuda_type

NAME_EXPRESSIONS = [f"verify_drafts_batch<{t}, {l}>" for t in ("float", "double") for l in ("float", "double")]
_KERNEL = LazyKernel("accept", NAME_EXPRESSIONS)
THREADS = 128


def _float_array(cp, a):
    a = cp.ascontiguousarray(a)
    return a if a.dtype in (np.float32, np.float64) else a.astype(cp.float64)


def verify_drafts_batch(p, q, drafts, u_accept, u_sample, greedy, logits=None):
    """CuPy twin of ``verify_drafts_batch_ref``; returns (num_accepted, tokens, residual_fallback, is_bonus)."""
    import cupy as cp

    p = _float_array(cp, p)  # (N, K+1, V)
    N, K1, V = p.shape
    K = K1 - 1
    if q is not None:
        q = _float_array(cp, q)  # (N, K, V)
        if q.dtype != p.dtype:  # one template type for p and q: upcast the narrower (lossless)
            p, q = p.astype(cp.float64), q.astype(cp.float64)
    scores = p if logits is None else _float_array(cp, logits)  # (N, K+1, V)
    drafts = cp.ascontiguousarray(drafts, dtype=cp.int64).reshape(N, K)  # (N, K)
    u_accept = cp.ascontiguousarray(u_accept, dtype=cp.float64).reshape(N, K)  # (N, K)
    u_sample = cp.ascontiguousarray(u_sample, dtype=cp.float64).reshape(N)  # (N,)
    greedy = cp.ascontiguousarray(cp.broadcast_to(cp.asarray(greedy, dtype=cp.bool_), (N,)))  # (N,)
    num_accepted = cp.zeros(N, dtype=cp.int64)
    tokens = cp.full((N, K1), -1, dtype=cp.int64)
    residual_fallback = cp.zeros(N, dtype=cp.bool_)
    is_bonus = cp.zeros(N, dtype=cp.bool_)
    _KERNEL.launch(
        f"verify_drafts_batch<{cuda_type(p.dtype, 'accept')}, {cuda_type(scores.dtype, 'accept')}>", N,
        (p, q if q is not None else p, np.int32(q is not None), drafts, u_accept, u_sample, greedy,
         scores, np.int32(N), np.int32(K), np.int32(V), num_accepted, tokens, residual_fallback,
         is_bonus),
        threads=THREADS)  # one thread per request
    return num_accepted, tokens, residual_fallback, is_bonus


KERNELS: dict = {"verify_drafts_batch": verify_drafts_batch}
