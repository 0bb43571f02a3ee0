"""Causal scaled-dot-product attention with a cache offset (docs/deepseek-v3.md §2.3 step 6, §2.6; report eq. 10).

Queries are the ``T`` newest tokens; keys and values cover ``S = start + T`` tokens (``start``
earlier ones from a cache, then the same ``T``). Query ``t`` sits at key index ``start + t`` and
sees keys ``j <= start + t``:

    s[t, j] = scale * q[t] . k[j]                     (B, H, T, S)
    s[t, j] = -inf  where j > start + t               (causal mask, no gradient through it)
    p = softmax_j(s)        (row max subtracted first, computed in the input dtype)
    o[t] = sum_j p[t, j] v[j]                         (B, H, T, Dv)

Every row keeps at least key 0, so no row is all -inf. MLA's scale is
:func:`refmtp.model.ops.rope.softmax_scale` (``qk_head_dim^-1/2 * mscale^2``); it is a plain argument
here. Derivation of the backward: docs/derivations/attention-mla.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from refmtp.backends import backend_of
from refmtp.mutation import on
from refmtp.precision import rounded


def causal_allowed(T: int, start: int, xp):
    """Boolean (T, start+T): True where key j is visible to query t, i.e. ``j <= start + t``."""
    t = xp.arange(T)[:, None]  # (T, 1) query rows
    j = xp.arange(start + T)[None, :]  # (1, S) key columns
    return j <= start + t  # (T, S)


def causal_softmax_ref(s, start: int):
    """s (..., T, S) scores, S = start + T -> p: softmax over the keys ``j <= start + t``, 0 beyond.

    The row max is subtracted first; key 0 is always visible, so it is finite.
    """
    xp = backend_of(s).xp
    T, S = s.shape[-2], s.shape[-1]
    if T > 1:  # one query (a decoded token) sees every key: nothing to mask
        allowed = causal_allowed(T, start, xp)  # (T, S)
        if on("mla.no_causal_mask"):
            allowed = xp.ones((T, S), dtype=xp.bool)
        s = xp.where(allowed, s, xp.asarray(-xp.inf, dtype=s.dtype))  # (..., T, S) masked
    m = xp.max(s, axis=-1, keepdims=True)  # (..., T, 1) row max
    e = xp.exp(s - m)  # exactly 0 on masked keys
    return e / xp.sum(e, axis=-1, keepdims=True)


def causal_softmax_backward_ref(p, dp, start: int):
    """``ds = p * (dp - sum_j(dp * p))`` for p = causal_softmax(s, start); 0 on masked keys (p = 0).

    ``start`` is unused here (p already carries the mask).
    """
    xp = backend_of(p, dp).xp
    return p * (dp - xp.sum(dp * p, axis=-1, keepdims=True))


def causal_attention_ref(q, k, v, scale: float, start: int):
    """The whole score square, masked: q (B,H,T,Dq), k (B,H,S,Dq), v (B,H,S,Dv) -> (o, p).

    Kernel: ``causal_attention`` (backends/numba_attention.py), which skips the masked blocks.
    """
    xp = backend_of(q, k, v).xp
    s = (q @ xp.matrix_transpose(k)) * scale  # (B, H, T, S)  eq. 10 logits
    p = causal_softmax_ref(s, start)  # (B, H, T, S)
    return rounded(p @ v), p  # o (B, H, T, Dv)


def causal_attention_backward_ref(dout, q, k, v, p, scale: float, start: int):
    """-> (dq, dk, dv) of :func:`causal_attention_ref` (equations: :func:`attention_backward`).

    Kernel: ``causal_attention_backward``.
    """
    xp = backend_of(dout, q, k, v, p).xp
    dv = rounded(xp.matrix_transpose(p) @ dout)  # (B, H, S, Dv)
    dp = dout @ xp.matrix_transpose(v)  # (B, H, T, S)
    ds = causal_softmax_backward_ref(p, dp, start)  # (B, H, T, S)
    dq = rounded((ds @ k) * scale)  # (B, H, T, Dq)
    dk = rounded((xp.matrix_transpose(ds) @ q) * scale)  # (B, H, S, Dq)
    return dq, dk, dv


@dataclass(frozen=True, slots=True)
class AttentionCache:
    q: Any  # (B, H, T, Dq) queries, for dk = ds^T q
    k: Any  # (B, H, S, Dq) keys, for dq = ds k
    v: Any  # (B, H, S, Dv) values, for dp = do v^T
    p: Any  # (B, H, T, S) softmax probabilities (0 on masked keys), for dv and the softmax backward
    scale: float  # score multiplier
    start: int  # cache offset: query t is token start + t


class AttentionGrads(NamedTuple):
    dq: Any  # (B, H, T, Dq)
    dk: Any  # (B, H, S, Dq)
    dv: Any  # (B, H, S, Dv)


def attention_forward(q, k, v, scale: float, start: int = 0):
    """Causal attention.  q (B,H,T,Dq), k (B,H,S,Dq), v (B,H,S,Dv), S = start+T -> o (B,H,T,Dv).

    Returns ``(o, AttentionCache)``. See the module docstring for the equations.
    """
    bk = backend_of(q, k, v)
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"attention: q, k, v must be 4-D (B, H, T|S, D), got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, H, T, Dq = q.shape
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"attention: start={start!r} must be an integer >= 0 (the cache length)")
    S = start + T
    if tuple(k.shape) != (B, H, S, Dq) or tuple(v.shape[:3]) != (B, H, S):
        raise ValueError(
            f"attention: with q {tuple(q.shape)} and start={start}, k must be {(B, H, S, Dq)} and "
            f"v (B, H, S, Dv) = {(B, H, S)} + (Dv,); got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    o, p = (bk.kernel("causal_attention") or causal_attention_ref)(q, k, v, scale, start)
    return o, AttentionCache(q=q, k=k, v=v, p=p, scale=float(scale), start=start)


def attention_backward(dout, cache: AttentionCache) -> AttentionGrads:
    """Softmax-attention backward (``dout`` = dL/do, (B, H, T, Dv)):

        forward o = p v            ->  dv = p^T dout,   dp = dout v^T
        forward p = softmax(s)     ->  ds = p * (dp - sum_j(dp * p))   (0 on masked keys, p = 0)
        forward s = scale q k^T    ->  dq = scale ds k,  dk = scale ds^T q
    """
    c = cache
    dq, dk, dv = (backend_of(dout).kernel("causal_attention_backward") or causal_attention_backward_ref)(
        dout, c.q, c.k, c.v, c.p, c.scale, c.start)
    return AttentionGrads(dq=dq, dk=dk, dv=dv)
