"""Numba kernels: the elementwise tail of SwiGLU, forward and backward (numpy backend).

References (same signatures, in ``refmtp.model.ops.swiglu``): ``swiglu_gate_ref`` and
``swiglu_gate_backward_ref``. With ``ab = [a | b]`` (N, 2I):

    forward   sig = 1 / (1 + exp(-a)),  h = a * sig * b
    backward  [da | db] = [dh * b * (sig * (1 + a (1 - sig)))  |  dh * (a * sig)]

one pass over the rows instead of numpy's temporaries. The products and sums are the
reference's, in its order (no fastmath, so no fused multiply-add; the constants 1 are passed in
the array dtype): the backward is bit-exact; the forward's ``exp`` is libm's in float64 and the
vectorised one of backends/numba_expf.py in float32 (<= 1.4 ulp; ``-a`` clamped to [-87, 88]:
for a > 87, sig = 1/(1 + e^-87) rounds to 1 as the exact value does; for a < -88, sig is
1/(1 + e^88) ~ 6e-39 instead of ~0, so silu(a) = a sig is off by |a| 6e-39), so ``sig`` and
``h`` agree to rounding. Rows are split over Numba's threads (``prange``), one row
per thread, so results do not depend on the thread count.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from refmtp.backends.contracts import check_swiglu_gate, check_swiglu_gate_backward
from refmtp.backends.numba_expf import expf32


def _swiglu_gate_loop(ab, one, sig, h):
    N, I = sig.shape
    for n in prange(N):
        for i in range(I):
            a = ab[n, i]
            s = one / (one + math.exp(-a))
            sig[n, i] = s
            h[n, i] = a * s * ab[n, I + i]


def _swiglu_gate_f32_loop(ab, one, sig, h):
    """float32 twin of ``_swiglu_gate_loop`` with the vectorised exp ``expf32``
    (backends/numba_expf.py)."""
    N, I = sig.shape
    for n in prange(N):
        for i in range(I):
            a = ab[n, i]
            s = one / (one + expf32(-a))
            sig[n, i] = s
            h[n, i] = a * s * ab[n, I + i]


def _swiglu_gate_backward_loop(dh, ab, sig, one, dab):
    N, I = sig.shape
    for n in prange(N):
        for i in range(I):
            a = ab[n, i]
            s = sig[n, i]
            g = dh[n, i]
            dab[n, i] = g * ab[n, I + i] * (s * (one + a * (one - s)))  # da
            dab[n, I + i] = g * (a * s)  # db


swiglu_gate_numba = njit(cache=True, nogil=True, parallel=True)(_swiglu_gate_loop)
swiglu_gate_f32_numba = njit(cache=True, nogil=True, parallel=True)(_swiglu_gate_f32_loop)
swiglu_gate_backward_numba = njit(cache=True, nogil=True, parallel=True)(_swiglu_gate_backward_loop)


def swiglu_gate(ab):
    """Numba twin of ``swiglu_gate_ref``: ab (N, 2I) -> (sig, h) (N, I)."""
    check_swiglu_gate(ab)
    ab = np.ascontiguousarray(ab)
    N, I = ab.shape[0], ab.shape[1] // 2
    sig = np.empty((N, I), dtype=ab.dtype)
    h = np.empty((N, I), dtype=ab.dtype)
    if sig.size:
        loop = swiglu_gate_f32_numba if ab.dtype == np.float32 else swiglu_gate_numba
        loop(ab, ab.dtype.type(1), sig, h)
    return sig, h


def swiglu_gate_backward(dh, ab, sig):
    """Numba twin of ``swiglu_gate_backward_ref``: dh (N, I), ab (N, 2I), sig (N, I) -> (N, 2I)."""
    check_swiglu_gate_backward(dh, ab, sig)
    dh, ab, sig = np.ascontiguousarray(dh), np.ascontiguousarray(ab), np.ascontiguousarray(sig)
    dab = np.empty_like(ab)
    if sig.size:
        swiglu_gate_backward_numba(dh, ab, sig, ab.dtype.type(1), dab)
    return dab


KERNELS: dict = {"swiglu_gate": swiglu_gate, "swiglu_gate_backward": swiglu_gate_backward}
