"""Self-test of the audit: known faults injected into the weights the library runs on (never
into the reference), each of which the relevant check must FAIL (docs/audit.md)."""
from __future__ import annotations

from refmtp.backends import backend_of


def _corrupt_eh_proj_swap(params, cfg):
    """Swap the column halves of MTP module 1's eh_proj.weight: the module then reads
    [hnorm(h); enorm(emb)] (the paper's order) instead of the checkpoint's [enorm(emb); hnorm(h)]."""
    if cfg.D < 1 or cfg.refmtp.mtp_kind != "causal":
        raise ValueError("corruption eh_proj_swap needs a causal MTP module (D >= 1)")
    name = f"model.layers.{cfg.num_hidden_layers}.eh_proj.weight"
    w, d = params[name], cfg.hidden_size
    xp = backend_of(w).xp
    params[name] = xp.concat([w[:, d:], w[:, :d]], axis=1)  # (d, 2d) halves swapped


def _corrupt_kv_a_layout(params, cfg):
    """Move the RoPE rows of layer 0's kv_a_proj_with_mqa in front of the latent rows (a loader
    that splits [k_pe | c_KV] instead of [c_KV | k_pe])."""
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    w, Rkv = params[name], cfg.kv_lora_rank
    xp = backend_of(w).xp
    params[name] = xp.concat([w[Rkv:], w[:Rkv]], axis=0)  # (Rkv+Dr, d) rows rolled


CORRUPTIONS = {
    "eh_proj_swap": _corrupt_eh_proj_swap,
    "kv_a_layout": _corrupt_kv_a_layout,
}
