"""Multi-head Latent Attention of layer 0 (V3 eqs. 1-11): every projection, RoPE, the scores
naive and absorbed, the causal softmax, the output, latent-cache decoding and causality."""
from __future__ import annotations

import numpy as np

from refmtp.inference.decode import KVCache, mla_decode
from refmtp.model.block import sub_params
from refmtp.model.mla import mla_forward, mla_kv_b_heads
from refmtp.model.ops.rope import rope_forward, rope_tables, softmax_scale
from refmtp.verification.audit.context import AuditContext
from refmtp.verification.audit.host import fmatvec, host_rope, host_scale, logsoftmax, rmsnorm_check, rot_check
from refmtp.verification.audit.steps import TOL, Recorder, check, close, few, maxdiff, num, shape


def audit_mla(ctx: AuditContext) -> list:
    """The steps of layer 0's attention, from the embedding to the residual, then decoding."""
    cfg, bk, xp = ctx.cfg, ctx.bk, ctx.bk.xp
    b, i, B, T = ctx.b, ctx.i, ctx.B, ctx.T
    H, Dn, Dr, Dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    Rkv, eps = cfg.kv_lora_rank, cfg.rms_norm_eps
    pre = "model.layers.0."

    def P(name):  # reference weight of layer 0's MLA
        return ctx.R(pre + "self_attn." + name)

    bc = ctx.cache.blocks[0]
    p_attn = sub_params(ctx.params, pre + "self_attn.")
    x_dev = bc.attn.kv_a_proj.x  # (B,T,d) input_layernorm output, as the model computed it
    out_dev, c = mla_forward(x_dev, p_attn, cfg, ctx.positions)  # the layer, from the model's input
    X = ctx.h(x_dev)
    pos = list(range(T))
    theta, a = host_rope(cfg)
    rec = Recorder("mla")

    # 1. embedding + input_layernorm ---------------------------------------------------------
    h_in = ctx.h(bc.attn_norm.x)  # (B,T,d) block input
    E = ctx.R("model.embed_tokens.weight")
    rec.add("embedding lookup and input_layernorm", "docs/deepseek-v3.md §1, §2.3",
            "h = E[t] (no sqrt(d) scaling);  x = w * h / sqrt(mean(h^2) + eps)",
            {"E": list(E.shape), "h": shape(h_in), "x": shape(X)},
            {"t[b,i]": [int(ctx.tok[b, i])], "h[b,i,:4]": few(h_in[b, i]), "x[b,i,:4]": few(X[b, i])},
            [close("h equals the checkpoint rows E[t]", h_in, E[ctx.tok[:, :T]]),
             rmsnorm_check("x is RMSNorm(h) (scale/direction identity)", X, h_in,
                           ctx.R(pre + "input_layernorm.weight"), eps)])

    # 2. query down-projection (q-LoRA) ------------------------------------------------------
    if cfg.q_lora_rank is not None:
        cq_raw = ctx.h(c.q_a_layernorm.x)  # (B,T,Rq)
        cq = ctx.h(c.q_proj.x)  # (B,T,Rq)
        Wqa = P("q_a_proj.weight")
        rec.add("query latent c^Q and q_a_layernorm", "eq. 6 (+ norm, docs/deepseek-v3.md §2.3 step 1)",
                "cQ = q_a_layernorm(x Wq_a^T)",
                {"Wq_a": list(Wqa.shape), "cQ": shape(cq)},
                {"cQ_raw[b,i,:4]": few(cq_raw[b, i]), "cQ[b,i,:4]": few(cq[b, i])},
                [close("cQ_raw[b,i] = exactly rounded dot products with Wq_a rows", cq_raw[b, i],
                       fmatvec(Wqa, X[b, i])),
                 rmsnorm_check("cQ is RMSNorm(cQ_raw)", cq, cq_raw, P("q_a_layernorm.weight"), eps)])
        Wqb = P("q_b_proj.weight")
        q_src, q_name = cq, "cQ Wq_b^T"
    else:
        Wqb = P("q_proj.weight")
        q_src, q_name = X, "x Wq^T"

    # 3. query up-projection, per-head rows --------------------------------------------------
    Q = ctx.h(c.attn.q)  # (B,H,T,Dn+Dr) as attention saw it
    K = ctx.h(c.attn.k)  # (B,H,T,Dn+Dr)
    V = ctx.h(c.attn.v)  # (B,H,T,Dv)
    w = Dn + Dr
    q_raw = np.stack([q_src @ Wqb[h * w:(h + 1) * w].T for h in range(H)], axis=1)  # (B,H,T,Dn+Dr)
    rec.add("query up-projection, split per head", "eqs. 7, 9; docs/deepseek-v3.md §2.2 row layout",
            f"q = {q_name}; head h = rows h*(Dn+Dr)..: q_nope = rows c < Dn, q_pe = rows c >= Dn",
            {"W": list(Wqb.shape), "q_nope": [B, H, T, Dn], "q_pe": [B, H, T, Dr]},
            {"q_nope[b,0,i,:4]": few(Q[b, 0, i, :Dn])},
            [close("q_nope = row block h of the weight (explicit slices, no reshape)", Q[..., :Dn],
                   q_raw[..., :Dn]),
             close("q_nope[b,0,i] by exactly rounded dot products", Q[b, 0, i, :Dn],
                   fmatvec(Wqb[:Dn], q_src[b, i]))])

    # 4. RoPE on q_pe --------------------------------------------------------------------------
    rec.add("RoPE on the query's decoupled part", "eq. 8; docs/deepseek-v3.md §2.4 (interleaved pairs, YaRN)",
            "y[2j] + i y[2j+1] = a e^(i m theta'_j) (x[2j] + i x[2j+1]),  m = position",
            {"q_pe": [B, H, T, Dr], "theta'": [Dr // 2]},
            {"theta'[:4]": few(theta), "q_pe_raw[b,0,i,:4]": few(q_raw[b, 0, i, Dn:]),
             "q_pe[b,0,i,:4]": few(Q[b, 0, i, Dn:])},
            rot_check("RoPE(q_pe)", q_raw[..., Dn:], Q[..., Dn:], pos, theta, a))

    # 5. KV down-projection --------------------------------------------------------------------
    Wkva = P("kv_a_proj_with_mqa.weight")
    c_raw = ctx.h(c.kv_a_layernorm.x)  # (B,T,Rkv)
    k_raw = X @ Wkva[Rkv:].T  # (B,T,Dr) host, from the reference rows Rkv..
    rec.add("joint KV down-projection, latent first", "eqs. 1, 3; docs/deepseek-v3.md §2.2",
            "[c_raw | k_pe_raw] = x Wkv_a^T  (rows 0..Rkv-1: W^DKV, rows Rkv..: W^KR)",
            {"Wkv_a": list(Wkva.shape), "c_raw": shape(c_raw), "k_pe_raw": [B, T, Dr]},
            {"c_raw[b,i,:4]": few(c_raw[b, i]), "k_pe_raw[b,i,:4]": few(k_raw[b, i])},
            [close("c_raw[b,i] = exactly rounded dots with reference rows 0..Rkv-1", c_raw[b, i],
                   fmatvec(Wkva[:Rkv], X[b, i])),
             close("c_raw at every position from the reference's latent rows", c_raw,
                   X @ Wkva[:Rkv].T)])

    # 6. kv_a_layernorm ------------------------------------------------------------------------
    C = ctx.h(c.c_kv)  # (B,T,Rkv) post-norm latent
    rec.add("kv_a_layernorm on the latent", "eq. 1 (+ norm, docs/deepseek-v3.md §2.3 step 3)",
            "c_KV = kv_a_layernorm(c_raw)   (what the latent cache stores)",
            {"c_KV": shape(C)}, {"c_KV[b,i,:4]": few(C[b, i])},
            [rmsnorm_check("c_KV is RMSNorm(c_raw)", C, c_raw, P("kv_a_layernorm.weight"), eps)])

    # 7. RoPE on k_pe, shared by all heads ----------------------------------------------------
    kpe = ctx.h(c.k_pe)  # (B,T,Dr)
    # relative positions: the library's RoPE at positions shifted by s leaves q.k unchanged
    j = list(range(i + 1))
    qv = bk.asarray(q_raw[b, 0, i:i + 1, Dn:], dtype="float64")  # (1, Dr)
    kv = bk.asarray(k_raw[b, :i + 1], dtype="float64")  # (i+1, Dr)
    dots = []
    for s in (0, 5, 37):
        pq = xp.asarray([i + s], dtype=xp.int64)
        pk = xp.asarray([t + s for t in j], dtype=xp.int64)
        qr, _ = rope_forward(qv, *rope_tables(cfg, pq, qv))
        kr, _ = rope_forward(kv, *rope_tables(cfg, pk, kv))
        dots.append(ctx.h(kr) @ ctx.h(qr)[0])  # (i+1,)
    d_rel = max(maxdiff(dots[1], dots[0]), maxdiff(dots[2], dots[0]))
    rec.add("RoPE on the shared key part k_pe (no norm)", "eq. 3; docs/deepseek-v3.md §2.3 step 3, §2.4",
            "k_pe = RoPE(k_pe_raw), one (Dr,) vector per token, shared by every head",
            {"k_pe": shape(kpe)},
            {"k_pe[b,i,:4]": few(kpe[b, i]), "q_pe.k_pe[b,0,i,j<=i][:4]": few(dots[0])},
            rot_check("RoPE(k_pe)", k_raw, kpe, pos, theta, a) + [
                close("every head's key ends in the same k_pe", K[..., Dn:],
                      np.broadcast_to(kpe[:, None], (B, H, T, Dr))),
                check("q_pe . k_pe depends only on m - n (library RoPE at positions + 5, + 37)",
                      d_rel <= TOL * max(1.0, float(np.max(np.abs(dots[0])))),
                      f"max |dot change| {d_rel:.1e}")])

    # 8. KV up-projection ----------------------------------------------------------------------
    Wkvb = P("kv_b_proj.weight")
    wv = Dn + Dv
    W_UK = np.stack([Wkvb[h * wv: h * wv + Dn] for h in range(H)])  # (H,Dn,Rkv)
    W_UV = np.stack([Wkvb[h * wv + Dn:(h + 1) * wv] for h in range(H)])  # (H,Dv,Rkv)
    kn_host = np.einsum("btc,hnc->bhtn", C, W_UK)
    v_host = np.einsum("btc,hvc->bhtv", C, W_UV)
    rec.add("KV up-projection: per-head k_nope and v", "eqs. 2, 5; docs/deepseek-v3.md §2.2 row layout",
            "head h = rows h*(Dn+Dv)..: k_nope = c_KV W_UK[h]^T (c < Dn), v = c_KV W_UV[h]^T (c >= Dn)",
            {"Wkv_b": list(Wkvb.shape), "k_nope": [B, H, T, Dn], "v": shape(V)},
            {"k_nope[b,0,i,:4]": few(K[b, 0, i, :Dn]), "v[b,0,i,:4]": few(V[b, 0, i])},
            [close("k_nope from reference row blocks", K[..., :Dn], kn_host),
             close("v from reference row blocks", V, v_host)])

    # 9. scores: naive vs absorbed ------------------------------------------------------------
    scale = host_scale(cfg)
    mask = np.tril(np.ones((T, T), dtype=bool))  # key j visible to query t iff j <= t
    S_naive = scale * np.einsum("bhtc,bhsc->bhts", Q, K)
    q_lat = np.einsum("bhtn,hnc->bhtc", Q[..., :Dn], W_UK)  # q~ = W_UK^T q_nope (Rkv)
    S_abs = scale * (np.einsum("bhtc,bsc->bhts", q_lat, C) + np.einsum("bhtr,bsr->bhts", Q[..., Dn:], kpe))
    W_UK_lib, W_UV_lib = (ctx.h(t) for t in mla_kv_b_heads(p_attn, cfg))
    rec.add("attention scores, naive and absorbed", "eqs. 4, 9, 10; docs/deepseek-v3.md §2.5, §2.7",
            "s = scale [q_nope; q_pe].[k_nope; k_pe] = scale (W_UK^T q_nope . c_KV + q_pe . k_pe), "
            "scale = (Dn+Dr)^-1/2 mscale^2",
            {"s": [B, H, T, T], "q~": [B, H, T, Rkv]},
            {"scale": [num(scale)], "s[b,0,i,j<=i][:4]": few(S_naive[b, 0, i, :i + 1])},
            [check("softmax scale = (Dn+Dr)^-1/2 mscale^2 (docs/deepseek-v3.md §2.5)",
                   abs(softmax_scale(cfg) - scale) <= 1e-15 and abs(c.attn.scale - scale) <= 1e-15,
                   f"library {c.attn.scale:.12g}, independent formula {scale:.12g}"),
             close("absorbed scores (W_UK folded into the query) = naive scores",
                   np.where(mask, S_abs, 0.0), np.where(mask, S_naive, 0.0)),
             close("mla_kv_b_heads = reference row blocks (W_UK, W_UV)",
                   np.concatenate([W_UK_lib, W_UV_lib], axis=1), np.concatenate([W_UK, W_UV], axis=1))])

    # 10. softmax with the causal mask ---------------------------------------------------------
    Pm = ctx.h(c.attn.p)  # (B,H,T,T)
    P_host = np.exp(logsoftmax(np.where(mask, S_naive, -np.inf)))
    above = float(np.max(np.abs(Pm[..., ~mask]))) if (~mask).any() else 0.0
    rec.add("causal softmax", "eq. 10; docs/deepseek-v3.md §2.6",
            "p[t,j] = softmax_j(s[t,j]) over j <= t;  p[t,j] = 0 for j > t",
            {"p": shape(Pm)}, {"p[b,0,i,j<=i][:4]": few(Pm[b, 0, i, :i + 1])},
            [close("softmax rows sum to 1", np.sum(Pm, axis=-1), np.ones(Pm.shape[:-1])),
             check("masked keys (j > t) get probability exactly 0", above == 0.0,
                   f"max p above the diagonal {above:.1e}"),
             close("p = exp(s - logaddexp.reduce(s)) (host, no max subtraction)", Pm, P_host)])

    # 11. attention output ---------------------------------------------------------------------
    O = ctx.h(c.o_proj.x)  # (B,T,H*Dv) heads concatenated
    O_heads = np.stack([O[..., h * Dv:(h + 1) * Dv] for h in range(H)], axis=1)  # (B,H,T,Dv)
    o_naive = np.einsum("bhts,bhsv->bhtv", Pm, V)
    x_lat = np.einsum("bhts,bsc->bhtc", Pm, C)  # sum_j p_j c_KV_j (Rkv)
    o_abs = np.einsum("bhtc,hvc->bhtv", x_lat, W_UV)
    rec.add("attention output per head", "eq. 10; docs/deepseek-v3.md §2.7",
            "o_h = sum_j p_j v_j = W_UV[h] (sum_j p_j c_KV_j)  (absorbed: W_UV after attention)",
            {"o": [B, H, T, Dv]}, {"o[b,0,i,:4]": few(O_heads[b, 0, i])},
            [close("o = sum_j p_j v_j", O_heads, o_naive),
             close("o = W_UV (sum_j p_j c_KV_j)  (absorbed form)", O_heads, o_abs)])

    # 12. output projection and the residual ---------------------------------------------------
    Wo = P("o_proj.weight")
    out = ctx.h(out_dev)
    out_host = sum(O_heads[:, h] @ Wo[:, h * Dv:(h + 1) * Dv].T for h in range(H))
    rec.add("output projection and residual", "eq. 11; docs/deepseek-v3.md §1 (block)",
            "u = sum_h Wo[:, head h columns] o_h;  block: h = x_in + u",
            {"Wo": list(Wo.shape), "u": shape(out)}, {"u[b,i,:4]": few(out[b, i])},
            [close("u = sum over heads of column blocks of Wo", out, out_host),
             close("block residual h = x_in + u", ctx.h(bc.ffn_norm.x), h_in + out)])

    # 13. latent-cache decoding ----------------------------------------------------------------
    dec = {}
    per_tok = {}
    for mode in ("absorbed", "naive"):
        kvc = KVCache(cfg, [0], like=x_dev, batch=B, mode=mode, capacity=T)
        rows = []
        if i > 0:  # prefill positions 0..i-1 at once, then one token at a time
            rows.append(ctx.h(mla_decode(x_dev[:, :i], p_attn, cfg, kvc, 0, 0)))
            kvc.length = i
        for t in range(i, T):
            rows.append(ctx.h(mla_decode(x_dev[:, t:t + 1], p_attn, cfg, kvc, 0, t)))
            kvc.length = t + 1
        dec[mode] = np.concatenate(rows, axis=1)
        per_tok[mode] = kvc.bytes_per_token // kvc.itemsize
    rec.add("decoding with the latent KV cache", "docs/deepseek-v3.md §2.7",
            "cache per token and layer: [c_KV | k_pe] (Rkv + Dr numbers); prefill 0..i-1, then one "
            "token at a time",
            {"cache row": [Rkv + Dr]}, {"u_dec[b,i,:4]": few(dec["absorbed"][b, i])},
            [close("absorbed cached decoding = full-sequence forward", dec["absorbed"], out),
             close("naive cached decoding = full-sequence forward", dec["naive"], out),
             check("the absorbed cache holds Rkv + Dr numbers per token",
                   per_tok["absorbed"] == Rkv + Dr,
                   f"{per_tok['absorbed']} (naive: {per_tok['naive']} = H (Dn + Dr + Dv))")])

    # 14. causality -------------------------------------------------------------------------------
    noise = np.zeros(X.shape)
    noise[:, i + 1:] = np.random.default_rng(ctx.seed + 1).standard_normal(noise[:, i + 1:].shape)
    out2 = ctx.h(mla_forward(x_dev + bk.asarray(noise, dtype="float64"), p_attn, cfg, ctx.positions)[0])
    moved = maxdiff(out2[:, i + 1:], out[:, i + 1:]) if i + 1 < T else 1.0
    rec.add("causality", "docs/deepseek-v3.md §2.6",
            "changing the inputs after position i leaves u[:, :i+1] unchanged",
            {"x": shape(X)}, {},
            [close("rows <= i unchanged when rows > i are perturbed", out2[:, :i + 1], out[:, :i + 1]),
             check("the perturbation is visible after i (the check can fail)", moved > 1e-6,
                   f"max change after i {moved:.2e}" if i + 1 < T else "i = T-1: nothing after i")])
    return rec.steps
