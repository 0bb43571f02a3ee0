"""Numba kernels: MoE dispatch and combine (numpy backend).

References (same signatures, in ``refmtp.model.moe``): ``moe_dispatch_plan_ref``, ``moe_permute_ref``,
``moe_permute_backward_ref``, ``moe_combine_ref``, ``moe_combine_backward_ref``.

* The plan is a counting sort of the N*K slots by expert, filled in slot order, so it is the
  same stable permutation as the reference's stable argsort (bit-exact).
* Permute is a row copy (bit-exact).
* Combine and the permute's backward add the slots into their token in dispatch order
  p = 0..S-1, exactly as the reference's scatter-add (np.add.at) does, with the same products
  ``w * ys`` and no fastmath (so no fused multiply-add): bit-exact in float32 and float64.
* combine_backward's ``dweight = <dy, ys>`` adds the products (rounded to the input dtype, as
  the reference's) in 16 float64 lanes while numpy sums pairwise in the input dtype: parity with
  the reference is to rounding there (everything else is bit-exact).

The compiled loops ``<op>_numba`` are bit-exact with their ``.py_func``; NUMBA_DISABLE_JIT=1 runs
them as plain Python.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from refmtp.backends.contracts import (check_moe_combine, check_moe_combine_backward,
                                       check_moe_dispatch_plan, check_moe_permute,
                                       check_moe_permute_backward)
from refmtp.backends.numba_expf import LANES, dot_total


def _moe_dispatch_plan_loop(flat_idx, n_experts, order, offsets):
    """Stable counting sort: order (S,) slot ids by expert, offsets (E+1,) block starts."""
    S = flat_idx.shape[0]
    for e in range(n_experts + 1):
        offsets[e] = 0
    for j in range(S):  # counts, shifted by one
        offsets[flat_idx[j] + 1] += 1
    for e in range(n_experts):  # inclusive prefix sum -> block starts
        offsets[e + 1] += offsets[e]
    fill = offsets[:n_experts].copy()  # next free row of each expert's block
    for j in range(S):  # slot order kept inside each block (stable)
        e = flat_idx[j]
        order[fill[e]] = j
        fill[e] += 1


def _moe_permute_loop(x, order, K, xs):
    S, d = xs.shape
    for p in range(S):
        n = order[p] // K
        for c in range(d):
            xs[p, c] = x[n, c]


def _moe_permute_backward_loop(dxs, order, K, dx):
    S, d = dxs.shape
    dx[:, :] = 0.0
    for p in range(S):  # dispatch order, as the reference's scatter-add
        n = order[p] // K
        for c in range(d):
            dx[n, c] += dxs[p, c]


def _moe_combine_loop(ys, order, wflat, K, y):
    S, d = ys.shape
    y[:, :] = 0.0
    for p in range(S):  # dispatch order, as the reference's scatter-add
        j = order[p]
        n = j // K
        w = wflat[j]
        for c in range(d):
            y[n, c] += ys[p, c] * w


def _moe_combine_backward_loop(dy, ys, order, wflat, K, dys, dwflat):
    """dweight's dot products in 16 float64 lanes (``dot_total``, backends/numba_expf.py; the
    products in the dtype, as the reference forms them): the adds vectorise."""
    S, d = ys.shape
    acc = np.empty(LANES, np.float64)  # float64 accumulators for either dtype
    for p in range(S):
        j = order[p]
        n = j // K
        w = wflat[j]
        dyr, ysr, dysr = dy[n], ys[p], dys[p]
        for c in range(d):
            dysr[c] = dyr[c] * w
        dwflat[j] = dot_total(acc, dyr, ysr, d)


moe_dispatch_plan_numba = njit(cache=True, nogil=True)(_moe_dispatch_plan_loop)
moe_permute_numba = njit(cache=True, nogil=True)(_moe_permute_loop)
moe_permute_backward_numba = njit(cache=True, nogil=True)(_moe_permute_backward_loop)
moe_combine_numba = njit(cache=True, nogil=True)(_moe_combine_loop)
moe_combine_backward_numba = njit(cache=True, nogil=True)(_moe_combine_backward_loop)


# -------------------------------------------------------------------------------------------
# Wrappers with the reference signatures (contracts: refmtp.backends.contracts)
# -------------------------------------------------------------------------------------------
def moe_dispatch_plan(topk_idx, n_experts):
    """Same contract as ``refmtp.model.moe.moe_dispatch_plan_ref``."""
    flat = np.ascontiguousarray(topk_idx, dtype=np.int64).reshape(-1)
    check_moe_dispatch_plan(flat, n_experts)
    order = np.empty(flat.size, dtype=np.int64)
    offsets = np.empty(n_experts + 1, dtype=np.int64)
    moe_dispatch_plan_numba(flat, np.int64(n_experts), order, offsets)
    return order, offsets


def moe_permute(x, order, K):
    """Same contract as ``refmtp.model.moe.moe_permute_ref``."""
    x = np.ascontiguousarray(x)
    order = np.ascontiguousarray(order, dtype=np.int64)
    check_moe_permute(x, order, K)
    xs = np.empty((order.shape[0], x.shape[1]), dtype=x.dtype)
    moe_permute_numba(x, order, np.int64(K), xs)
    return xs


def moe_permute_backward(dxs, order, n_tokens):
    """Same contract as ``refmtp.model.moe.moe_permute_backward_ref``."""
    dxs = np.ascontiguousarray(dxs)
    order = np.ascontiguousarray(order, dtype=np.int64)
    check_moe_permute_backward(dxs, order, n_tokens)
    K = dxs.shape[0] // n_tokens
    dx = np.empty((n_tokens, dxs.shape[1]), dtype=dxs.dtype)
    moe_permute_backward_numba(dxs, order, np.int64(K), dx)
    return dx


def moe_combine(ys, order, weight):
    """Same contract as ``refmtp.model.moe.moe_combine_ref``."""
    ys = np.ascontiguousarray(ys)
    weight = np.ascontiguousarray(weight, dtype=ys.dtype)
    order = np.ascontiguousarray(order, dtype=np.int64)
    check_moe_combine(ys, order, weight)
    N, K = weight.shape
    y = np.empty((N, ys.shape[1]), dtype=ys.dtype)
    moe_combine_numba(ys, order, weight.reshape(-1), np.int64(K), y)
    return y


def moe_combine_backward(dy, ys, order, weight):
    """Same contract as ``refmtp.model.moe.moe_combine_backward_ref``."""
    ys = np.ascontiguousarray(ys)
    dy = np.ascontiguousarray(dy, dtype=ys.dtype)
    weight = np.ascontiguousarray(weight, dtype=ys.dtype)
    order = np.ascontiguousarray(order, dtype=np.int64)
    check_moe_combine_backward(dy, ys, order, weight)
    N, K = weight.shape
    dys = np.empty_like(ys)
    dw = np.empty(N * K, dtype=ys.dtype)
    moe_combine_backward_numba(dy, ys, order, weight.reshape(-1), np.int64(K), dys, dw)
    return dys, dw.reshape(N, K)


KERNELS = {
    "moe_dispatch_plan": moe_dispatch_plan,
    "moe_permute": moe_permute,
    "moe_permute_backward": moe_permute_backward,
    "moe_combine": moe_combine,
    "moe_combine_backward": moe_combine_backward,
}
