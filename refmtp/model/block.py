"""One DeepSeek-V3 decoder block: pre-norm MLA and FFN with two residual adds (docs/deepseek-v3.md §1).

    a = input_layernorm(x)
    h = x + MLA(a, positions)                       (V3 eqs. 1-11)
    m = post_attention_layernorm(h)
    y = h + FFN(m)                                  FFN = dense SwiGLU MLP if layer < first_k_dense_replace
                                                          else DeepSeekMoE (V3 eqs. 12-16)

``p`` is the block's parameter dict with the ``model.layers.{layer}.`` prefix stripped
(``input_layernorm.weight``, ``self_attn.*``, ``post_attention_layernorm.weight``, ``mlp.*``).
The same function serves main layers, MTP modules and parallel heads, in training and in
decoding; ``layer`` decides dense vs MoE (``cfg.is_moe_layer(layer)``). The attention is an
argument: ``attend=None`` is the full-sequence MLA of training (:func:`refmtp.model.mla.mla_forward`
over the T tokens at ``positions``); decoding passes ``attend(a, p_attn, layer) -> att``, MLA over
its latent cache (:class:`refmtp.inference.decode.CachedMLA`). Either way the block around it is
this one function.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from refmtp.model.mla import mla_backward, mla_forward
from refmtp.model.moe import moe_backward, moe_forward
from refmtp.model.ops.rmsnorm import rmsnorm_backward, rmsnorm_forward
from refmtp.model.ops.swiglu import swiglu_backward, swiglu_forward
from refmtp.params import sub_params
from refmtp.precision import rounded


@dataclass(frozen=True, slots=True)
class BlockCache:
    attn_norm: Any  # RMSNormCache of input_layernorm on x (B, T, d)
    attn: Any  # MLACache (None when the attention ran over a decoding cache)
    ffn_norm: Any  # RMSNormCache of post_attention_layernorm on h (B, T, d)
    ffn: Any  # MoECache (MoE layer) or SwiGLUCache (dense layer)
    moe: bool  # which FFN ran
    layer: int  # layer index (main 0..L-1, MTP module k at L+k-1)


def block_forward(x, p: dict, cfg, layer: int, positions, attend=None, *, train: bool = True):
    """x (B, T, d), positions (T,) int64 -> (y (B, T, d), aux, BlockCache).

    ``aux`` is the MoE layer's balance loss without alpha (a scalar array), None for a dense layer.
    ``attend`` (decoding) replaces the full-sequence MLA; the cache then has ``attn=None``.
    ``train=False`` (decoding) returns ``(y, None, None)``: the same ``y``, no balance loss and
    no backward cache (the MoE layer skips its load statistics).
    """
    eps = cfg.rms_norm_eps
    a, c_attn_norm = rmsnorm_forward(x, p["input_layernorm.weight"], eps)  # (B, T, d)
    if attend is None:
        att, c_attn = mla_forward(a, sub_params(p, "self_attn."), cfg, positions)  # (B, T, d)
    else:
        att, c_attn = attend(a, sub_params(p, "self_attn."), layer), None  # (B, T, d) over the cache
    h = rounded(x + att)  # first residual, (B, T, d)
    m, c_ffn_norm = rmsnorm_forward(h, p["post_attention_layernorm.weight"], eps)  # (B, T, d)
    moe = cfg.is_moe_layer(layer)
    if moe:
        f, aux, c_ffn = moe_forward(m, sub_params(p, "mlp."), cfg, train=train)  # (B, T, d), scalar
    else:
        f, c_ffn = swiglu_forward(m, p["mlp.gate_proj.weight"], p["mlp.up_proj.weight"],
                                  p["mlp.down_proj.weight"])  # (B, T, d)
        aux = None
    y = rounded(h + f)  # second residual, (B, T, d)
    if not train:
        return y, None, None
    return y, aux, BlockCache(attn_norm=c_attn_norm, attn=c_attn, ffn_norm=c_ffn_norm, ffn=c_ffn,
                              moe=moe, layer=layer)


def block_backward(dout, daux, cache: BlockCache):
    """dout (B, T, d), daux = d loss / d aux (scalar; ignored by a dense layer) -> (dx, grads).

    forward ``y = h + FFN(m)``, ``m = norm2(h)``  ->  ``dh = dout + norm2^T(FFN^T(dout))``
    forward ``h = x + MLA(a)``, ``a = norm1(x)``  ->  ``dx = dh + norm1^T(MLA^T(dh))``
    ``grads`` has the block's local names; no ``mlp.gate.e_score_correction_bias`` (no gradient).
    """
    c = cache
    grads = {}
    # forward: y = h + f  ->  df = dout, dh = dout (+ the FFN path below)
    if c.moe:
        dm, g_ffn = moe_backward(dout, daux, c.ffn)
        grads.update({f"mlp.{k}": v for k, v in g_ffn.items()})
    else:
        g = swiglu_backward(dout, c.ffn)
        dm = g.dx
        grads["mlp.gate_proj.weight"] = g.dgate_proj
        grads["mlp.up_proj.weight"] = g.dup_proj
        grads["mlp.down_proj.weight"] = g.ddown_proj
    g = rmsnorm_backward(dm, c.ffn_norm)  # forward: m = norm2(h)
    grads["post_attention_layernorm.weight"] = g.dweight
    dh = dout + g.dx  # residual: both paths into h
    # forward: h = x + att, att = MLA(a)
    da, g_attn = mla_backward(dh, c.attn)
    grads.update({f"self_attn.{k}": v for k, v in g_attn.items()})
    g = rmsnorm_backward(da, c.attn_norm)  # forward: a = norm1(x)
    grads["input_layernorm.weight"] = g.dweight
    dx = dh + g.dx  # residual: both paths into x
    return dx, dict(sorted(grads.items()))
