"""The training loss (V3 eqs. 17, 24, 25): main logits and cross-entropy, the per-term
normalisers, the balance loss over every MoE layer, the total and the gradient at the logits."""
from __future__ import annotations

import math

import numpy as np

from refmtp.model.loss import loss_backward
from refmtp.model.ops.xent import xent_backward
from refmtp.verification.audit.context import AuditContext, block_cache, moe_layers
from refmtp.verification.audit.host import fmatvec, host_ce, logsoftmax
from refmtp.verification.audit.moe import host_balance
from refmtp.verification.audit.steps import Recorder, check, close, few, num, shape


def audit_loss(ctx: AuditContext) -> list:
    """The steps from the main logits to the total loss and its gradient at the logits."""
    cfg, out, cache = ctx.cfg, ctx.out, ctx.cache
    B, T, D, V = ctx.B, ctx.T, cfg.D, cfg.vocab_size
    b, i = ctx.b, ctx.i
    rec = Recorder("loss")

    h0 = ctx.h(out.hidden)
    Wh = ctx.R("lm_head.weight")
    logits = ctx.h(out.logits)  # (B,T,V)
    rec.add("main logits", "docs/deepseek-v3.md §5.1 step 3", "logits = h^0 lm_head^T  (lm_head untied from the embedding)",
            {"lm_head": list(Wh.shape), "logits": shape(logits)}, {"logits[b,i,:4]": few(logits[b, i])},
            [close("logits[b,i] = exactly rounded dots with reference lm_head rows", logits[b, i],
                   fmatvec(Wh, h0[b, i]))])

    z = logits.reshape(B * T, V)
    y = ctx.tok[:, 1:].reshape(-1)
    rows = host_ce(z, y)
    lse = ctx.h(cache.xent.lse)
    main = float(ctx.h(out.losses["main"]))
    rec.add("main cross-entropy", "docs/deepseek-v3.md §5.1; docs/derivations/cross-entropy.md",
            "loss_n = logsumexp(z_n) - z_n[t_{n+1}];  L_main = (1/(B T)) sum_n loss_n",
            {"rows": [B * T]}, {"loss[b,i]": [num(rows[b * T + i])], "L_main": [num(main)]},
            [close("softmax rows sum to 1: sum exp(z - lse) (library lse)", np.exp(z - lse[:, None]).sum(-1),
                   np.ones(B * T)),
             close("L_main = mean of logaddexp.reduce(z) - z[y] (host)", main, math.fsum(rows) / (B * T),
                   tol=1e-12)])

    lam, alpha = float(cfg.refmtp.mtp_lambda), float(cfg.refmtp.seq_aux_alpha)
    norms = list(cache.loss.mtp_norms)
    paper = cfg.refmtp.mtp_loss_norm == "paper"
    want_norms = [float(B * T if paper else B * (T - k)) for k in range(1, D + 1)]
    dl = loss_backward({"total": 1.0}, cache.loss)
    d_main = ctx.h(dl.dmain_rows)
    d_mtp = [ctx.h(r) for r in dl.dmtp_rows]
    want_d = [np.full(B * (T - k), (lam / D) / want_norms[k - 1]) for k in range(1, D + 1)]
    rec.add("per-term normalisers and row weights", "eqs. 24-25; docs/deepseek-v3.md §4.5",
            "d total / d loss_row: main 1/(B T); depth k (lambda/D)/N_k with N_k = B T (paper) or B (T-k)",
            {f"depth {k} rows": [B * (T - k)] for k in range(1, D + 1)},
            {"N_k": [int(v) for v in norms], "d row main": [num(1 / (B * T))]},
            [check("N_k = " + ("B T for every depth (T-k terms over 1/T)" if cfg.refmtp.mtp_loss_norm == "paper"
                               else "B (T-k)"), norms == want_norms, f"{norms}"),
             close("main row weights = 1/(B T)", d_main, np.full(B * T, 1 / (B * T)), tol=1e-12),
             close("depth-k row weights = (lambda/D)/N_k", np.concatenate(d_mtp) if d_mtp else np.zeros(0),
                   np.concatenate(want_d) if want_d else np.zeros(0), tol=1e-12)])

    # balance over every MoE layer
    layers = moe_layers(cfg)
    host_aux = []
    for layer in layers:
        mc = block_cache(ctx, layer).ffn
        Bl, Tl, _ = mc.x_shape
        s = ctx.h(mc.router.s).reshape(Bl, Tl, -1)
        idx = np.array(ctx.bk.to_numpy(mc.topk_idx), dtype=np.int64)
        host_aux.append(host_balance(s, idx, cfg)[0])
    bal = float(ctx.h(out.losses["balance"]))
    rec.add("balance loss over every MoE layer", "eq. 17; docs/deepseek-v3.md §3.5",
            f"L_bal = alpha sum_l L_l over the MoE layers (main and MTP blocks), alpha = {alpha:g}",
            {"MoE layers": [len(layers)]}, {"layers": layers, "L_l": few(host_aux, 8)},
            [check("one balance term per MoE layer", list(cache.aux_layers) == layers,
                   f"{list(cache.aux_layers)} vs config {layers}"),
             close("L_bal = alpha * sum of host per-layer losses", bal, alpha * math.fsum(host_aux), tol=1e-12)])

    los = {k: float(ctx.h(v)) for k, v in out.losses.items()}
    mtp_sum = math.fsum(los[f"mtp.{k}"] for k in range(1, D + 1))
    total = los["main"] + (lam / D * mtp_sum if D else 0.0) + los["balance"]
    rec.add("total loss", "eq. 25 (+ eq. 17)", "L = L_main + (lambda/D) sum_k L^k + L_bal",
            {}, {k: [num(v)] for k, v in los.items()},
            [close("total = main + (lambda/D) sum mtp + balance", los["total"], total, tol=1e-12)])

    dz = ctx.h(xent_backward(dl.dmain_rows, cache.xent).dlogits)  # (B*T, V)
    p = np.exp(logsoftmax(z))
    onehot = np.zeros_like(p)
    onehot[np.arange(B * T), y] = 1.0
    rec.add("gradient at the logits", "docs/derivations/cross-entropy.md",
            "dL/dz_n = (softmax(z_n) - onehot(t_{n+1})) / (B T)",
            {"dz": shape(dz)}, {"dz[b,i,:4]": few(dz[b * T + i])},
            [close("dz = (softmax - onehot)/(B T) (host softmax)", dz, (p - onehot) / (B * T), tol=1e-12),
             close("every row of dz sums to 0", dz.sum(-1), np.zeros(B * T), tol=1e-12)])
    return rec.steps
