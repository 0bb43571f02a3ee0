"""Numba kernels: fused softmax cross-entropy forward/backward (numpy backend).

Reference: ``refmtp.model.ops.xent.xent_forward_ref`` / ``xent_backward_ref`` (same signatures).
One pass per row: max, sum of exp, logsumexp, picked logit; backward writes
``dz = dloss * (exp(z - lse) - onehot)``. The summation order differs from numpy's pairwise
sum, so parity with the reference is to rounding (about 1e-15 relative in float64), and
bit-exact between the compiled loop and its ``.py_func``.

float32 has loops of its own that vectorise: the row max through an int32 view
(``row_max_f32``, exact), ``exp`` as ``expf_parts`` (<= 1.4 ulp, backends/numba_expf.py; the
arguments are ``z - max <= 0`` forward and ``z - lse <= 0`` backward, and below -87 the clamp
makes an error under 1.7e-38), the sum of exp in 16 float64 lanes. float64 keeps libm's ``exp``.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from refmtp.backends.contracts import check_xent_backward, check_xent_forward
from refmtp.backends.numba_expf import LANES, dot_total, expf_parts, row_max_f32


def _xent_forward_loop(logits, targets, ignore_index, losses, lse):
    N, V = logits.shape
    for n in range(N):
        m = logits[n, 0]
        for v in range(1, V):
            if logits[n, v] > m:
                m = logits[n, v]
        s = 0.0
        for v in range(V):
            s += math.exp(logits[n, v] - m)
        lse[n] = math.log(s) + m
        t = targets[n]
        if t == ignore_index:
            losses[n] = 0.0
        else:
            losses[n] = lse[n] - logits[n, t]


def _xent_backward_loop(dlosses, logits, targets, lse, ignore_index, dlogits):
    N, V = logits.shape
    for n in range(N):
        t = targets[n]
        if t == ignore_index:
            for v in range(V):
                dlogits[n, v] = 0.0
            continue
        g = dlosses[n]
        for v in range(V):
            dlogits[n, v] = g * math.exp(logits[n, v] - lse[n])
        dlogits[n, t] -= g


def _xent_forward_f32_loop(logits, targets, ignore_index, losses, lse):
    """float32 twin of ``_xent_forward_loop`` that vectorises (module docstring)."""
    N, V = logits.shape
    bits = logits.view(np.int32)
    ef = np.empty(V, np.float32)  # e^f of e^(z - m) = e^f 2^k
    two_k = np.empty(V, np.float32)  # 2^k, written through its int32 view
    two_k_bits = two_k.view(np.int32)
    acc = np.empty(LANES, np.float64)
    for n in range(N):
        zr = logits[n]
        m = row_max_f32(bits[n], V, ef)
        for v in range(V):
            ef[v], two_k_bits[v] = expf_parts(zr[v] - m)
        s = dot_total(acc, ef, two_k, V)  # sum of e^(z - m) = e^f 2^k, in float64 lanes
        lse[n] = math.log(s) + m
        t = targets[n]
        if t == ignore_index:
            losses[n] = 0.0
        else:
            losses[n] = lse[n] - zr[t]


def _xent_backward_f32_loop(dlosses, logits, targets, lse, ignore_index, dlogits):
    """float32 twin of ``_xent_backward_loop`` that vectorises (module docstring)."""
    N, V = logits.shape
    two_k = np.empty(V, np.float32)
    two_k_bits = two_k.view(np.int32)
    for n in range(N):
        t = targets[n]
        dr = dlogits[n]
        if t == ignore_index:
            dr[:] = 0
            continue
        g, zr, ln = dlosses[n], logits[n], lse[n]
        for v in range(V):
            dr[v], two_k_bits[v] = expf_parts(zr[v] - ln)
        for v in range(V):
            dr[v] = g * (dr[v] * two_k[v])
        dr[t] -= g


xent_forward_numba = njit(cache=True, nogil=True)(_xent_forward_loop)
xent_backward_numba = njit(cache=True, nogil=True)(_xent_backward_loop)
xent_forward_f32_numba = njit(cache=True, nogil=True)(_xent_forward_f32_loop)
xent_backward_f32_numba = njit(cache=True, nogil=True)(_xent_backward_f32_loop)


def xent_forward(logits, targets, ignore_index=-100):
    """Same contract as ``xent_forward_ref``: returns (losses (N,), lse (N,))."""
    logits = np.ascontiguousarray(logits)
    targets = np.ascontiguousarray(targets, dtype=np.int64)
    check_xent_forward(logits, targets)
    losses = np.empty(logits.shape[0], dtype=logits.dtype)
    lse = np.empty(logits.shape[0], dtype=logits.dtype)
    if logits.shape[0]:
        loop = xent_forward_f32_numba if logits.dtype == np.float32 else xent_forward_numba
        loop(logits, targets, np.int64(ignore_index), losses, lse)
    return losses, lse


def xent_backward(dlosses, logits, targets, lse, ignore_index=-100):
    """Same contract as ``xent_backward_ref``: returns dlogits (N, V)."""
    logits = np.ascontiguousarray(logits)
    dlosses = np.ascontiguousarray(dlosses, dtype=logits.dtype)
    targets = np.ascontiguousarray(targets, dtype=np.int64)
    lse = np.ascontiguousarray(lse)
    check_xent_backward(dlosses, logits, targets, lse)
    dlogits = np.empty_like(logits)
    if logits.shape[0]:
        loop = xent_backward_f32_numba if logits.dtype == np.float32 else xent_backward_numba
        loop(dlosses, logits, targets, lse, np.int64(ignore_index), dlogits)
    return dlogits


KERNELS = {"xent_forward": xent_forward, "xent_backward": xent_backward}
