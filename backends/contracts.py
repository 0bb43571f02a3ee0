"""Argument contracts of the kernels: one check per kernel, called by every wrapper of it.

A kernel name (``rope_apply``, ``xent_forward``, ``moe_combine``, ...) has a plain array
reference in ``refmtp/`` and a wrapper on each backend (``numba_<op>.py``, ``cupy_<op>.py``) with
the reference's signature. What those wrappers accept is checked here, once, on the raw inputs
(numpy or cupy arrays: only ``.shape``, ``.ndim``, ``.dtype``, ``.size``, ``.min()``, ``.max()``
are used), before any layout change. Errors are one line. The wrappers keep only their layout
work (contiguity, index dtype) and the launch.

Checks that need the values (index ranges) cost a device -> host copy of two scalars on cupy;
they are kept where an out-of-range value would make a kernel read or write out of bounds.

``verify_drafts_batch`` has no entry: its public function
(``refmtp.inference.acceptance.verify_drafts_batch``) validates every input before it
dispatches, and both wrappers rely on that (documented in numba_accept.py / cupy_accept.py).
"""
from __future__ import annotations

import numpy as np
from array_api_compat import array_namespace

_FLOATS = (np.float32, np.float64)


def _float(a, name: str, who: str) -> None:
    if a.dtype not in _FLOATS:
        raise TypeError(f"{who}: {name} must be float32 or float64, got {a.dtype}")


# -------------------------------------------------------------------------------------------
# rope_apply (reference: refmtp.model.ops.rope.rope_apply_ref)
# -------------------------------------------------------------------------------------------
def check_rope_apply(x, cos, sin) -> None:
    """x (..., T, Dr) with Dr even, cos/sin (T, Dr/2), one float dtype for all three."""
    if x.ndim < 2 or x.shape[-1] % 2 or tuple(cos.shape) != (x.shape[-2], x.shape[-1] // 2) \
            or tuple(sin.shape) != tuple(cos.shape):
        raise ValueError(
            f"rope_apply: expected x (..., T, Dr) with Dr even and cos/sin (T, Dr/2), got "
            f"{tuple(x.shape)}, {tuple(cos.shape)}, {tuple(sin.shape)}"
        )
    if x.dtype not in _FLOATS or cos.dtype != x.dtype or sin.dtype != x.dtype:
        raise ValueError(
            f"rope_apply: x, cos, sin must share one float dtype (float32 or float64), got "
            f"{x.dtype}, {cos.dtype}, {sin.dtype}"
        )


# -------------------------------------------------------------------------------------------
# xent_forward / xent_backward (references: refmtp.model.ops.xent.xent_*_ref). The target range
# is the public op's check (xent_forward), made once per step, not repeated per kernel call.
# -------------------------------------------------------------------------------------------
def check_xent_forward(logits, targets) -> None:
    """logits (N, V) float32/float64 with V >= 1 when N >= 1, targets (N,)."""
    if logits.ndim != 2 or tuple(targets.shape) != (logits.shape[0],) \
            or (logits.shape[0] and logits.shape[1] < 1):
        raise ValueError(
            f"xent kernel: expected logits (N, V) with V >= 1 and targets (N,), got "
            f"{tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    _float(logits, "logits", "xent kernel")


def check_xent_backward(dlosses, logits, targets, lse) -> None:
    """As :func:`check_xent_forward`, plus dlosses (N,) and lse (N,)."""
    check_xent_forward(logits, targets)
    N = logits.shape[0]
    if tuple(dlosses.shape) != (N,) or tuple(lse.shape) != (N,):
        raise ValueError(
            f"xent kernel: dlosses and lse must be (N,) = ({N},), got {tuple(dlosses.shape)} "
            f"and {tuple(lse.shape)}"
        )


# -------------------------------------------------------------------------------------------
# MoE dispatch / combine (references: refmtp.model.moe.moe_*_ref). The reference of the plan
# calls check_moe_dispatch_plan itself: the expert range is part of its contract too.
# -------------------------------------------------------------------------------------------
def check_moe_dispatch_plan(topk_idx, n_experts: int) -> None:
    """Every expert index in [0, n_experts). int() syncs device -> host on cupy: two scalars,
    once per layer call."""
    xp = array_namespace(topk_idx)
    if topk_idx.size and (int(xp.min(topk_idx)) < 0 or int(xp.max(topk_idx)) >= n_experts):
        raise ValueError(f"moe dispatch: expert indices must lie in [0, {n_experts})")


def _check_order(order, S: int) -> None:
    if tuple(order.shape) != (S,):
        raise ValueError(f"moe kernel: order has shape {tuple(order.shape)}, expected ({S},)")


def check_moe_permute(x, order, K: int) -> None:
    """x (N, d) float, order (S,) slot ids in [0, N*K)."""
    _float(x, "x", "moe kernel")
    if x.ndim != 2 or order.ndim != 1:
        raise ValueError(f"moe permute: expected x (N, d) and order (S,), got {tuple(x.shape)} and {tuple(order.shape)}")
    if order.size and (int(order.min()) < 0 or int(order.max()) >= x.shape[0] * K):
        raise ValueError(f"moe permute: slot ids must lie in [0, {x.shape[0] * K})")


def check_moe_permute_backward(dxs, order, n_tokens: int) -> None:
    """dxs (S, d) float with S a multiple of n_tokens >= 1, order (S,)."""
    _float(dxs, "dxs", "moe kernel")
    if dxs.ndim != 2:
        raise ValueError(f"moe permute_backward: dxs must be (S, d), got {tuple(dxs.shape)}")
    S = dxs.shape[0]
    if n_tokens < 1 or S % n_tokens:
        raise ValueError(f"moe permute_backward: {S} slots is not a multiple of {n_tokens} tokens")
    _check_order(order, S)


def check_moe_combine(ys, order, weight) -> None:
    """ys (N*K, d) float, order (N*K,), weight (N, K)."""
    _float(ys, "ys", "moe kernel")
    if ys.ndim != 2 or weight.ndim != 2:
        raise ValueError(f"moe combine: expected ys (S, d) and weight (N, K), got {tuple(ys.shape)} and {tuple(weight.shape)}")
    N, K = weight.shape
    if ys.shape[0] != N * K:
        raise ValueError(f"moe combine: ys has {ys.shape[0]} rows, expected N*K = {N * K}")
    _check_order(order, N * K)


def check_moe_combine_backward(dy, ys, order, weight) -> None:
    """dy (N, d), ys (N*K, d) float, order (N*K,), weight (N, K)."""
    _float(ys, "ys", "moe kernel")
    if ys.ndim != 2 or weight.ndim != 2:
        raise ValueError(f"moe combine_backward: expected ys (S, d) and weight (N, K), got {tuple(ys.shape)} and {tuple(weight.shape)}")
    N, K = weight.shape
    if ys.shape[0] != N * K or tuple(dy.shape) != (N, ys.shape[1]):
        raise ValueError(
            f"moe combine_backward: dy {tuple(dy.shape)} / ys {tuple(ys.shape)} do not fit weight ({N}, {K})"
        )
    _check_order(order, N * K)


# -------------------------------------------------------------------------------------------
# causal_attention / causal_attention_backward (references: refmtp.model.ops.attention.causal_attention*_ref)
# -------------------------------------------------------------------------------------------
def check_causal_attention(q, k, v, start) -> None:
    """q (B, H, T, Dq), k (B, H, S, Dq), v (B, H, S, Dv) of one float dtype, S = start + T."""
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
        raise ValueError(f"causal_attention: start={start!r} must be an integer >= 0")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"causal_attention: q, k, v must be 4-D, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, H, T, Dq = q.shape
    S = start + T
    if tuple(k.shape) != (B, H, S, Dq) or tuple(v.shape[:3]) != (B, H, S):
        raise ValueError(f"causal_attention: with q {tuple(q.shape)} and start={start}, k must be "
                         f"{(B, H, S, Dq)} and v {(B, H, S)} + (Dv,); got {tuple(k.shape)}, {tuple(v.shape)}")
    _float(q, "q", "causal_attention")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"causal_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")


def check_causal_attention_backward(dout, q, k, v, p, start) -> None:
    """the forward's q, k, v, start; dout (B, H, T, Dv) and p (B, H, T, S) of the same dtype."""
    check_causal_attention(q, k, v, start)
    B, H, T, _ = q.shape
    want_do, want_p = (B, H, T, v.shape[-1]), (B, H, T, start + T)
    if tuple(dout.shape) != want_do or tuple(p.shape) != want_p or dout.dtype != q.dtype or p.dtype != q.dtype:
        raise ValueError(f"causal_attention_backward: expected dout {want_do} and p {want_p} in {q.dtype}, got "
                         f"{tuple(dout.shape)} {dout.dtype} and {tuple(p.shape)} {p.dtype}")


# -------------------------------------------------------------------------------------------
# swiglu_gate / swiglu_gate_backward (references: refmtp.model.ops.swiglu.swiglu_gate*_ref)
# -------------------------------------------------------------------------------------------
def check_swiglu_gate(ab) -> None:
    """ab (N, 2I) float: the gate and up projections side by side."""
    if ab.ndim != 2 or ab.shape[1] % 2:
        raise ValueError(f"swiglu_gate: expected ab (N, 2I) with an even width, got {tuple(ab.shape)}")
    _float(ab, "ab", "swiglu_gate")


def check_swiglu_gate_backward(dh, ab, sig) -> None:
    """dh (N, I), ab (N, 2I), sig (N, I), one float dtype."""
    check_swiglu_gate(ab)
    half = (ab.shape[0], ab.shape[1] // 2)
    if tuple(dh.shape) != half or tuple(sig.shape) != half or not (dh.dtype == ab.dtype == sig.dtype):
        raise ValueError(f"swiglu_gate_backward: dh and sig must be {half} {ab.dtype} like ab's halves, got "
                         f"{tuple(dh.shape)} {dh.dtype} and {tuple(sig.shape)} {sig.dtype}")


# -------------------------------------------------------------------------------------------
# rmsnorm_rows / rmsnorm_rows_backward (references: refmtp.model.ops.rmsnorm.rmsnorm_rows*_ref)
# -------------------------------------------------------------------------------------------
def check_rmsnorm_rows(x, weight) -> None:
    """x (..., d) float, weight (d,) of the same dtype."""
    if x.ndim < 1 or tuple(weight.shape) != (x.shape[-1],):
        raise ValueError(f"rmsnorm kernel: expected x (..., d) and weight (d,), got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    _float(x, "x", "rmsnorm kernel")
    if weight.dtype != x.dtype:
        raise ValueError(f"rmsnorm kernel: x and weight dtypes differ ({x.dtype}, {weight.dtype})")


def check_rmsnorm_rows_backward(dout, x, weight, rstd) -> None:
    """As :func:`check_rmsnorm_rows`, plus dout like x and rstd (..., 1)."""
    check_rmsnorm_rows(x, weight)
    if tuple(dout.shape) != tuple(x.shape) or tuple(rstd.shape) != tuple(x.shape[:-1]) + (1,) \
            or dout.dtype != x.dtype or rstd.dtype != x.dtype:
        raise ValueError(f"rmsnorm kernel: dout must be {tuple(x.shape)} and rstd {tuple(x.shape[:-1]) + (1,)} "
                         f"in {x.dtype}, got {tuple(dout.shape)} {dout.dtype} and {tuple(rstd.shape)} {rstd.dtype}")


# -------------------------------------------------------------------------------------------
# sum_squares (reference: refmtp.training.optim.sum_squares_ref)
# -------------------------------------------------------------------------------------------
def check_sum_squares(g) -> None:
    """g: a float array of any shape."""
    _float(g, "g", "sum_squares kernel")


# -------------------------------------------------------------------------------------------
# adamw_update (reference: refmtp.training.optim.adamw_update_ref)
# -------------------------------------------------------------------------------------------
def check_adamw_update(p, g, m, v) -> None:
    """p, g, m, v: one shape and one float dtype."""
    _float(p, "p", "adamw kernel")
    for name, a in (("g", g), ("m", m), ("v", v)):
        if tuple(a.shape) != tuple(p.shape) or a.dtype != p.dtype:
            raise ValueError(f"adamw kernel: {name} is {tuple(a.shape)} {a.dtype}, p is {tuple(p.shape)} {p.dtype}")


# -------------------------------------------------------------------------------------------
# topk (reference: refmtp.backends.base.topk_ref; Backend.topk checks k and NaN first)
# -------------------------------------------------------------------------------------------
def check_topk(scores, k) -> None:
    """scores (..., n) float32/float64 with n >= 1, k an integer with 1 <= k <= n."""
    _float(scores, "scores", "topk")
    if scores.ndim < 1 or scores.shape[-1] < 1:
        raise ValueError(f"topk: scores must be (..., n) with n >= 1, got {tuple(scores.shape)}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= scores.shape[-1]:
        raise ValueError(f"topk: k={k!r} must be an integer between 1 and the last dimension {scores.shape[-1]}")
