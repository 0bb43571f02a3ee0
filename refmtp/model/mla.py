"""Multi-head Latent Attention (MLA), forward and hand-derived backward (docs/deepseek-v3.md §2.1-2.8; report eqs. 1-11).

Per token, with ``x`` already ``input_layernorm``-ed (dimension letters of docs/architecture.md):

    cQ     = q_a_layernorm(x Wq_a^T)                          (B,T,Rq)      eq. 6 + norm
    q      = cQ Wq_b^T   (or x Wq^T when q_lora_rank is None)  (B,T,H*(Dn+Dr)), row h*(Dn+Dr)+c
    q_nope = q[h, :Dn]                                        (B,H,T,Dn)    eq. 7
    q_pe   = RoPE(q[h, Dn:])                                  (B,H,T,Dr)    eq. 8
    kv     = x Wkv_a^T = [c_raw | k_pe_raw]  (latent first)   (B,T,Rkv+Dr)
    c_KV   = kv_a_layernorm(c_raw)                            (B,T,Rkv)     eq. 1 + norm
    k_pe   = RoPE(k_pe_raw), NO norm, shared by all heads     (B,T,Dr)      eq. 3
    kvb    = c_KV Wkv_b^T, row h*(Dn+Dv)+c                    (B,T,H*(Dn+Dv))
    k_nope = kvb[h, :Dn],  v = kvb[h, Dn:]                    (B,H,T,Dn), (B,H,T,Dv)  eqs. 2, 5
    q_h = [q_nope ; q_pe],  k_h = [k_nope ; k_pe]   (nope first, then rope)   eqs. 4, 9
    o   = causal_attention(q, k, v, scale=softmax_scale(cfg))  (B,H,T,Dv)  eq. 10
    out = concat_h(o) Wo^T                                    (B,T,d)       eq. 11

The backward composes the ops' backwards in exact reverse order; the shared ``k_pe`` receives
the SUM over heads of its per-head gradients (docs/deepseek-v3.md §2.8). Derivation:
docs/derivations/attention-mla.md.

Parameters (local names, layer prefix ``model.layers.L.self_attn.`` stripped; shapes from
:func:`mla_param_shapes`): ``q_a_proj.weight``, ``q_a_layernorm.weight``, ``q_b_proj.weight``
(or ``q_proj.weight`` when ``cfg.q_lora_rank is None``), ``kv_a_proj_with_mqa.weight``,
``kv_a_layernorm.weight``, ``kv_b_proj.weight``, ``o_proj.weight``.

Decoding helpers (forward only): :func:`mla_latent_kv` gives what the latent cache stores per
token (post-norm ``c_KV``, post-RoPE ``k_pe``; docs/deepseek-v3.md §2.7), :func:`mla_query` the query parts
``(q_nope, q_pe)``, :func:`mla_kv_b_heads` the per-head ``W_UK``/``W_UV`` views of kv_b_proj for
the absorbed form.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from refmtp.backends import backend_of
from refmtp.mutation import on
from refmtp.params import mla_param_shapes
from refmtp.model.ops.attention import AttentionCache, attention_backward, attention_forward
from refmtp.model.ops.linear import LinearCache, linear_backward, linear_forward
from refmtp.model.ops.rmsnorm import RMSNormCache, rmsnorm_backward, rmsnorm_forward
from refmtp.model.ops.rope import (RopeCache, check_positions, rope_backward, rope_forward, rope_tables,
                                   softmax_scale)


# ------------------------------------------------------------------------------------------
# parameters
# ------------------------------------------------------------------------------------------
def _check_params(p, cfg, x):
    shapes = mla_param_shapes(cfg)
    missing = [k for k in shapes if k not in p]
    if missing:
        raise ValueError(
            f"mla: parameter {missing[0]!r} is missing; MLA needs {', '.join(shapes)} "
            "(local names, layer prefix stripped)"
        )
    extra = [k for k in p if k not in shapes]
    if extra:
        hint = (" (q_lora_rank is None: use q_proj.weight)" if cfg.q_lora_rank is None
                else " (q_lora_rank is set: use q_a_proj/q_a_layernorm/q_b_proj)")
        raise ValueError(f"mla: unexpected parameter {extra[0]!r}{hint}")
    for k, shape in shapes.items():
        if tuple(p[k].shape) != shape:
            raise ValueError(f"mla: {k} has shape {tuple(p[k].shape)}, the config needs {shape}")
        if p[k].dtype != x.dtype:
            raise ValueError(f"mla: {k} is {p[k].dtype} but x is {x.dtype}; use one float dtype")


def check_mla(x, p, cfg, positions) -> None:
    """The MLA layer's contract (one-line ValueErrors): x (B, T, hidden_size), positions (T,),
    the local parameter names, shapes and dtype. Called once at an entry point (tests, the
    audit); :func:`mla_forward` and the decoding helpers assume it holds (the model validates
    every parameter once per call with refmtp.params.check_params)."""
    _check_inputs(x, cfg, positions)
    _check_params(p, cfg, x)
    check_positions(positions, x)


def _check_inputs(x, cfg, positions):
    if x.ndim != 3 or x.shape[-1] != cfg.hidden_size:
        raise ValueError(
            f"mla: x must be (B, T, hidden_size={cfg.hidden_size}), got {tuple(x.shape)}"
        )
    if tuple(positions.shape) != (x.shape[1],):
        raise ValueError(
            f"mla: positions must be (T,) = ({x.shape[1]},) int64, got shape {tuple(positions.shape)}"
        )


# ------------------------------------------------------------------------------------------
# the two input paths (shared by mla_forward and the decoding helpers)
# ------------------------------------------------------------------------------------------
def _query_forward(x, p, cfg, cos, sin):
    """x (B,T,d) -> q_nope (B,H,T,Dn), q_pe (B,H,T,Dr) and the caches of the query path."""
    xp = backend_of(x).xp
    B, T, _ = x.shape
    H, Dn, Dr = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    if cfg.q_lora_rank is None:
        q, c_q = linear_forward(x, p["q_proj.weight"])  # (B,T,H*(Dn+Dr))
        c_qa = c_qn = None
    else:
        cq_raw, c_qa = linear_forward(x, p["q_a_proj.weight"])  # (B,T,Rq)  eq. 6
        cq, c_qn = rmsnorm_forward(cq_raw, p["q_a_layernorm.weight"], _latent_eps(cfg))  # (B,T,Rq)
        if on("mla.no_q_a_layernorm"):
            cq = cq_raw
        q, c_q = linear_forward(cq, p["q_b_proj.weight"])  # (B,T,H*(Dn+Dr))  eqs. 7-8 (W^UQ, W^QR)
    q = xp.permute_dims(xp.reshape(q, (B, T, H, Dn + Dr)), (0, 2, 1, 3))  # (B,H,T,Dn+Dr), row h*(Dn+Dr)+c
    q_nope, q_pe_raw = q[..., :Dn], q[..., Dn:]  # (B,H,T,Dn), (B,H,T,Dr)  eqs. 7-8
    if on("mla.q_split_swapped"):
        q_pe_raw, q_nope = q[..., :Dr], q[..., Dr:]
    q_pe, c_qr = rope_forward(q_pe_raw, cos, sin)  # (B,H,T,Dr)  eq. 8
    return q_nope, q_pe, (c_qa, c_qn, c_q, c_qr)


def _latent_forward(x, p, cfg, cos, sin):
    """x (B,T,d) -> c_KV (B,T,Rkv) post-norm, k_pe (B,T,Dr) post-RoPE, and their caches."""
    Rkv = cfg.kv_lora_rank
    kv, c_kva = linear_forward(x, p["kv_a_proj_with_mqa.weight"])  # (B,T,Rkv+Dr), latent first
    c_raw, k_pe_raw = kv[..., :Rkv], kv[..., Rkv:]  # (B,T,Rkv), (B,T,Dr)
    if on("mla.kv_a_split_swapped"):
        k_pe_raw, c_raw = kv[..., :cfg.qk_rope_head_dim], kv[..., cfg.qk_rope_head_dim:]
    c_kv, c_kvn = rmsnorm_forward(c_raw, p["kv_a_layernorm.weight"], _latent_eps(cfg))  # (B,T,Rkv) eq. 1
    if on("mla.no_kv_a_layernorm"):
        c_kv = c_raw
    k_pe, c_kr = rope_forward(k_pe_raw, cos, sin)  # (B,T,Dr)  eq. 3, no norm on k_pe
    return c_kv, k_pe, (c_kva, c_kvn, c_kr)


def _kv_up(c_kv, p, cfg):
    """c_KV (B,S,Rkv) -> k_nope (B,H,S,Dn), v (B,H,S,Dv) and the linear cache (eqs. 2, 5)."""
    xp = backend_of(c_kv).xp
    B, S, _ = c_kv.shape
    H, Dn, Dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    kvb, c_kvb = linear_forward(c_kv, p["kv_b_proj.weight"])  # (B,S,H*(Dn+Dv)), row h*(Dn+Dv)+c
    kvb = xp.permute_dims(xp.reshape(kvb, (B, S, H, Dn + Dv)), (0, 2, 1, 3))  # (B,H,S,Dn+Dv)
    if on("mla.kv_b_split_swapped"):
        return kvb[..., Dv:], kvb[..., :Dv], c_kvb
    return kvb[..., :Dn], kvb[..., Dn:], c_kvb


def _latent_eps(cfg) -> float:
    """eps of q_a_layernorm and kv_a_layernorm: the config's rms_norm_eps, like every RMSNorm."""
    return 1e-5 if on("mla.latent_norm_eps") else cfg.rms_norm_eps


# ------------------------------------------------------------------------------------------
# forward / backward
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class MLACache:
    q_a_proj: LinearCache | None  # x -> cQ_raw (None when q_lora_rank is None)
    q_a_layernorm: RMSNormCache | None  # cQ_raw -> cQ (None when q_lora_rank is None)
    q_proj: LinearCache  # cQ -> q via q_b_proj (or x -> q via q_proj); (B,T,H*(Dn+Dr))
    q_rope: RopeCache  # q_pe_raw (B,H,T,Dr) -> q_pe
    kv_a_proj: LinearCache  # x -> [c_raw | k_pe_raw] (B,T,Rkv+Dr)
    kv_a_layernorm: RMSNormCache  # c_raw -> c_KV (B,T,Rkv)
    k_rope: RopeCache  # k_pe_raw (B,T,Dr) -> k_pe
    kv_b_proj: LinearCache  # c_KV -> [k_nope | v] per head (B,T,H*(Dn+Dv))
    attn: AttentionCache  # q (B,H,T,Dn+Dr), k (B,H,T,Dn+Dr), v (B,H,T,Dv), p (B,H,T,T)
    o_proj: LinearCache  # concat_h o (B,T,H*Dv) -> out (B,T,d)
    c_kv: Any  # (B,T,Rkv) post-norm latent (what the decoding cache stores)
    k_pe: Any  # (B,T,Dr) post-RoPE shared key part (what the decoding cache stores)
    cfg: Any  # ModelConfig (dimensions)


def mla_forward(x, p, cfg, positions):
    """MLA layer.  x (B,T,d) post-input_layernorm, p local-name dict, positions (T,) int64.

    Returns ``(out (B,T,d), MLACache)``; ``out`` excludes the residual. Keys are the same T
    tokens (no cache), so the causal mask has ``start = 0``; ``positions`` only feed RoPE.
    """
    bk = backend_of(x)
    xp = bk.xp
    B, T, _ = x.shape
    H, Dv, Dr = cfg.num_attention_heads, cfg.v_head_dim, cfg.qk_rope_head_dim
    cos, sin = rope_tables(cfg, positions, x)  # (T, Dr/2) each

    q_nope, q_pe, (c_qa, c_qn, c_q, c_qr) = _query_forward(x, p, cfg, cos, sin)
    c_kv, k_pe, (c_kva, c_kvn, c_kr) = _latent_forward(x, p, cfg, cos, sin)
    k_nope, v, c_kvb = _kv_up(c_kv, p, cfg)  # (B,H,T,Dn), (B,H,T,Dv)

    q = xp.concat([q_nope, q_pe], axis=-1)  # (B,H,T,Dn+Dr)  eq. 9, nope first
    k_pe_h = xp.broadcast_to(k_pe[:, None, :, :], (B, H, T, Dr))  # (B,H,T,Dr) shared by all heads
    k = xp.concat([k_nope, k_pe_h], axis=-1)  # (B,H,T,Dn+Dr)  eq. 4, nope first
    o, c_att = attention_forward(q, k, v, softmax_scale(cfg), start=0)  # (B,H,T,Dv)  eq. 10
    o = xp.reshape(xp.permute_dims(o, (0, 2, 1, 3)), (B, T, H * Dv))  # (B,H,T,Dv) -> (B,T,H*Dv)
    out, c_o = linear_forward(o, p["o_proj.weight"])  # (B,T,d)  eq. 11
    cache = MLACache(q_a_proj=c_qa, q_a_layernorm=c_qn, q_proj=c_q, q_rope=c_qr,
                     kv_a_proj=c_kva, kv_a_layernorm=c_kvn, k_rope=c_kr, kv_b_proj=c_kvb,
                     attn=c_att, o_proj=c_o, c_kv=c_kv, k_pe=k_pe, cfg=cfg)
    return out, cache


def mla_backward(dout, cache: MLACache):
    """Reverse of :func:`mla_forward`; returns ``(dx (B,T,d), grads {local name: array})``.

        do, dWo                 = linear_backward(dout)                        (eq. 11)
        dq, dk, dv              = attention_backward(do)                       (eq. 10)
        dq_nope, dq_pe          = dq[..., :Dn], dq[..., Dn:]                   (eq. 9)
        dk_nope, dk_pe          = dk[..., :Dn], SUM_h dk[..., Dn:]             (eq. 4, shared k_pe)
        dc_KV, dWkv_b           = linear_backward([dk_nope | dv] per head)     (eqs. 2, 5)
        dc_raw, dw_kv_norm      = rmsnorm_backward(dc_KV)                      (eq. 1 + norm)
        dk_pe_raw               = rope_backward(dk_pe)                         (eq. 3)
        dx_kv, dWkv_a           = linear_backward([dc_raw | dk_pe_raw])
        dq_pe_raw               = rope_backward(dq_pe)                         (eq. 8)
        dcQ, dWq_b              = linear_backward([dq_nope | dq_pe_raw] per head)
        dcQ_raw, dw_q_norm      = rmsnorm_backward(dcQ);  dx_q, dWq_a = linear_backward(dcQ_raw)
        dx                      = dx_q + dx_kv
    """
    xp = backend_of(dout).xp
    c, cfg = cache, cache.cfg
    B, T, _ = dout.shape
    H, Dn, Dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    grads = {}

    g = linear_backward(dout, c.o_proj)  # forward: out = o Wo^T
    grads["o_proj.weight"] = g.dweight  # (d, H*Dv)
    do = xp.permute_dims(xp.reshape(g.dx, (B, T, H, Dv)), (0, 2, 1, 3))  # (B,T,H*Dv) -> (B,H,T,Dv)

    ga = attention_backward(do, c.attn)  # dq, dk (B,H,T,Dn+Dr), dv (B,H,T,Dv)
    dq_nope, dq_pe = ga.dq[..., :Dn], ga.dq[..., Dn:]  # (B,H,T,Dn), (B,H,T,Dr)
    dk_nope = ga.dk[..., :Dn]  # (B,H,T,Dn)
    dk_pe = xp.sum(ga.dk[..., Dn:], axis=1)  # (B,T,Dr): k_pe is shared, so sum over heads
    if on("mla.k_pe_grad_one_head"):
        dk_pe = ga.dk[:, 0, :, Dn:]

    # key/value path: forward kvb = c_KV Wkv_b^T with per-head rows [k_nope | v]
    heads_last = (0, 2, 1, 3)  # (B,H,T,.) -> (B,T,H,.): each per-head concat is written in that order at once
    dkvb = xp.empty((B, T, H, Dn + Dv), dtype=dout.dtype)  # [dk_nope | dv] per head
    dkvb[..., :Dn] = xp.permute_dims(dk_nope, heads_last)
    dkvb[..., Dn:] = xp.permute_dims(ga.dv, heads_last)
    dkvb = xp.reshape(dkvb, (B, T, H * (Dn + Dv)))  # (B,T,H*(Dn+Dv)), no copy
    g = linear_backward(dkvb, c.kv_b_proj)
    grads["kv_b_proj.weight"] = g.dweight  # (H*(Dn+Dv), Rkv)
    gn = rmsnorm_backward(g.dx, c.kv_a_layernorm)  # forward: c_KV = norm(c_raw)
    grads["kv_a_layernorm.weight"] = gn.dweight  # (Rkv,)
    dk_pe_raw = rope_backward(dk_pe, c.k_rope).dx  # (B,T,Dr)  forward: k_pe = RoPE(k_pe_raw)
    dkv = xp.concat([gn.dx, dk_pe_raw], axis=-1)  # (B,T,Rkv+Dr), latent first
    g = linear_backward(dkv, c.kv_a_proj)
    grads["kv_a_proj_with_mqa.weight"] = g.dweight  # (Rkv+Dr, d)
    dx = g.dx  # (B,T,d)

    # query path: forward q_pe = RoPE(q[..., Dn:]), q rows h*(Dn+Dr)+c
    dq_pe_raw = rope_backward(dq_pe, c.q_rope).dx  # (B,H,T,Dr)
    dq = xp.empty((B, T, H, Dn + cfg.qk_rope_head_dim), dtype=dout.dtype)  # [dq_nope | dq_pe_raw] per head
    dq[..., :Dn] = xp.permute_dims(dq_nope, heads_last)
    dq[..., Dn:] = xp.permute_dims(dq_pe_raw, heads_last)
    dq = xp.reshape(dq, (B, T, H * (Dn + cfg.qk_rope_head_dim)))  # (B,T,H*(Dn+Dr)), no copy
    g = linear_backward(dq, c.q_proj)
    if cfg.q_lora_rank is None:
        grads["q_proj.weight"] = g.dweight  # (H*(Dn+Dr), d)
        return dx + g.dx, grads
    grads["q_b_proj.weight"] = g.dweight  # (H*(Dn+Dr), Rq)
    gn = rmsnorm_backward(g.dx, c.q_a_layernorm)  # forward: cQ = norm(cQ_raw)
    grads["q_a_layernorm.weight"] = gn.dweight  # (Rq,)
    g = linear_backward(gn.dx, c.q_a_proj)  # forward: cQ_raw = x Wq_a^T
    grads["q_a_proj.weight"] = g.dweight  # (Rq, d)
    return dx + g.dx, grads


# ------------------------------------------------------------------------------------------
# decoding helpers (forward only; no caches kept)
# ------------------------------------------------------------------------------------------
def mla_latent_kv(x, p, cfg, positions, tables=None):
    """What the latent KV cache stores per token (docs/deepseek-v3.md §2.7): ``(c_kv (B,T,Rkv), k_pe (B,T,Dr))``.

    ``c_kv`` is taken AFTER kv_a_layernorm, ``k_pe`` AFTER RoPE at ``positions`` (T,).
    ``tables``: ``(cos, sin)`` of exactly these positions when the caller has them already
    (a decoder slices them from tables built once), else built here with :func:`rope_tables`.
    """
    cos, sin = rope_tables(cfg, positions, x) if tables is None else tables
    c_kv, k_pe, _ = _latent_forward(x, p, cfg, cos, sin)
    return c_kv, k_pe


def mla_query(x, p, cfg, positions, tables=None):
    """The query parts ``(q_nope (B,H,T,Dn), q_pe (B,H,T,Dr))``, q_pe rotated at ``positions``
    (``tables`` as in :func:`mla_latent_kv`)."""
    cos, sin = rope_tables(cfg, positions, x) if tables is None else tables
    q_nope, q_pe, _ = _query_forward(x, p, cfg, cos, sin)
    return q_nope, q_pe


def mla_kv_up(c_kv, p, cfg):
    """Naive-mode keys/values from cached latents: c_kv (B,S,Rkv) -> (k_nope (B,H,S,Dn), v (B,H,S,Dv))."""
    k_nope, v, _ = _kv_up(c_kv, p, cfg)
    return k_nope, v


def mla_kv_b_heads(p, cfg):
    """Per-head views of kv_b_proj for absorbed decoding (docs/deepseek-v3.md §2.7):
    ``W_UK (H, Dn, Rkv)`` and ``W_UV (H, Dv, Rkv)``, i.e. ``Wkv_b.view(H, Dn+Dv, Rkv)`` split.

    Absorbed scores: ``q~ = W_UK[h]^T q_nope`` (Rkv), ``s = (q~ . c_kv_j + q_pe . k_pe_j) * scale``;
    output ``o_h = W_UV[h] (sum_j p_j c_kv_j)``.
    """
    xp = backend_of(p["kv_b_proj.weight"]).xp
    H, Dn, Dv, Rkv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    w = xp.reshape(p["kv_b_proj.weight"], (H, Dn + Dv, Rkv))  # (H, Dn+Dv, Rkv)
    return w[:, :Dn, :], w[:, Dn:, :]
