"""Softmax cross-entropy with an ignore index, fused (the combined derivative is simpler).

Per row: ``loss_n = logsumexp(z_n) - z_n[y_n]`` (0 where ``y_n == ignore_index``). The caller
reduces (sum / normaliser), so the per-depth MTP normalisers live in the model's loss code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from refmtp.backends import backend_of

IGNORE_INDEX = -100


@dataclass(frozen=True, slots=True)
class XentCache:
    logits: Any  # (N, V)
    targets: Any  # (N,) int64, ignore_index rows masked
    lse: Any  # (N,) logsumexp of each row (max-subtracted), so softmax = exp(z - lse)
    ignore_index: int


class XentGrads(NamedTuple):
    dlogits: Any  # (N, V)


def xent_forward_ref(logits, targets, ignore_index: int = IGNORE_INDEX):
    """Plain array version. logits (N, V), targets (N,) -> losses (N,), lse (N,)."""
    xp = backend_of(logits, targets).xp
    m = xp.max(logits, axis=-1, keepdims=True)  # subtract the row max for stability
    lse = xp.log(xp.sum(xp.exp(logits - m), axis=-1)) + m[:, 0]  # (N,)
    valid = targets != ignore_index
    safe = xp.where(valid, targets, 0)
    picked = xp.take_along_axis(logits, safe[:, None], axis=-1)[:, 0]  # z_n[y_n]
    losses = xp.where(valid, lse - picked, xp.zeros_like(lse))
    return losses, lse


def xent_backward_ref(dlosses, logits, targets, lse, ignore_index: int = IGNORE_INDEX):
    """Plain array version: ``dz = dloss * (softmax(z) - onehot(y))``, 0 on ignored rows."""
    xp = backend_of(dlosses, logits).xp
    valid = targets != ignore_index
    p = xp.exp(logits - lse[:, None])  # softmax
    V = logits.shape[-1]
    onehot = xp.astype(xp.arange(V)[None, :] == targets[:, None], logits.dtype)
    w = xp.where(valid, dlosses, xp.zeros_like(dlosses))
    return w[:, None] * (p - onehot)


def xent_forward(logits, targets, ignore_index: int = IGNORE_INDEX):
    """logits (N, V) float, targets (N,) int in [0, V) or ignore_index -> losses (N,)."""
    bk = backend_of(logits, targets)
    xp = bk.xp
    if logits.ndim != 2 or targets.shape != (logits.shape[0],):
        raise ValueError(
            f"xent: expected logits (N, V) and targets (N,), got {tuple(logits.shape)} and "
            f"{tuple(targets.shape)}"
        )
    V = logits.shape[1]
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bool(xp.any(bad)):
        raise ValueError(f"xent: targets must be in [0, {V}) or {ignore_index}")
    fast = bk.kernel("xent_forward")
    losses, lse = (fast or xent_forward_ref)(logits, targets, ignore_index)
    return losses, XentCache(logits=logits, targets=targets, lse=lse, ignore_index=ignore_index)


def xent_backward(dout, cache: XentCache) -> XentGrads:
    """forward ``loss_n = lse_n - z_n[y_n]``  ->  ``dz_n = dout_n * (softmax(z_n) - onehot(y_n))``."""
    bk = backend_of(dout)
    fast = bk.kernel("xent_backward")
    dlogits = (fast or xent_backward_ref)(dout, cache.logits, cache.targets, cache.lse,
                                          cache.ignore_index)
    return XentGrads(dlogits=dlogits)
