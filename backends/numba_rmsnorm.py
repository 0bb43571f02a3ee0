"""Numba kernels: RMSNorm forward and backward, one pass per row (numpy backend).

References (same signatures, in ``refmtp.model.ops.rmsnorm``): ``rmsnorm_rows_ref`` and
``rmsnorm_rows_backward_ref``. Per row of ``x (N, d)``:

    forward   rstd = 1 / sqrt(sum(x * x) / d + eps),   y = w * (x * rstd)
    backward  n = x * rstd,  g = dout * w,  dx = rstd * (g - n * (sum(g * n) / d)),
              dweight = sum over rows of dout * n   (rows added in order, as numpy's column sum)

The row sums run in 16 interleaved partial sums here (``row_total``, backends/numba_expf.py; the
forward's ``dot_total`` forms each ``x * x`` as it adds it) and pairwise in numpy (``mean``), so
``rstd``, ``y`` and ``dx`` agree with the reference to rounding; ``dweight`` is bit-exact when ``rstd`` is (the
same products added in the same order: numpy sums a C-contiguous array's axis 0 row by row).
The forward's rows are split over Numba's threads (``prange``), a chunk of rows per thread; the
backward runs in one thread (its column sum is serial); neither depends on the thread count.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from refmtp.backends.contracts import check_rmsnorm_rows, check_rmsnorm_rows_backward
from refmtp.backends.numba_expf import LANES, dot_total, row_total


ROWS = 64  # rows per prange chunk (one scratch buffer for the row sums per chunk)


def _rmsnorm_rows_loop(x, w, eps, dd, one, y, rstd):
    """dd = d in the array dtype (a plain int would promote the mean to float64)."""
    N, d = x.shape
    for chunk in prange((N + ROWS - 1) // ROWS):
        acc = np.empty(LANES, x.dtype)
        for r in range(chunk * ROWS, min(N, (chunk + 1) * ROWS)):
            xr = x[r]
            rs = one / math.sqrt(dot_total(acc, xr, xr, d) / dd + eps)  # sum of the rounded x * x
            rstd[r, 0] = rs
            for c in range(d):
                y[r, c] = w[c] * (x[r, c] * rs)


def _rmsnorm_rows_backward_loop(dout, x, w, rstd, dd, dx, dweight):
    """dx's row holds (dout w) (x rstd) until it is written (the row sum reads it). dweight
    (zeros on entry) adds the rows' dout * n in row order: the order, and so the bits, of
    numpy's column sum in the reference, which starts from +0.0 too (a column of -0.0 sums to
    +0.0). One thread: that order is serial, and the pass is memory-bound (it reads dout and x
    once and writes dx). Each loop runs over one row (views, no branch inside), which LLVM
    vectorises: 2.4x faster than one loop over 2-D indices that also tested r == 0; dx and
    dweight share the second pass (1.1-2x faster than a pass each, d = 256 down to 64)."""
    N, d = x.shape
    acc = np.empty(LANES, x.dtype)
    for r in range(N):
        rs = rstd[r, 0]
        dr, xr, dxr = dout[r], x[r], dx[r]
        for c in range(d):
            dxr[c] = (dr[c] * w[c]) * (xr[c] * rs)
        mean = row_total(acc, dxr, d) / dd
        for c in range(d):  # dx and dweight in one pass over the row
            n = xr[c] * rs
            dxr[c] = rs * (dr[c] * w[c] - n * mean)
            dweight[c] += dr[c] * n


rmsnorm_rows_numba = njit(cache=True, nogil=True, parallel=True)(_rmsnorm_rows_loop)
rmsnorm_rows_backward_numba = njit(cache=True, nogil=True)(_rmsnorm_rows_backward_loop)


def rmsnorm_rows(x, weight, eps):
    """Numba twin of ``rmsnorm_rows_ref``: x (..., d), weight (d,) -> (y (..., d), rstd (..., 1))."""
    check_rmsnorm_rows(x, weight)
    d = x.shape[-1]
    x2 = np.ascontiguousarray(x).reshape(-1, d)
    y = np.empty_like(x2)
    rstd = np.empty((x2.shape[0], 1), dtype=x2.dtype)
    if x2.size:
        t = x2.dtype.type
        rmsnorm_rows_numba(x2, np.ascontiguousarray(weight), t(eps), t(d), t(1), y, rstd)
    return y.reshape(x.shape), rstd.reshape(x.shape[:-1] + (1,))


def rmsnorm_rows_backward(dout, x, weight, rstd):
    """Numba twin of ``rmsnorm_rows_backward_ref``: -> (dx (..., d), dweight (d,))."""
    check_rmsnorm_rows_backward(dout, x, weight, rstd)
    d = x.shape[-1]
    x2 = np.ascontiguousarray(x).reshape(-1, d)
    d2 = np.ascontiguousarray(dout).reshape(-1, d)
    r2 = np.ascontiguousarray(rstd).reshape(-1, 1)
    dx = np.empty_like(x2)
    dweight = np.zeros(d, dtype=x2.dtype)  # the kernel adds every row to it, as numpy's column sum
    if x2.size:
        t = x2.dtype.type
        rmsnorm_rows_backward_numba(d2, x2, np.ascontiguousarray(weight), r2, t(d), dx, dweight)
    return dx.reshape(x.shape), dweight


KERNELS: dict = {"rmsnorm_rows": rmsnorm_rows, "rmsnorm_rows_backward": rmsnorm_rows_backward}
