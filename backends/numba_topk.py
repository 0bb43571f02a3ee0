"""Kernel: the k largest entries of each row, in order, ties to the lowest index (numpy backend).

Reference (same signature): ``refmtp.backends.base.topk_ref``, a stable argsort of ``-scores``
over the whole row, then its first k. Here each of the k picks scans the row once for the
largest entry not picked yet, keeping the first one met on a tie (``>`` only, so ``-0.0`` and
``0.0`` tie as they do in the sort): the same indices and values, bit for bit, in O(k n) per row
instead of a sort of n. The router calls it three times per MoE layer on (tokens, experts) and
(tokens, groups) scores, where n is 2 to 256 and k 1 to 8. NaN never reaches it
(``Backend.topk`` raises first). One thread: the rows are short and the work per call small.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from refmtp.backends.contracts import check_topk


def _topk_rows_loop(x, k, picked, idx, val):
    """x (R, n); picked (n,) bool scratch; idx (R, k) int64 and val (R, k) written."""
    R, n = x.shape
    for r in range(R):
        row = x[r]
        picked[:] = False
        for j in range(k):
            best = -1
            for c in range(n):
                if not picked[c] and (best < 0 or row[c] > row[best]):
                    best = c
            picked[best] = True
            idx[r, j] = best
            val[r, j] = row[best]


topk_rows_numba = njit(cache=True, nogil=True)(_topk_rows_loop)


def topk(scores, k):
    """Numba twin of ``topk_ref``: scores (..., n) -> (idx (..., k) int64, values (..., k))."""
    check_topk(scores, k)
    n = scores.shape[-1]
    x = np.ascontiguousarray(scores).reshape(-1, n)
    idx = np.empty((x.shape[0], int(k)), dtype=np.int64)
    val = np.empty((x.shape[0], int(k)), dtype=x.dtype)
    if x.shape[0]:
        topk_rows_numba(x, np.int64(k), np.empty(n, dtype=np.bool_), idx, val)
    shape = tuple(scores.shape[:-1]) + (int(k),)
    return idx.reshape(shape), val.reshape(shape)


KERNELS: dict = {"topk": topk}
