"""DeepSeekMoE routing and experts of the first MoE layer (V3 eqs. 12-20): affinities, the
selection bias, group limiting, top-K, gate values, dispatch, the output, the balance loss and
the bias update."""
from __future__ import annotations

import math

import numpy as np

from refmtp.model import backward
from refmtp.model.balance import update_bias
from refmtp.model.block import sub_params
from refmtp.model.moe import moe_forward
from refmtp.model.router import router_forward
from refmtp.params import is_bias
from refmtp.verification.audit.context import AuditContext, block_cache, moe_layers
from refmtp.verification.audit.host import fmatvec, host_swiglu, topk_set
from refmtp.verification.audit.steps import Recorder, check, close, few, maxdiff, num, shape


def _host_mask_groups(sc, cfg):
    """Group-limited selection scores of one token (docs/deepseek-v3.md §3.2 step 4), host; (masked, gscores)."""
    E, G, TG = cfg.n_routed_experts, cfg.n_group, cfg.topk_group
    if cfg.topk_method == "greedy" or G == 1 or TG >= G:
        return sc.copy(), None
    grp = sc.reshape(G, E // G)
    if cfg.scoring_func == "sigmoid":
        gs = np.array([sum(sorted(row.tolist())[-2:]) for row in grp])  # top-2 sum
    else:
        gs = np.array([max(row.tolist()) for row in grp])  # max (V2)
    kept = topk_set(gs, TG)
    masked = np.array([sc[e] if (e // (E // G)) in kept else -np.inf for e in range(E)])
    return masked, gs


def host_balance(s, idx_actual, cfg):
    """Balance loss of one layer from its affinities s (B,T',E), host (eqs. 17-20 / V2)."""
    kind, E, K = cfg.refmtp.balance_loss, cfg.n_routed_experts, cfg.num_experts_per_tok
    if kind == "none":
        return 0.0, None, None
    if kind == "seq":
        groups = [(s[bb], [topk_set(row, K) for row in s[bb]]) for bb in range(s.shape[0])]
    else:
        groups = [(s.reshape(-1, E), [list(r) for r in idx_actual.reshape(-1, K)])]
    losses, f_first, P_first = [], None, None
    for sg, sel in groups:
        Tg = sg.shape[0]
        counts = np.zeros(E)
        for row in sel:
            for e in row:
                counts[e] += 1
        f = E / (K * Tg) * counts  # eq. 18
        sn = sg / sg.sum(axis=-1, keepdims=True)  # eq. 19
        Pi = sn.mean(axis=0)  # eq. 20
        losses.append(math.fsum(f * Pi))  # eq. 17 without alpha
        if f_first is None:
            f_first, P_first = f, Pi
    return math.fsum(losses) / len(losses), f_first, P_first


def audit_moe(ctx: AuditContext) -> list:
    """The steps of the first MoE layer, from the router to the bias update (one step without MoE)."""
    cfg, bk, xp = ctx.cfg, ctx.bk, ctx.bk.xp
    layers = moe_layers(cfg)
    rec = Recorder("moe")
    if not layers:
        rec.add("no MoE layer in this config", "docs/deepseek-v3.md §3.1", "layers >= first_k_dense_replace use MoE", {}, {},
                [check("the model's forward recorded no routing", not ctx.out.routing,
                       f"routing recorded for layers {sorted(ctx.out.routing)}")])
        return rec.steps
    layer = layers[0]
    E, K, G, TG = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
    rho = float(cfg.routed_scaling_factor)
    pre = f"model.layers.{layer}.mlp."
    bc = block_cache(ctx, layer)
    B, Tl, d = bc.ffn.x_shape
    u_dev = bc.ffn.router.x  # (N, d) post_attention_layernorm output
    p_mlp = sub_params(ctx.params, pre)
    out_dev, aux_dev, mc = moe_forward(xp.reshape(u_dev, (B, Tl, d)), p_mlp, cfg)
    rc = mc.router
    U = ctx.h(u_dev)
    N = U.shape[0]
    i = min(ctx.i, Tl - 1)
    n = ctx.b * Tl + i  # token index of (b, i)
    has_bias = cfg.topk_method == "noaux_tc"
    s = ctx.h(rc.s)  # (N, E)
    idx = np.array(bk.to_numpy(rc.topk_idx), dtype=np.int64)  # (N, K)
    g = ctx.h(mc.topk_weight).reshape(N, K)
    bias = ctx.R(pre + "gate.e_score_correction_bias") if has_bias else np.zeros(E)
    Wg = ctx.R(pre + "gate.weight")

    where = f"layer {layer}, token (b={ctx.b}, i={i})"
    # 1. router logits and affinities --------------------------------------------------------
    z_host = fmatvec(Wg, U[n])  # (E,)
    if cfg.scoring_func == "sigmoid":
        logit = np.log(s[n]) - np.log1p(-s[n])  # the inverse of the sigmoid
        checks = [close("logit(s) = log s - log(1-s) equals exactly rounded u . e_i", logit, z_host,
                        tol=1e-9),
                  check("0 < s < 1 for every token and expert", bool(np.all((s > 0) & (s < 1))),
                        f"min {s.min():.3g}, max {s.max():.3g}")]
        formula = "z = u Wg^T;  s = sigmoid(z)"
    else:
        checks = [close("log s_e - log s_0 = z_e - z_0 (softmax log-ratios)", np.log(s[n]) - np.log(s[n, 0]),
                        z_host - z_host[0], tol=1e-9),
                  close("softmax affinities sum to 1", s.sum(-1), np.ones(N))]
        formula = "z = u Wg^T;  s = softmax(z)"
    rec.add(f"router affinities ({where})", "eq. 15; docs/deepseek-v3.md §3.2 steps 1-2", formula,
            {"u": shape(U), "gate.weight": list(Wg.shape), "s": shape(s)},
            {"z[:4]": few(z_host), "s[:4]": few(s[n])}, checks)

    # 2. selection scores with the bias ---------------------------------------------------------
    sel = ctx.h(rc.sel_scores)  # (N, E) -inf outside kept groups
    sc = s + bias[None, :]
    fin = np.isfinite(sel)
    if has_bias:
        b_dt = str(p_mlp["gate.e_score_correction_bias"].dtype)
        rec.add("selection scores (bias for selection only)", "eq. 16; docs/deepseek-v3.md §3.2 step 3, §3.4",
                "sc = s + b,  b = e_score_correction_bias (float32, no gradient)",
                {"b": [E], "sc": shape(sc)},
                {"b[:4]": few(bias), "sc[:4]": few(sc[n])},
                [check("the bias is float32", b_dt == "float32", f"dtype {b_dt}"),
                 close("selection scores = s + b (host, float64)", np.where(fin, sel, 0.0),
                       np.where(fin, sc, 0.0), tol=1e-12)])
    else:
        rec.add("selection scores (no bias: V2 router)", "docs/deepseek-v3.md §3.3", "sc = s",
                {"sc": shape(sc)}, {"sc[:4]": few(sc[n])},
                [close("selection scores = s", np.where(fin, sel, 0.0), np.where(fin, sc, 0.0))])

    # 3. group-limited selection -----------------------------------------------------------------
    host_masked, gs_n = [], None
    for t in range(N):
        m, gs = _host_mask_groups(sc[t], cfg)
        host_masked.append(m)
        if t == n:
            gs_n = gs
    host_masked = np.array(host_masked)
    active = gs_n is not None
    gname = "top-2 sum" if cfg.scoring_func == "sigmoid" else "max"
    checks = [close("masked scores = host group limiting (-inf outside the kept groups)", sel, host_masked)]
    if active:
        checks.append(close("group scores = host " + gname, ctx.h(rc.group_scores)[n], gs_n))
    else:
        n_masked = int((~np.isfinite(sel)).sum())
        checks.append(check("no group is dropped (topk_group >= n_group or greedy)", n_masked == 0,
                            f"{n_masked} masked entries"))
    rec.add("group-limited routing", "docs/deepseek-v3.md §3.2 step 4 (P-V3 node-limited routing)",
            f"group score = {gname} of sc in each of G={G} groups; keep topk_group={TG}; others -> -inf",
            {"groups": [G, E // G]},
            {**({"group scores": few(gs_n)} if active else {}), "masked[:4]": few(host_masked[n])}, checks)

    # 4. top-K -----------------------------------------------------------------------------------
    host_sets = [sorted(topk_set(host_masked[t], K)) for t in range(N)]
    lib_sets = [sorted(int(e) for e in idx[t]) for t in range(N)]
    bad = sum(1 for a_, b_ in zip(host_sets, lib_sets) if a_ != b_)
    gap = min(float(np.min(sel[t][idx[t]])) - float(np.max(np.delete(sel[t], idx[t]))) for t in range(N)) \
        if E > K else math.inf
    rec.add("top-K experts", "eq. 16 (TopK); docs/deepseek-v3.md §3.2 step 4",
            f"S = TopK(masked sc, K={K})  (ties -> lowest index)",
            {"topk_idx": [N, K]}, {"S": [int(e) for e in idx[n]], "sc[S]": few(sc[n][idx[n]])},
            [check("selected sets = host sort by (-score, index)", bad == 0, f"{bad} of {N} tokens differ"),
             check("every selected score >= every unselected score", gap >= 0, f"min margin {gap:.3g}")])

    # 5. the bias changes the selection, not the gate values ---------------------------------------
    if has_bias:
        zero = xp.zeros_like(p_mlp["gate.e_score_correction_bias"])  # float32 zeros
        idx0_dev, g0_dev, _ = router_forward(u_dev, p_mlp["gate.weight"], zero, cfg)
        idx0 = np.array(bk.to_numpy(idx0_dev), dtype=np.int64)
        g0 = ctx.h(g0_dev)
        same = [t for t in range(N) if sorted(idx0[t]) == lib_sets[t]]
        changed = [t for t in range(N) if t not in same]
        d_same = 0.0
        for t in same:  # compare gates expert by expert (slot order may differ)
            m1 = dict(zip(idx[t].tolist(), g[t].tolist()))
            m0 = dict(zip(idx0[t].tolist(), g0[t].tolist()))
            d_same = max(d_same, max(abs(m1[e] - m0[e]) for e in m1))
        rec.add("the bias moves selection, never gate values", "eq. 16 vs eq. 13; P-LF",
                "run the router again with b = 0: tokens whose S is unchanged keep identical g",
                {}, {"tokens whose S the bias changed": [len(changed)]},
                [check("identical gate values where the bias did not change S", d_same <= 1e-15,
                       f"max |g(b) - g(0)| {d_same:.1e} over {len(same)} tokens; the bias changed S "
                       f"for {len(changed)} of {N} tokens")])

    # 6. gate values ---------------------------------------------------------------------------------
    # V3 sigmoid: normalise then scale by rho; V2 softmax + norm_topk_prob: normalise, no rho
    # (DeepSeek-V2's modeling_deepseek.py; docs/math-decisions.md)
    v2_norm = cfg.scoring_func == "softmax" and cfg.norm_topk_prob
    c_ = 1.0 if v2_norm else rho
    g_host = []
    for t in range(N):
        w_ = s[t][idx[t]]
        g_host.append(c_ * w_ / (w_.sum() + 1e-20) if cfg.norm_topk_prob else c_ * w_)
    g_host = np.array(g_host)
    c_name = "1" if v2_norm else "rho"
    checks = [close(f"g = {c_name} s_S / sum_S s from the UNBIASED s", g, g_host)]
    if cfg.norm_topk_prob:
        total = "1 (softmax + norm_topk_prob: no rho)" if v2_norm else "routed_scaling_factor"
        checks.insert(0, close(f"selected gate values sum to {total} = {c_:g}",
                               g.sum(axis=-1), np.full(N, c_)))
    rec.add("gate values", "eq. 13 (+ routed_scaling_factor); docs/deepseek-v3.md §3.2 step 5",
            (f"g_i = {c_name} s_i / sum_{{j in S}} s_j" if cfg.norm_topk_prob
             else "g_i = rho s_i"),
            {"topk_weight": [N, K]}, {"g": few(g[n], K), "sum g": [num(g[n].sum())]}, checks)

    # 7. dispatch and load ---------------------------------------------------------------------------
    order = np.array(bk.to_numpy(mc.order), dtype=np.int64)
    off = mc.offsets
    load = np.array(bk.to_numpy(mc.load), dtype=np.int64)
    flat = idx.reshape(-1)
    blocks_ok = all(np.all(flat[order[off[e]:off[e + 1]]] == e)
                    and np.all(np.diff(order[off[e]:off[e + 1]]) > 0) for e in range(E))
    rec.add("dispatch plan and expert load", "docs/deepseek-v3.md §3.4 (load c_i); docs/derivations/moe-combine.md",
            "order = slots sorted by expert (stable); load_e = #slots routed to e",
            {"order": [N * K], "load": [E]}, {"load": [int(v) for v in load]},
            [check("load = bincount of the selected experts",
                   np.array_equal(load, np.bincount(flat, minlength=E)) and load.sum() == N * K,
                   f"sum {int(load.sum())}, N K = {N * K}"),
             check("each expert's block holds exactly its slots, in token order", blocks_ok,
                   "blocks checked for all experts")])

    # 8. eq. 12 output -------------------------------------------------------------------------------
    out = ctx.h(out_dev).reshape(N, d)
    proj = ("gate_proj", "up_proj", "down_proj")
    shared = np.zeros((N, d))
    if cfg.n_shared_experts > 0:
        shared = host_swiglu(U, *(ctx.R(pre + f"shared_experts.{w}.weight") for w in proj))
    routed = np.zeros((N, d))
    for t in range(N):  # per token, no permutation
        for kk in range(K):
            W = [ctx.R(pre + f"experts.{int(idx[t, kk])}.{w}.weight") for w in proj]
            routed[t] += g[t, kk] * host_swiglu(U[t:t + 1], *W)[0]
    rec.add("routed and shared experts", "eq. 12; docs/deepseek-v3.md §3.2 step 6",
            "out = SharedMLP(u) + sum_{i in S} g_i FFN_i(u),  FFN(x) = down(silu(gate x) * up x)",
            {"out": [N, d]}, {"out[:4]": few(out[n]), "shared[:4]": few(shared[n])},
            [close("dispatched/combined output = per-token loop over S (host SwiGLU, silu = a/(1+e^-a))",
                   out, shared + routed)])

    # 9. balance loss ---------------------------------------------------------------------------------
    aux = float(ctx.h(aux_dev))
    aux_host, f, Pi = host_balance(s.reshape(B, Tl, E), idx.reshape(B, Tl, K), cfg)
    kind = cfg.refmtp.balance_loss
    formula = {"seq": "per sequence: f_i = E/(K T) #{t: i in TopK(s_t)}, s' = s/sum s, P_i = mean_t s'_i, "
                      "L = sum_i f_i P_i; mean over sequences (alpha applied in the loss)",
               "expert": "V2: f_i = E/(K N) #{selected i}, P_i = mean s'_i over all tokens, L = sum f P",
               "none": "no balance loss"}[kind]
    vals = {"aux": [num(aux)]}
    if f is not None:
        vals.update({"f (seq 0)[:4]": few(f), "P (seq 0)[:4]": few(Pi)})
    rec.add("balance loss (without alpha)", "eqs. 17-20; docs/deepseek-v3.md §3.5", formula, {"s": [B, Tl, E]}, vals,
            [close("balance loss = host recount (seq: unbiased, ungrouped TopK per sequence)", aux, aux_host)])

    # 10. bias update ---------------------------------------------------------------------------------
    if has_bias:
        gamma = float(cfg.refmtp.bias_update_gamma)
        b_dev = p_mlp["gate.e_score_correction_bias"]
        new = np.array(bk.to_numpy(update_bias(b_dev, mc.load, gamma)))
        b32 = np.array(bk.to_numpy(b_dev))
        c_ = load.astype(np.float64)
        step = np.where(c_ < c_.mean(), 1.0, np.where(c_ > c_.mean(), -1.0, 0.0)).astype(np.float32)
        want = b32 + step * np.float32(gamma)
        rec.add("auxiliary-loss-free bias update", "docs/deepseek-v3.md §3.4 (P-V3 2.1.2)",
                f"b_i += gamma sign(mean(c) - c_i), gamma = {gamma:g}: overloaded experts go down",
                {"b": [E]}, {"b_new - b": few(new.astype(np.float64) - b32, E)},
                [check("update = +gamma below the mean load, -gamma above, float32",
                       new.dtype == np.float32 and np.array_equal(new, want),
                       f"dtype {new.dtype}, max |diff| {maxdiff(new, want):.1e}")])

    # 11. no gradient for the bias --------------------------------------------------------------------
    grads = backward(ctx.cache)
    nb = [k for k in grads if is_bias(k)]
    missing = [k for k in ctx.params if not is_bias(k) and k not in grads]
    rec.add("what has a gradient", "docs/deepseek-v3.md §3.4, §3.5",
            "e_score_correction_bias gets none (updated by the sign rule); every other tensor does",
            {}, {"gradients": [len(grads)]},
            [check("backward returns no e_score_correction_bias entry", not nb, f"{len(nb)} bias entries"),
             check("every other parameter has a gradient", not missing, f"missing: {missing[:3]}")])
    return rec.steps
