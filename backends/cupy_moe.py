"""CuPy RawKernels: MoE dispatch and combine (source: backends/moe_dispatch.cu).

Same contracts as ``refmtp.model.moe.moe_dispatch_plan_ref``, ``moe_permute_ref``,
``moe_permute_backward_ref``, ``moe_combine_ref`` and ``moe_combine_backward_ref``. The kernels
use no atomics (each output element has one owner thread adding its slots in dispatch order),
so they are deterministic and bit-exact with the NumPy reference except ``dweight`` (a
sequential sum, to rounding). Compiled lazily on first call; importing this module never
imports cupy.
"""
from __future__ import annotations

import numpy as np

from refmtp.backends.contracts import (check_moe_combine, check_moe_combine_backward,
                                       check_moe_dispatch_plan, check_moe_permute,
                                       check_moe_permute_backward)
from refmtp.backends.cupy_kernels import LazyKernel, cuda_type

_TEMPLATED = ("moe_permute", "moe_permute_backward", "moe_combine", "moe_combine_backward_dys",
              "moe_combine_backward_dweight")
_MOD = LazyKernel(
    "moe_dispatch",
    ["moe_plan_count", "moe_plan_place", "moe_inverse_permutation"]
    + [f"{k}<{t}>" for k in _TEMPLATED for t in ("float", "double")],
)


def _inverse(order):
    import cupy

    pos = cupy.empty_like(order)
    _MOD.launch("moe_inverse_permutation", order.shape[0], (order, np.int64(order.shape[0]), pos))
    return pos


def moe_dispatch_plan(topk_idx, n_experts):
    """Same contract as ``refmtp.model.moe.moe_dispatch_plan_ref``: (order (S,), offsets (E+1,))."""
    import cupy

    flat = cupy.ascontiguousarray(topk_idx.reshape(-1), dtype=cupy.int64)
    S, E = flat.shape[0], int(n_experts)
    check_moe_dispatch_plan(flat, E)  # a bad index would make the kernels write out of bounds
    counts = cupy.empty(E, dtype=cupy.int64)
    _MOD.launch("moe_plan_count", E, (flat, np.int64(S), np.int32(E), counts))
    offsets = cupy.zeros(E + 1, dtype=cupy.int64)
    offsets[1:] = cupy.cumsum(counts)  # integer prefix sum: exact
    order = cupy.empty(S, dtype=cupy.int64)
    _MOD.launch("moe_plan_place", E, (flat, np.int64(S), np.int32(E), offsets, order))
    return order, offsets


def moe_permute(x, order, K):
    """Same contract as ``refmtp.model.moe.moe_permute_ref``: xs (S, d)."""
    import cupy

    x = cupy.ascontiguousarray(x)
    order = cupy.ascontiguousarray(order, dtype=cupy.int64)
    check_moe_permute(x, order, K)
    S, d = order.shape[0], x.shape[1]
    xs = cupy.empty((S, d), dtype=x.dtype)
    _MOD.launch(f"moe_permute<{cuda_type(x.dtype, 'moe')}>", S * d,
                (x, order, np.int64(S), np.int32(K), np.int32(d), xs))
    return xs


def moe_permute_backward(dxs, order, n_tokens):
    """Same contract as ``refmtp.model.moe.moe_permute_backward_ref``: dx (N, d)."""
    import cupy

    dxs = cupy.ascontiguousarray(dxs)
    order = cupy.ascontiguousarray(order, dtype=cupy.int64)
    check_moe_permute_backward(dxs, order, n_tokens)
    S, d = dxs.shape
    N = int(n_tokens)
    K = S // N
    dx = cupy.empty((N, d), dtype=dxs.dtype)
    _MOD.launch(f"moe_permute_backward<{cuda_type(dxs.dtype, 'moe')}>", N * d,
                (dxs, _inverse(order), np.int64(N), np.int32(K), np.int32(d), dx))
    return dx


def moe_combine(ys, order, weight):
    """Same contract as ``refmtp.model.moe.moe_combine_ref``: y (N, d)."""
    import cupy

    ys = cupy.ascontiguousarray(ys)
    weight = cupy.ascontiguousarray(weight, dtype=ys.dtype)
    order = cupy.ascontiguousarray(order, dtype=cupy.int64)
    check_moe_combine(ys, order, weight)
    N, K = weight.shape
    S, d = ys.shape
    y = cupy.empty((N, d), dtype=ys.dtype)
    _MOD.launch(f"moe_combine<{cuda_type(ys.dtype, 'moe')}>", N * d,
                (ys, order, _inverse(order), weight, np.int64(N), np.int32(K), np.int32(d), y))
    return y


def moe_combine_backward(dy, ys, order, weight):
    """Same contract as ``refmtp.model.moe.moe_combine_backward_ref``: (dys (S, d), dweight (N, K))."""
    import cupy

    ys = cupy.ascontiguousarray(ys)
    dy = cupy.ascontiguousarray(dy, dtype=ys.dtype)
    weight = cupy.ascontiguousarray(weight, dtype=ys.dtype)
    order = cupy.ascontiguousarray(order, dtype=cupy.int64)
    check_moe_combine_backward(dy, ys, order, weight)
    N, K = weight.shape
    S, d = ys.shape
    t = cuda_type(ys.dtype, 'moe')
    dys = cupy.empty_like(ys)
    dweight = cupy.empty((N, K), dtype=ys.dtype)
    _MOD.launch(f"moe_combine_backward_dys<{t}>", S * d,
                (dy, order, weight, np.int64(S), np.int32(K), np.int32(d), dys))
    _MOD.launch(f"moe_combine_backward_dweight<{t}>", S,
                (dy, ys, order, np.int64(S), np.int32(K), np.int32(d), dweight))
    return dys, dweight


KERNELS = {
    "moe_dispatch_plan": moe_dispatch_plan,
    "moe_permute": moe_permute,
    "moe_permute_backward": moe_permute_backward,
    "moe_combine": moe_combine,
    "moe_combine_backward": moe_combine_backward,
}
