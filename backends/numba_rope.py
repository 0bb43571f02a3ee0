"""Numba kernels: rope (see numba_kernels.py for the contract).

``rope_apply(x, cos, sin)`` has the signature of :func:`refmtp.model.ops.rope.rope_apply_ref`, its
reference: x (..., T, Dr), cos/sin (T, Dr/2) -> y (..., T, Dr), interleaved pairs

    y[2j] = x[2j] c - x[2j+1] s,   y[2j+1] = x[2j] s + x[2j+1] c.

Forward and backward both use it (backward passes ``-sin``). The loop does exactly the
reference's floating-point operations in the same order (no fastmath, so no FMA contraction),
so it matches the reference bit for bit in float32 and float64.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from refmtp.backends.contracts import check_rope_apply


def _rope_apply_loop(x, cos, sin, y):
    """x, y (N, T, Dr) C-contiguous, cos/sin (T, Dr/2); writes y."""
    N, T, Dr = x.shape
    half = Dr // 2
    for n in range(N):
        for t in range(T):
            for j in range(half):
                a = x[n, t, 2 * j]
                b = x[n, t, 2 * j + 1]
                c = cos[t, j]
                s = sin[t, j]
                y[n, t, 2 * j] = a * c - b * s
                y[n, t, 2 * j + 1] = a * s + b * c


rope_apply_numba = njit(cache=True, nogil=True)(_rope_apply_loop)


def rope_apply(x, cos, sin):
    """Numba twin of ``rope_apply_ref``: x (..., T, Dr), cos/sin (T, Dr/2) -> (..., T, Dr)."""
    check_rope_apply(x, cos, sin)
    T, Dr = x.shape[-2], x.shape[-1]
    N = math.prod(x.shape[:-2])  # leading dims flattened
    x3 = np.ascontiguousarray(x).reshape(N, T, Dr)  # (N, T, Dr)
    y3 = np.empty_like(x3)  # (N, T, Dr)
    if x3.size:
        rope_apply_numba(x3, np.ascontiguousarray(cos), np.ascontiguousarray(sin), y3)
    return y3.reshape(x.shape)


KERNELS: dict = {"rope_apply": rope_apply}
