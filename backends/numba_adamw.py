"""Numba kernels of the optimizer step: the AdamW update of one tensor in one pass, and the sum
of squares of one gradient for the global norm (numpy backend).

Reference (same signature): ``refmtp.training.optim.adamw_update_ref``. Per element, with the
clipped gradient ``g = g_raw * gscale`` (the clipping factor, rounded to the array dtype as
numpy rounds ``g_raw * gscale``; 1.0 leaves g as it is):

    m' = beta1 m + (1 - beta1) g,   v' = beta2 v + (1 - beta2) (g g)
    p' = p (1 - lr wd) - lr ((m' / bc1) / (sqrt(v' / bc2) + eps))

The host floats are rounded to the array dtype first, as numpy does with Python scalars
(NEP 50), and every operation is the reference's in its order (no fastmath, so no fused
multiply-add; sqrt and the divisions are correctly rounded): bit-exact in float32 and float64.
Elements are split over Numba's threads (``prange``); each is independent, so results do not
depend on the thread count. New arrays are returned; the inputs are not modified.

``sum_squares`` (reference ``refmtp.training.optim.sum_squares_ref``): ``sum g^2`` with each
square formed in float64 (exact for float32 input) and summed in 16 interleaved float64 partial
sums (``row_total``'s order, backends/numba_expf.py, each square formed as it is added: one pass)
over chunks of 4096 elements, the chunks' sums then added in order, in one thread: the reference
sums pairwise, so the two agree to rounding (~1e-16 relative). (Not ``dot_total``: that would
round each square to the input dtype.)
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from refmtp.backends.contracts import check_adamw_update, check_sum_squares
from refmtp.backends.numba_expf import LANES, wide_squares_total

CHUNK = 4096  # elements per partial sum of sum_squares (the partial sums then added in order)


def _adamw_update_loop(p, g, m, v, keep, lr, b1, c1, b2, c2, bc1, bc2, eps, gs, p_new, m_new, v_new):
    """All arrays flat (n,); keep = 1 - lr wd, c1 = 1 - beta1, c2 = 1 - beta2, gs the clipping
    factor (array dtype)."""
    for i in prange(p.shape[0]):
        gi = g[i] * gs
        mi = b1 * m[i] + c1 * gi
        vi = b2 * v[i] + c2 * (gi * gi)
        p_new[i] = p[i] * keep - lr * ((mi / bc1) / (math.sqrt(vi / bc2) + eps))
        m_new[i] = mi
        v_new[i] = vi


adamw_update_numba = njit(cache=True, nogil=True, parallel=True)(_adamw_update_loop)


def _sum_squares_loop(g, acc):
    """g flat (n,) float -> sum of g^2 in float64: each CHUNK's 16-lane sum (``row_total``'s
    order, the squares formed in float64 as they are added: ``wide_squares_total``), the
    chunks in order. acc (LANES,) float64, for the lanes' dtype. Serial: the step's 167 tensors
    are small, and a parallel loop's start-up cost per call was larger than the work."""
    n = g.shape[0]
    total = 0.0
    for lo in range(0, n, CHUNK):
        hi = min(n, lo + CHUNK)
        m16 = (hi - lo) - (hi - lo) % LANES
        part = wide_squares_total(acc, g, lo, lo + m16)  # the 16 lanes, one LLVM vector
        for j in range(lo + m16, hi):
            x = np.float64(g[j])
            part += x * x
        total += part
    return total


sum_squares_numba = njit(cache=True, nogil=True)(_sum_squares_loop)


def sum_squares(g):
    """Numba twin of ``sum_squares_ref``: -> float64 0-d array."""
    check_sum_squares(g)
    flat = np.ascontiguousarray(g).reshape(-1)
    return np.asarray(sum_squares_numba(flat, np.empty(LANES)), dtype=np.float64)


def adamw_update(p, g, m, v, lr, wd, beta1, beta2, eps, bc1, bc2, gscale=1.0):
    """Numba twin of ``adamw_update_ref`` -> (new p, new m, new v), shaped like p."""
    check_adamw_update(p, g, m, v)
    t = p.dtype.type
    flat = [np.ascontiguousarray(a).reshape(-1) for a in (p, g, m, v)]
    out = [np.empty_like(flat[0]) for _ in range(3)]
    if p.size:
        adamw_update_numba(*flat, t(1.0 - lr * wd), t(lr), t(beta1), t(1.0 - beta1), t(beta2), t(1.0 - beta2),
                           t(bc1), t(bc2), t(eps), t(gscale), *out)
    return tuple(a.reshape(p.shape) for a in out)


KERNELS: dict = {"adamw_update": adamw_update, "sum_squares": sum_squares}
