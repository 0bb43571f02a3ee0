"""Numba kernels: the causal softmax of attention and its backward (numpy backend).

References (same signatures, in ``refmtp.model.ops.attention``): ``causal_softmax_ref`` and
``causal_softmax_backward_ref``. Both work row by row on the (B, H, T, S) score matrix and touch
only the visible keys ``j <= start + t`` of query row ``t``; the masked part is written as 0
without being read (the reference masks with -inf, so its probabilities and gradients there are
0 too). Rows are split over Numba's threads (``prange``); each row is computed by one thread in
a fixed order, so the result does not depend on the thread count.

Parity with the reference is to rounding, not bit for bit: the row sums run left to right here
and pairwise in numpy, and ``exp`` comes from another libm. The compiled loops are bit-exact
with their ``.py_func`` up to that
``exp`` (Python's ``math.exp`` rounds through float64).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from refmtp.backends.contracts import check_causal_softmax, check_causal_softmax_backward


def _causal_softmax_loop(s, start, zero, p):
    """s, p (R, T, S) C-contiguous; p[r, t, j] = softmax over j <= start + t, 0 beyond."""
    R, T, S = s.shape
    for rt in prange(R * T):
        r = rt // T
        t = rt - r * T
        last = start + t  # last visible key
        m = s[r, t, 0]
        for j in range(1, last + 1):
            if s[r, t, j] > m:
                m = s[r, t, j]
        total = zero  # the row sum, in the input dtype
        for j in range(last + 1):
            e = math.exp(s[r, t, j] - m)
            p[r, t, j] = e
            total += e
        for j in range(last + 1):
            p[r, t, j] = p[r, t, j] / total
        for j in range(last + 1, S):
            p[r, t, j] = zero


def _causal_softmax_backward_loop(p, dp, start, zero, ds):
    """ds = p * (dp - sum_j dp * p) on the visible keys, 0 beyond; all (R, T, S) C-contiguous."""
    R, T, S = p.shape
    for rt in prange(R * T):
        r = rt // T
        t = rt - r * T
        last = start + t
        dot = zero  # sum_j dp * p, in the input dtype
        for j in range(last + 1):
            dot += dp[r, t, j] * p[r, t, j]
        for j in range(last + 1):
            ds[r, t, j] = p[r, t, j] * (dp[r, t, j] - dot)
        for j in range(last + 1, S):
            ds[r, t, j] = zero


causal_softmax_numba = njit(cache=True, parallel=True)(_causal_softmax_loop)
causal_softmax_backward_numba = njit(cache=True, parallel=True)(_causal_softmax_backward_loop)


def _rows(a):
    """(..., T, S) -> C-contiguous (R, T, S) view or copy."""
    return np.ascontiguousarray(a).reshape(-1, a.shape[-2], a.shape[-1])


def causal_softmax(s, start):
    """Numba twin of ``causal_softmax_ref``: s (..., T, S) scores, S = start + T -> p."""
    check_causal_softmax(s, start)
    s3 = _rows(s)
    p3 = np.empty_like(s3)
    if s3.size:
        causal_softmax_numba(s3, np.int64(start), s3.dtype.type(0), p3)
    return p3.reshape(s.shape)


def causal_softmax_backward(p, dp, start):
    """Numba twin of ``causal_softmax_backward_ref``: p, dp (..., T, S) -> ds."""
    check_causal_softmax_backward(p, dp, start)
    p3, dp3 = _rows(p), _rows(dp)
    ds3 = np.empty_like(p3)
    if p3.size:
        causal_softmax_backward_numba(p3, dp3, np.int64(start), p3.dtype.type(0), ds3)
    return ds3.reshape(p.shape)


KERNELS: dict = {"causal_softmax": causal_softmax, "causal_softmax_backward": causal_softmax_backward}
