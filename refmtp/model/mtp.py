"""One causal MTP module of DeepSeek-V3 (V3 eqs. 21-23; docs/deepseek-v3.md §4.2-4.5).

Module k (1-based) at row i (0 <= i < T-k) reads the embedding of token t_{i+k} and the state
h^{k-1}_i of the previous depth (h^0 = the main model's output after model.norm):

    e    = enorm(Emb(t_{i+k}))                                  (d,)
    hh   = hnorm(h^{k-1}_i)                                     (d,)
    x    = eh_proj([e ; hh])           embedding FIRST, as the released eh_proj expects (docs/deepseek-v3.md §4.2)
    y    = Block_k(x)                  a full decoder block at layer L+k-1, causal over T-k rows,
                                       RoPE positions 0..T-k-1 (the main model's positions)
    n    = shared_head.norm(y)         the module's own RMSNorm
    logits^k = lm_head(n)              the SHARED lm_head, done by refmtp.model

The state chained to depth k+1 is ``n`` (cfg.refmtp.mtp_chain == "post_norm", default) or ``y``
("pre_norm"); :mod:`refmtp.model` chooses. The embedding lookup and lm_head are shared with the
main model, so they live in model.py, where their gradients are summed; this module takes the
looked-up rows ``emb = Emb(t_{i+k})`` and returns ``n`` and ``y``.

Derivation of the backward: docs/derivations/mtp.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from refmtp.backends import backend_of
from refmtp.model.block import block_backward, block_forward
from refmtp.mutation import on
from refmtp.model.ops.linear import linear_backward, linear_forward
from refmtp.model.ops.rmsnorm import rmsnorm_backward, rmsnorm_forward


@dataclass(frozen=True, slots=True)
class MTPCache:
    enorm: Any  # RMSNormCache of enorm on emb (B, T', d)
    hnorm: Any  # RMSNormCache of hnorm on h_prev (B, T', d)
    eh_proj: Any  # LinearCache of eh_proj on [e ; hh] (B, T', 2d)
    block: Any  # BlockCache of the module's decoder block
    head_norm: Any  # RMSNormCache of shared_head.norm on y (B, T', d)
    d: int  # hidden size, where [e ; hh] is split in backward


def mtp_forward(emb, h_prev, p: dict, cfg, layer: int, positions, attend=None, *, train: bool = True):
    """emb (B, T', d) = Emb(t_{i+k}), h_prev (B, T', d) = h^{k-1}_i for i < T' = T-k,
    positions (T',) -> (n, y, aux, MTPCache) with n = shared_head.norm(y) and y the block
    output, both (B, T', d); aux the block's balance loss (None if the block is dense).

    ``p`` has the ``model.layers.{L+k-1}.`` prefix stripped; ``attend`` is the block's attention
    (None: full-sequence MLA; decoding passes the cached one, see refmtp.model.block).
    ``train=False`` (decoding): the same ``n`` and ``y``, ``aux`` and the cache are None.
    """
    xp = backend_of(emb, h_prev).xp
    if emb.shape != h_prev.shape:
        raise ValueError(
            f"mtp: embedding rows {tuple(emb.shape)} and previous-depth state "
            f"{tuple(h_prev.shape)} must have the same (B, T-k, d) shape"
        )
    eps = cfg.rms_norm_eps
    enorm, hnorm = p["enorm.weight"], p["hnorm.weight"]
    if on("mtp.norms_swapped"):
        enorm, hnorm = hnorm, enorm
    e, c_enorm = rmsnorm_forward(emb, enorm, eps)  # (B, T', d)
    hh, c_hnorm = rmsnorm_forward(h_prev, hnorm, eps)  # (B, T', d)
    eh = xp.concat([hh, e] if on("mtp.eh_concat_swapped") else [e, hh], axis=-1)  # (B, T', 2d), embedding first (eq. 21 as released)
    x, c_eh = linear_forward(eh, p["eh_proj.weight"])  # (B, T', 2d) -> (B, T', d)
    y, aux, c_block = block_forward(x, p, cfg, layer, positions, attend, train=train)  # (B, T', d)
    n, c_head = rmsnorm_forward(y, p["shared_head.norm.weight"], eps)  # (B, T', d)
    if on("mtp.no_head_norm"):
        n = y
    if not train:
        return n, y, None, None
    cache = MTPCache(enorm=c_enorm, hnorm=c_hnorm, eh_proj=c_eh, block=c_block, head_norm=c_head,
                     d=int(emb.shape[-1]))
    return n, y, aux, cache


def mtp_backward(dn, dy, daux, cache: MTPCache):
    """dn = dL/dn (B, T', d); dy = extra dL/dy from the pre-norm chain, or None; daux = dL/daux.
    Returns (demb, dh_prev, grads) with grads under the module's local names.

        dy_total = shared_head.norm^T(dn) (+ dy)           forward n = norm(y)
        dx, dblock = Block^T(dy_total, daux)               forward y = Block(x)
        deh = dx eh_proj;  d eh_proj = dx^T [e ; hh]       forward x = [e ; hh] eh_proj^T
        de, dhh = deh[..., :d], deh[..., d:]               forward concat (embedding first)
        demb = enorm^T(de);  dh_prev = hnorm^T(dhh)
    """
    grads = {}
    g = rmsnorm_backward(dn, cache.head_norm)  # forward: n = shared_head.norm(y)
    grads["shared_head.norm.weight"] = g.dweight
    dy_total = g.dx if dy is None else g.dx + dy  # both uses of y (logits path, pre-norm chain)
    dx, g_block = block_backward(dy_total, daux, cache.block)  # forward: y = Block_k(x)
    grads.update(g_block)
    g = linear_backward(dx, cache.eh_proj)  # forward: x = [e ; hh] @ eh_proj^T
    grads["eh_proj.weight"] = g.dweight
    d = cache.d
    de, dhh = g.dx[..., :d], g.dx[..., d:]  # forward: concat([e, hh]), embedding first
    g = rmsnorm_backward(de, cache.enorm)  # forward: e = enorm(emb)
    grads["enorm.weight"] = g.dweight
    demb = g.dx
    g = rmsnorm_backward(dhh, cache.hnorm)  # forward: hh = hnorm(h_prev)
    grads["hnorm.weight"] = g.dweight
    dh_prev = g.dx
    return demb, dh_prev, dict(sorted(grads.items()))
