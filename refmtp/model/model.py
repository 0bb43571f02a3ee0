"""The whole DeepSeek-V3 model with causal MTP (or parallel heads), its loss and its backward.

    from refmtp.config import preset
    from refmtp.model import init_params, forward, backward, update_expert_bias

    cfg = preset("tiny")
    params = init_params(cfg, seed=0, backend="numpy", dtype="float64")
    out, cache = forward(params, cfg, tokens)   # tokens (B, T+1) int64; main reads [:, :T]
    grads = backward(cache)                     # d losses["total"] / d params (no bias entries)
    update_expert_bias(params, out.load, cfg.refmtp.bias_update_gamma)

Forward, as a flat list of calls (docs/deepseek-v3.md §5.1; V3 eqs. 21-25; docs/model.md):

    x0       = Emb(t_{0..T-1})                                    embedding_forward
    x_{l+1}  = Block_l(x_l, positions 0..T-1)   l = 0..L-1        block_forward
    z        = x_L                                                trunk output (pre-norm)
    h^0      = model.norm(z)                                      rmsnorm_forward
    logits   = lm_head(h^0);  rows_main = xent(logits, t_{1..T})
    causal MTP, k = 1..D (T_k = T-k rows, positions 0..T_k-1):
        e_k      = Emb(t_{k..T-1})                                 SHARED embedding
        n_k, y_k = MTP_k(e_k, h^{k-1}[:, :T_k])                    mtp_forward
        logits^k = lm_head(n_k);  rows_k = xent(logits^k, t_{k+1..T})   SHARED lm_head
        h^k      = n_k (mtp_chain "post_norm") or y_k ("pre_norm")
    parallel heads, k = 1..D:
        y_k      = Block_{L+k-1}(z[:, :T_k]);  n_k = model.norm(y_k)     SHARED model.norm
        logits^k = lm_head(n_k);  rows_k = xent(logits^k, t_{k+1..T})
    losses   = loss_forward(rows_main, rows_1..D, balance aux of every MoE layer)

Backward runs the same list in exact reverse order. The tensors with several users get their
gradient summed in ONE visible place each (``_sum_shared``): ``model.embed_tokens.weight``
(main + every depth), ``lm_head.weight`` (main + every depth), ``model.norm.weight`` (main +
every parallel head), and the trunk state (h^0 for causal MTP, z for parallel heads) whose
gradient is the main path plus the zero-padded gradient of the first T-1 / T-k rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from refmtp.backends import backend_of
from refmtp.model.block import block_backward, block_forward
from refmtp.model import moe  # moe.SHARDED: the expert-parallel layer, when a training step sets it
from refmtp.model.init import init_params
from refmtp.params import BIAS_NAME, EMBED, LM_HEAD, NORM, check_params, layer_prefix, mtp_layer, sub_params
from refmtp.model.loss import loss_backward, loss_forward
from refmtp.model.balance import update_bias
from refmtp.model.moe import routing_margin as moe_routing_margin
from refmtp.model.moe import routing_selection as moe_routing_selection
from refmtp.model.mtp import mtp_backward, mtp_forward
from refmtp.mutation import on
from refmtp.model.ops.embedding import embedding_backward, embedding_forward
from refmtp.model.ops.linear import linear_backward, linear_forward
from refmtp.model.ops.rmsnorm import rmsnorm_backward, rmsnorm_forward
from refmtp.model.ops.xent import xent_backward, xent_forward

__all__ = ["init_params", "forward", "backward", "update_expert_bias", "ModelOutput", "ModelCache",
           "check_params", "routing_selection", "routing_margin", "trunk_forward", "depth_forward",
           "head_forward", "EMBED", "LM_HEAD", "NORM"]



@dataclass
class ModelOutput:
    logits: Any  # (B, T, V) main-model logits
    mtp_logits: list  # D arrays, depth/head k: (B, T-k, V)
    losses: dict  # "main", "mtp.1".."mtp.D", "balance", "total": scalar arrays
    load: dict  # {MoE layer: (E,) int64 tokens routed to each expert (biased, group-limited)}
    routing: dict  # {MoE layer: (topk_idx (B, T', K), topk_weight (B, T', K))}
    hidden: Any = None  # (B, T, d) h^0 = model.norm output (what MTP module 1 reads)
    mtp_hidden: list = field(default_factory=list)  # depth k: (B, T-k, d) state chained onward


@dataclass(frozen=True, slots=True)
class ModelCache:
    cfg: Any  # ModelConfig
    B: int  # batch
    T: int  # main positions (tokens has T+1 columns)
    emb: Any  # EmbeddingCache of the main lookup
    blocks: list  # L BlockCaches, layer order
    norm: Any  # RMSNormCache of model.norm on z (B, T, d)
    head: Any  # LinearCache of lm_head on h^0
    xent: Any  # XentCache of the main rows (B*T, V)
    mtp_emb: list  # causal: D EmbeddingCaches of t_{k..T-1}; parallel: []
    mtp: list  # causal: D MTPCaches; parallel: D BlockCaches
    mtp_norm: list  # parallel: D RMSNormCaches of the shared model.norm; causal: []
    mtp_head: list  # D LinearCaches of the shared lm_head
    mtp_xent: list  # D XentCaches, depth k: (B*(T-k), V)
    loss: Any  # LossCache
    aux_layers: tuple  # MoE layers whose balance loss is in the total


# -------------------------------------------------------------------------------------------
# validation
# -------------------------------------------------------------------------------------------
def _check_tokens(tokens, cfg):
    bk = backend_of(tokens)
    xp = bk.xp
    if not hasattr(tokens, "ndim") or tokens.ndim != 2:
        raise ValueError(
            f"tokens must be a (B, T+1) integer array, got shape {getattr(tokens, 'shape', None)}"
        )
    if not xp.isdtype(tokens.dtype, "integral"):
        raise ValueError(f"tokens must be integers (int64), got {tokens.dtype}")
    B, T = int(tokens.shape[0]), int(tokens.shape[1]) - 1
    if B < 1 or T < 1:
        raise ValueError(
            f"tokens has shape {tuple(tokens.shape)}: need B >= 1 and T+1 >= 2 columns "
            "(the main model reads [:, :T] and predicts [:, 1:])"
        )
    if T <= cfg.D:
        raise ValueError(
            f"tokens has T+1={T + 1} columns but depth D={cfg.D} needs T >= D+1 "
            f"(T+1 >= {cfg.D + 2}): depth k trains on the T-k positions that have a target"
        )
    V = cfg.vocab_size
    lo, hi = int(xp.min(tokens)), int(xp.max(tokens))
    if lo < 0 or hi >= V:
        raise ValueError(f"token ids must be in [0, {V}); got min {lo}, max {hi}")
    return xp.astype(tokens, xp.int64), B, T


# -------------------------------------------------------------------------------------------
# routing bookkeeping (read from the MoE caches)
# -------------------------------------------------------------------------------------------
def routing_selection(cache: "ModelCache"):
    """Every discrete choice of the forward (routed experts and the balance loss's top-K of each
    MoE block, main and MTP) as one flat int64 array, for ``check_grad(selection=...)``."""
    xp = backend_of(cache.loss.main_rows).xp
    parts = [xp.zeros((0,), dtype=xp.int64)]
    for bc in _all_blocks(cache):
        if bc.moe:
            parts.append(xp.reshape(moe_routing_selection(bc.ffn), (-1,)))
    return xp.concat(parts)


def routing_margin(cache: "ModelCache") -> float:
    """Smallest score gap behind any routing decision of the forward (inf without MoE)."""
    return min([moe_routing_margin(bc.ffn) for bc in _all_blocks(cache) if bc.moe] or [float("inf")])


def routing_margins(cache: "ModelCache") -> dict:
    """{layer index: smallest score gap behind its routing decisions} of every MoE block, main
    and MTP (MTP module / parallel head k is layer L + k - 1); :func:`routing_margin` per layer."""
    return {layer: moe_routing_margin(bc.ffn) for layer, bc in enumerate(_all_blocks(cache)) if bc.moe}


def _all_blocks(cache: "ModelCache") -> list:
    if cache.cfg.refmtp.mtp_kind == "causal":
        return list(cache.blocks) + [c.block for c in cache.mtp]
    return list(cache.blocks) + list(cache.mtp)


# -------------------------------------------------------------------------------------------
# the three paths, composed once and used by training (forward) and decoding (refmtp.inference)
# -------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TrunkOut:
    logits: Any  # (B, T, V) lm_head(h^0)
    h0: Any  # (B, T, d) model.norm(z): what MTP module 1 reads
    z: Any  # (B, T, d) trunk output before model.norm: what parallel heads read
    blocks: list  # L (aux, BlockCache) pairs, layer order
    emb: Any  # EmbeddingCache
    norm: Any  # RMSNormCache of model.norm
    head: Any  # LinearCache of lm_head


def trunk_forward(params: dict, cfg, ids, positions, attend=None, *, train: bool = True) -> TrunkOut:
    """The main model on ids (B, T) at RoPE ``positions`` (T,): Emb -> L blocks -> model.norm ->
    lm_head. ``attend``: the blocks' attention (None: full sequence; see refmtp.model.block).
    ``train=False`` (decoding): the same outputs, ``blocks`` empty (no balance loss, no caches)."""
    x, c_emb = embedding_forward(ids, params[EMBED])  # (B, T, d)
    blocks = []
    for layer in range(cfg.num_hidden_layers):
        x, aux_l, bc = block_forward(x, sub_params(params, layer_prefix(layer)), cfg, layer,
                                     positions, attend, train=train)  # (B, T, d)
        if train:
            blocks.append((aux_l, bc))
    h0, c_norm = rmsnorm_forward(x, params[NORM], cfg.rms_norm_eps)  # h^0 (B, T, d)
    logits, c_head = linear_forward(h0, params[LM_HEAD])  # (B, T, V)
    return TrunkOut(logits=logits, h0=h0, z=x, blocks=blocks, emb=c_emb, norm=c_norm, head=c_head)


@dataclass(frozen=True, slots=True)
class DepthOut:
    logits: Any  # (B, T', V) lm_head(n): depth k's predictions of t_{i+k+1}
    n: Any  # (B, T', d) shared_head.norm(y) (causal) or model.norm(y) (parallel head)
    y: Any  # (B, T', d) the module's block output
    aux: Any  # the block's balance loss (None if dense)
    block: Any  # BlockCache
    emb: Any  # EmbeddingCache of Emb(t_{i+k}) (causal) or None
    mtp: Any  # MTPCache (causal) or None
    norm: Any  # RMSNormCache of the shared model.norm (parallel) or None
    head: Any  # LinearCache of the shared lm_head


def depth_forward(params: dict, cfg, k: int, ids, h_prev, positions, attend=None, *,
                  train: bool = True) -> DepthOut:
    """Causal MTP depth k (V3 eqs. 21-23): row i reads Emb(ids[:, i]) = Emb(t_{i+k}) and
    h_prev[:, i] = h^{k-1}_i -> MTP_k -> the shared lm_head. ``train=False``: aux, block and
    mtp are None (decoding)."""
    layer = mtp_layer(cfg, k)
    p = sub_params(params, layer_prefix(layer))
    if on("mtp.head_norm_is_model_norm"):
        p = {**p, "shared_head.norm.weight": params[NORM]}
    e, c_e = embedding_forward(ids, params[EMBED])  # SHARED embedding, (B, T', d)
    n, y, aux_l, c_m = mtp_forward(e, h_prev, p, cfg, layer, positions, attend, train=train)
    logits, c_h = linear_forward(n, params[LM_HEAD])  # SHARED lm_head, (B, T', V)
    return DepthOut(logits=logits, n=n, y=y, aux=aux_l, block=None if c_m is None else c_m.block,
                    emb=c_e, mtp=c_m, norm=None, head=c_h)


def head_forward(params: dict, cfg, k: int, z, positions, attend=None, *,
                 train: bool = True) -> DepthOut:
    """Parallel head k (Gloeckle et al.): Block_{L+k-1}(z) -> the shared model.norm -> lm_head.
    ``train=False``: aux and block are None (decoding)."""
    layer = mtp_layer(cfg, k)
    y, aux_l, bc = block_forward(z, sub_params(params, layer_prefix(layer)), cfg, layer,
                                 positions, attend, train=train)  # (B, T', d)
    n, c_n = rmsnorm_forward(y, params[NORM], cfg.rms_norm_eps)  # SHARED model.norm
    logits, c_h = linear_forward(n, params[LM_HEAD])  # SHARED lm_head, (B, T', V)
    return DepthOut(logits=logits, n=n, y=y, aux=aux_l, block=bc, emb=None, mtp=None, norm=c_n,
                    head=c_h)


def chained_state(cfg, d: DepthOut):
    """The state depth k passes to depth k+1: n (mtp_chain "post_norm") or y ("pre_norm")."""
    if on("mtp.chain_pre_norm"):
        return d.y
    return d.n if cfg.refmtp.mtp_chain == "post_norm" else d.y


# -------------------------------------------------------------------------------------------
# forward
# -------------------------------------------------------------------------------------------
def forward(params: dict, cfg, tokens, *, need_cache: bool = True):
    """tokens (B, T+1) int64 -> (ModelOutput, ModelCache or None).  See the module docstring.

    The entry point validates once (config, every parameter's name, shape and dtype, the
    tokens); the layers it calls do not re-validate.
    """
    cfg.validate()
    check_params(params, cfg, None if moe.SHARDED is None else moe.SHARDED.experts)  # EP: a rank's own
    tokens, B, T = _check_tokens(tokens, cfg)
    bk = backend_of(tokens, params[EMBED])
    xp = bk.xp
    D, V = cfg.D, cfg.vocab_size
    kind = cfg.refmtp.mtp_kind
    positions = xp.arange(T, dtype=xp.int64)  # main-model RoPE positions 0..T-1
    aux, load, routing = {}, {}, {}

    def record(aux_l, bc):
        if bc.moe:
            aux[bc.layer] = aux_l
            routing[bc.layer] = (bc.ffn.topk_idx, bc.ffn.topk_weight)  # (B, T', K) each
            load[bc.layer] = bc.ffn.load  # (E,) int64

    # main model ---------------------------------------------------------------------------
    tr = trunk_forward(params, cfg, tokens[:, :T], positions)
    for aux_l, bc in tr.blocks:
        record(aux_l, bc)
    h0 = tr.h0
    main_rows, c_xent = xent_forward(xp.reshape(tr.logits, (B * T, V)),
                                     xp.reshape(tokens[:, 1:], (B * T,)))  # (B*T,)

    # MTP depths / parallel heads --------------------------------------------------------
    depths, mtp_rows = [], []
    h = tr.z if on("mtp.hidden_before_final_norm") else h0  # h^0: the main model's output after model.norm
    for k in range(1, D + 1):
        Tk = T - k  # rows with a target t_{i+k+1}
        if kind == "causal":
            shift = k - 1 if on("mtp.token_offset") else k
            dk = depth_forward(params, cfg, k, tokens[:, shift:shift + Tk], h[:, :Tk, :], positions[:Tk])
            h = h0 if on("mtp.chain_from_main") else chained_state(cfg, dk)  # state chained to depth k+1
        else:  # parallel head k on the shared trunk state z
            dk = head_forward(params, cfg, k, tr.z[:, :Tk, :], positions[:Tk])
        record(dk.aux, dk.block)
        rows, c_x = xent_forward(xp.reshape(dk.logits, (B * Tk, V)),
                                 xp.reshape(tokens[:, k + 1:], (B * Tk,)))  # targets t_{i+k+1}
        depths.append((dk, c_x))
        mtp_rows.append(rows)

    losses, c_loss = loss_forward(main_rows, mtp_rows, aux, cfg, B, T)
    out = ModelOutput(logits=tr.logits, mtp_logits=[dk.logits for dk, _ in depths], losses=losses,
                      load=load, routing=routing, hidden=h0,
                      mtp_hidden=[chained_state(cfg, dk) if kind == "causal" else dk.n for dk, _ in depths])
    if not need_cache:
        return out, None
    cache = ModelCache(cfg=cfg, B=B, T=T, emb=tr.emb, blocks=[bc for _, bc in tr.blocks], norm=tr.norm,
                       head=tr.head, xent=c_xent,
                       mtp_emb=[dk.emb for dk, _ in depths if dk.emb is not None],
                       mtp=[dk.mtp if kind == "causal" else dk.block for dk, _ in depths],
                       mtp_norm=[dk.norm for dk, _ in depths if dk.norm is not None],
                       mtp_head=[dk.head for dk, _ in depths], mtp_xent=[c for _, c in depths],
                       loss=c_loss, aux_layers=tuple(sorted(aux)))
    return out, cache


# -------------------------------------------------------------------------------------------
# backward
# -------------------------------------------------------------------------------------------
def _pad_rows(dstate, T: int):
    """Gradient of ``state[:, :T']`` w.r.t. ``state`` (B, T, d): zeros in rows T'..T-1."""
    xp = backend_of(dstate).xp
    B, Tp, d = dstate.shape
    pad = xp.zeros((B, T - Tp, d), dtype=dstate.dtype)
    return xp.concat([dstate, pad], axis=1)  # (B, T', d) -> (B, T, d)


def _sum_shared(own, others: list):
    """``own + others[0] + ...``: the gradient of a tensor with several users (fresh array)."""
    total = own
    for g in others:
        total = total + g
    return total


def backward(cache: ModelCache, dlosses: dict | None = None) -> dict:
    """Gradients of ``sum_name dlosses[name] * losses[name]`` (default: of losses["total"]).

    Returns {checkpoint name: gradient} for every parameter except the
    ``e_score_correction_bias`` entries (they have no gradient: docs/deepseek-v3.md §3.4).
    """
    if cache is None:
        raise ValueError("backward needs the cache of forward(..., need_cache=True)")
    cfg = cache.cfg
    B, T, D, L, V = cache.B, cache.T, cfg.D, cfg.num_hidden_layers, cfg.vocab_size
    kind = cfg.refmtp.mtp_kind
    dl = loss_backward({"total": 1.0} if dlosses is None else dlosses, cache.loss)
    xp = backend_of(dl.dmain_rows).xp
    grads = {}

    def put(layer, local):
        pre = layer_prefix(layer)
        grads.update({pre + k: v for k, v in local.items()})

    def daux(layer):
        return dl.daux.get(layer)

    # MTP depths / parallel heads, k = D..1 ----------------------------------------------
    d_emb_mtp, d_head_mtp, d_norm_mtp, d_trunk_mtp = [], [], [], []
    dh_next = None  # causal: gradient w.r.t. h^k[:, :T-k-1] coming from depth k+1
    for k in range(D, 0, -1):
        Tk = T - k
        layer = mtp_layer(cfg, k)
        i = k - 1
        dlk = xent_backward(dl.dmtp_rows[i], cache.mtp_xent[i]).dlogits  # (B*Tk, V)
        g = linear_backward(xp.reshape(dlk, (B, Tk, V)), cache.mtp_head[i])  # shared lm_head
        d_head_mtp.append(g.dweight)
        dn = g.dx  # (B, Tk, d)
        if kind == "causal":
            dy = None
            if dh_next is not None:  # h^k[:, :Tk-1] was read by depth k+1
                dchain = _pad_rows(dh_next, Tk)  # (B, Tk, d)
                if cfg.refmtp.mtp_chain == "post_norm":
                    dn = dn + dchain  # h^k = n_k: logits path + chain path
                else:
                    dy = dchain  # h^k = y_k
            demb, dh_prev, g_m = mtp_backward(dn, dy, daux(layer), cache.mtp[i])
            put(layer, g_m)
            d_emb_mtp.append(embedding_backward(demb, cache.mtp_emb[i]).dweight)  # shared Emb
            dh_next = dh_prev  # gradient w.r.t. h^{k-1}[:, :Tk]
        else:
            g = rmsnorm_backward(dn, cache.mtp_norm[i])  # shared model.norm
            d_norm_mtp.append(g.dweight)
            dz_k, g_b = block_backward(g.dx, daux(layer), cache.mtp[i])
            put(layer, g_b)
            d_trunk_mtp.append(_pad_rows(dz_k, T))  # gradient w.r.t. z (B, T, d)
    if kind == "causal" and dh_next is not None:
        d_trunk_mtp.append(_pad_rows(dh_next, T))  # gradient w.r.t. h^0 (B, T, d)

    # main head --------------------------------------------------------------------------
    dlogits = xent_backward(dl.dmain_rows, cache.xent).dlogits  # (B*T, V)
    g = linear_backward(xp.reshape(dlogits, (B, T, V)), cache.head)
    d_head_main = g.dweight
    dh0 = g.dx  # (B, T, d)

    # shared tensors: every user's gradient summed, here and only here -------------------
    grads[LM_HEAD] = _sum_shared(d_head_main, [] if on("mtp.lm_head_grad_not_summed") else d_head_mtp)  # main head + every depth / head
    if kind == "causal":
        dh0 = _sum_shared(dh0, d_trunk_mtp)  # h^0 feeds lm_head and MTP module 1

    g = rmsnorm_backward(dh0, cache.norm)  # forward: h^0 = model.norm(z)
    grads[NORM] = _sum_shared(g.dweight, d_norm_mtp)  # main + every parallel head ([] if causal)
    dx = g.dx
    if kind == "parallel":
        dx = _sum_shared(dx, d_trunk_mtp)  # z feeds model.norm and every parallel head

    # trunk, l = L-1..0 ------------------------------------------------------------------
    for layer in range(L - 1, -1, -1):
        dx, g_b = block_backward(dx, daux(layer), cache.blocks[layer])
        put(layer, g_b)
    d_emb_main = embedding_backward(dx, cache.emb).dweight
    grads[EMBED] = _sum_shared(d_emb_main, [] if on("mtp.embed_grad_not_summed") else d_emb_mtp)  # main + every causal depth
    return dict(sorted(grads.items()))


# -------------------------------------------------------------------------------------------
# auxiliary-loss-free balancing
# -------------------------------------------------------------------------------------------
def update_expert_bias(params: dict, load: dict, gamma: float) -> None:
    """``b_i += gamma * sign(mean(c) - c_i)`` for every MoE layer in ``load`` (docs/deepseek-v3.md §3.4).

    In place, float32; ``load`` is ``out.load`` of the step's forward.
    """
    for layer in sorted(load):
        name = layer_prefix(layer) + BIAS_NAME
        if name not in params:
            raise ValueError(f"update_expert_bias: params has no {name} (layer {layer} is not MoE)")
        params[name] = update_bias(params[name], load[layer], gamma)
