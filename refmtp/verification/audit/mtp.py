"""Causal multi-token prediction, every depth (V3 eqs. 21-25): alignment, h^0, the eh_proj
combination, the block and shared head, the chained state and the per-depth losses."""
from __future__ import annotations

import math

import numpy as np

from refmtp.verification.audit.context import AuditContext
from refmtp.verification.audit.host import host_ce, host_rope, rmsnorm_check
from refmtp.verification.audit.steps import Recorder, check, close, few, maxdiff, num, shape


def audit_mtp(ctx: AuditContext) -> list:
    """The steps of every MTP depth, then the per-depth losses and the MTP objective."""
    cfg, out, cache = ctx.cfg, ctx.out, ctx.cache
    B, T, D, L, d = ctx.B, ctx.T, cfg.D, cfg.num_hidden_layers, cfg.hidden_size
    eps, b = cfg.rms_norm_eps, ctx.b
    rec = Recorder("mtp")

    if D == 0:
        rec.add("no MTP module (num_nextn_predict_layers = 0)", "eq. 25", "L = L_main (+ balance)", {}, {},
                [check("no MTP logits", not out.mtp_logits, f"{len(out.mtp_logits)} depths")])
        return rec.steps
    h0 = ctx.h(out.hidden)  # (B,T,d)
    kind = cfg.refmtp.mtp_kind
    theta, a = host_rope(cfg)

    # 1. alignment ----------------------------------------------------------------------------------
    ok_ids, ok_tg, rows = True, True, []
    for k in range(1, D + 1):
        tg = np.array(ctx.bk.to_numpy(cache.mtp_xent[k - 1].targets)).reshape(B, T - k)
        ok_tg &= np.array_equal(tg, ctx.tok[:, k + 1:T + 1])
        if kind == "causal":
            ids = np.array(ctx.bk.to_numpy(cache.mtp_emb[k - 1].ids))
            ok_ids &= np.array_equal(ids, ctx.tok[:, k:T])
        rows.append(int(out.mtp_logits[k - 1].shape[1]))
    rec.add("what depth k sees and predicts", "eqs. 21-24; docs/deepseek-v3.md §4.5",
            "depth k, row i (0 <= i < T-k): input token t_{i+k}, state h^{k-1}_i, target t_{i+k+1}",
            {f"logits^{k}": shape(out.mtp_logits[k - 1]) for k in range(1, D + 1)},
            {"rows per depth": rows, f"t[b, i..i+{D + 1}]": [int(v) for v in ctx.tok[b, ctx.i:ctx.i + D + 2]]},
            ([check("embedded tokens are t_{i+k} (tokens[:, k:T])", ok_ids, "all depths")]
             if kind == "causal" else [])
            + [check("targets are t_{i+k+1} (tokens[:, k+1:T+1])", ok_tg, "all depths"),
               check("depth k has T-k rows", rows == [T - k for k in range(1, D + 1)], f"{rows}")])

    if kind != "causal":
        for k in range(1, D + 1):
            bc = cache.mtp[k - 1]
            rec.add(f"parallel head {k}: block on the trunk state", "docs/deepseek-v3.md §6 (Gloeckle et al.)",
                    "logits^k = lm_head(model.norm(Block_{L+k-1}(z[:, :T-k])))",
                    {"logits": shape(out.mtp_logits[k - 1])}, {},
                    [close("head input = the trunk output z (pre-norm) rows :T-k",
                           ctx.h(bc.attn_norm.x), ctx.h(cache.norm.x)[:, :T - k])])
        _mtp_loss_steps(ctx, rec)
        return rec.steps

    # 2. h^0 ------------------------------------------------------------------------------------------
    z = ctx.h(cache.norm.x)
    rec.add("h^0: the main model's output after model.norm", "docs/deepseek-v3.md §4.4",
            "h^0 = model.norm(z), the tensor lm_head reads; MTP module 1 reads h^0[:, :T-1]",
            {"h^0": shape(h0)}, {"h^0[b,i,:4]": few(h0[b, ctx.i])},
            [rmsnorm_check("h^0 is RMSNorm(z) with model.norm", h0, z, ctx.R("model.norm.weight"), eps),
             close("the main lm_head reads h^0", ctx.h(cache.head.x), h0),
             close("module 1's hnorm reads h^0[:, :T-1]", ctx.h(cache.mtp[0].hnorm.x), h0[:, :T - 1])])

    h_prev = h0
    for k in range(1, D + 1):
        Tk = T - k
        i = min(ctx.i, Tk - 1)
        pre = f"model.layers.{L + k - 1}."
        mc = cache.mtp[k - 1]
        E = ctx.ref.get(pre + "embed_tokens.weight", ctx.R("model.embed_tokens.weight"))
        copy_head = pre + "shared_head.head.weight" in ctx.ref  # checkpoint files carry a copy
        W_head = ctx.ref.get(pre + "shared_head.head.weight", ctx.R("lm_head.weight"))
        M = ctx.R(pre + "eh_proj.weight")  # (d, 2d)
        emb = E[ctx.tok[:, k:T]]  # (B,Tk,d) Emb(t_{i+k})

        def norm(v, w):
            return w * v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + eps)

        e = norm(emb, ctx.R(pre + "enorm.weight"))
        hh = norm(h_prev[:, :Tk], ctx.R(pre + "hnorm.weight"))
        x_host = e @ M[:, :d].T + hh @ M[:, d:].T  # checkpoint semantics: columns 0..d-1 read enorm(emb)
        x_paper = hh @ M[:, :d].T + e @ M[:, d:].T  # the report's order [h; emb]
        x_lib = ctx.h(mc.block.attn_norm.x)  # the block's input
        d_paper = maxdiff(x_lib, x_paper)
        rec.add(f"depth {k}: combine embedding and previous state", "eq. 21 as released; docs/deepseek-v3.md §4.2, §4.3",
                "x = M_k [enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)]  (embedding FIRST: eh_proj columns 0..d-1)",
                {"eh_proj": list(M.shape), "x": shape(x_lib)},
                {"enorm(emb)[b,i,:4]": few(e[b, i]), "hnorm(h)[b,i,:4]": few(hh[b, i]),
                 "x[b,i,:4]": few(x_lib[b, i])},
                [close("enorm reads the embedding rows E[t_{i+k}]" + (" (the module's embed_tokens copy)"
                        if pre + "embed_tokens.weight" in ctx.ref else ""), ctx.h(mc.enorm.x), emb),
                 close("x = reference eh_proj applied to [enorm(emb); hnorm(h)] (host RMSNorm, column halves)",
                       x_lib, x_host),
                 check("the order is observable here: [hnorm(h); enorm(emb)] differs",
                       maxdiff(x_host, x_paper) > 1e-6,
                       f"max |x_lib - x_paper_order| {d_paper:.2e}")])

        # block positions, shared_head.norm, shared lm_head
        y = ctx.h(mc.head_norm.x)  # (B,Tk,d) block output
        n_ = ctx.h(cache.mtp_head[k - 1].x)  # (B,Tk,d) lm_head input
        logits = ctx.h(out.mtp_logits[k - 1])  # (B,Tk,V)
        cos = ctx.h(mc.block.attn.q_rope.cos)  # (Tk, Dr/2)
        cos_host = np.array([[a * math.cos(m * th) for th in theta] for m in range(Tk)])
        rec.add(f"depth {k}: block, shared_head.norm, shared output head", "eqs. 22-23; docs/deepseek-v3.md §4.3, §4.5",
                "y = TRM_k(x) over T-k rows at RoPE positions 0..T-k-1;  logits = lm_head(shared_head.norm(y))",
                {"y": shape(y), "logits": shape(logits)},
                {"y[b,i,:4]": few(y[b, i]), "logits[b,i,:4]": few(logits[b, i])},
                [close("the block's RoPE uses the main-model positions 0..T-k-1", cos, cos_host),
                 rmsnorm_check("lm_head input is shared_head.norm(y) (the module's own norm)", n_, y,
                               ctx.R(pre + "shared_head.norm.weight"), eps),
                 close("logits = n @ lm_head^T (reference" + (" shared_head.head copy)" if copy_head else ")"),
                       logits, n_ @ W_head.T)])

        # chain
        h_k = ctx.h(out.mtp_hidden[k - 1])
        post = cfg.refmtp.mtp_chain == "post_norm"
        checks = [close("h^k = " + ("shared_head.norm(y)" if post else "y (pre-norm chain)"), h_k,
                        n_ if post else y)]
        if k < D:
            checks.append(close(f"module {k + 1}'s hnorm reads h^{k}[:, :T-{k + 1}]",
                                ctx.h(cache.mtp[k].hnorm.x), h_k[:, :Tk - 1]))
        rec.add(f"depth {k}: state chained to depth {k + 1}" if k < D else f"depth {k}: chained state (last)",
                "docs/deepseek-v3.md §4.4",
                ("h^k = shared_head.norm(y_k)  (mtp_chain = post_norm)" if post
                 else "h^k = y_k (mtp_chain = pre_norm)"),
                {"h^k": shape(h_k)}, {"h^k[b,i,:4]": few(h_k[b, i])}, checks)
        h_prev = h_k
    _mtp_loss_steps(ctx, rec)
    return rec.steps


def _mtp_loss_steps(ctx: AuditContext, rec: Recorder) -> None:
    """Per-depth losses (eq. 24) and the MTP objective (eq. 25), appended to ``rec``."""
    cfg, out = ctx.cfg, ctx.out
    B, T, D = ctx.B, ctx.T, cfg.D
    lam = float(cfg.refmtp.mtp_lambda)
    Lk = []
    for k in range(1, D + 1):
        logits = ctx.h(out.mtp_logits[k - 1]).reshape(B * (T - k), -1)
        rows = host_ce(logits, ctx.tok[:, k + 1:].reshape(-1))
        Nk = B * T if cfg.refmtp.mtp_loss_norm == "paper" else B * (T - k)  # eq. 24 vs Megatron
        host = math.fsum(rows) / Nk
        Lk.append(host)
        lib = float(ctx.h(out.losses[f"mtp.{k}"]))
        paper = cfg.refmtp.mtp_loss_norm == "paper"
        rec.add(f"depth {k} loss", "eq. 24; docs/deepseek-v3.md §4.5",
                f"L^{k} = -(1/{'T' if paper else '(T-k)'}) sum over the T-k rows of log P^k[t_(i+k+1)], "
                "averaged over the batch",
                {"terms": [B * (T - k)]}, {f"L^{k}": [num(lib)], "normaliser": [Nk]},
                [check(f"{B}x{T - k} = {B * (T - k)} terms (T-k per sequence)", rows.shape[0] == B * (T - k),
                       f"{rows.shape[0]}"),
                 close(f"L^{k} = host cross-entropy sum / {Nk} "
                       f"({'B T: paper' if paper else 'B (T-k): valid_mean'})", lib, host, tol=1e-12)])
    los = {k: float(ctx.h(v)) for k, v in out.losses.items()}
    mtp_total = lam / D * math.fsum(Lk)
    rec.add("MTP objective", "eq. 25",
            f"L_MTP = (lambda/D) sum_k L^k,  lambda = {lam:g}, D = {D}",
            {}, {"L_MTP": [num(mtp_total)]},
            [close("total - main - balance = (lambda/D) sum_k L^k", los["total"] - los["main"] - los["balance"],
                   mtp_total, tol=1e-12)])
