"""One self-speculative decoding step: drafts from the MTP modules, one target pass, the
acceptance rule per draft, the residual or bonus token, the accept path and temperature 0."""
from __future__ import annotations

import math

import numpy as np

from refmtp.inference.acceptance import verify_drafts
from refmtp.inference.decode import Decoder, generate
from refmtp.inference.sampling import icdf, rng_v1_draws
from refmtp.inference.speculative import speculative_generate
from refmtp.model import forward
from refmtp.verification.audit.context import AuditContext
from refmtp.verification.audit.host import logsoftmax
from refmtp.verification.audit.steps import Recorder, check, close, few, num

TEMPERATURE = 1.0  # speculative step: sampled drafts and target rows at this temperature


def _host_icdf(w, u):
    """R5 on the host: smallest y with w[y] > 0 and fsum(w[:y+1]) > u fsum(w); else last positive."""
    total = math.fsum(w)
    t = u * total
    acc = []
    for y, wy in enumerate(w):
        acc.append(float(wy))
        if wy > 0 and math.fsum(acc) > t:
            return y
    pos = [y for y, wy in enumerate(w) if wy > 0]
    return pos[-1] if pos else -1


def audit_speculative(ctx: AuditContext) -> list:
    """One verification step with K = D sampled drafts, the accept path and greedy decoding."""
    cfg, bk, xp = ctx.cfg, ctx.bk, ctx.bk.xp
    D, b = cfg.D, ctx.b
    rec = Recorder("speculative")

    dec = Decoder(ctx.params, cfg)
    n = min(max(ctx.i + 2, D + 1, 2), ctx.T + 1)
    seq = [int(v) for v in ctx.tok[b, :n]]
    K = D
    tau = TEMPERATURE
    if K == 0:
        res0 = speculative_generate(dec, seq, 4, k=0, temperature=0.0)
        ref_tokens = generate(dec, seq, 4, temperature=0.0)
        rec.add("no MTP module: no drafts", "docs/speculative-decoding.md §1.4 (K = 0)", "every step emits one target token",
                {}, {"tokens": res0.tokens},
                [check("K = 0 output = plain greedy decoding", res0.tokens == ref_tokens,
                       f"{res0.tokens} vs {ref_tokens}")])
        return rec.steps

    res = speculative_generate(dec, seq, K + 1, k=K, temperature=tau, seed=ctx.seed, sample_drafts=True,
                               trace=True)
    tr = res.trace[0]
    drafts = list(tr["drafts"])
    draft_rows = [ctx.h(r) for r in tr["draft_logits"]]  # K rows (V,)
    q_lib = [ctx.h(r) for r in tr["q"]] if tr["q"] is not None else None
    target = ctx.h(tr["logits"])  # (K+1, V)
    A_lib = res.steps[0].A
    emitted = res.tokens[:res.steps[0].emitted]

    # 1. drafts ---------------------------------------------------------------------------------------
    checks = []
    if cfg.refmtp.mtp_kind == "causal":
        for s_ in range(1, K + 1):
            z = seq + drafts[:s_ - 1] + [0]  # a dummy target column: depth s's last row needs one
            o, _ = forward(ctx.params, cfg, xp.asarray([z], dtype=xp.int64), need_cache=False)
            want = ctx.h(o.mtp_logits[s_ - 1])[0, n - 2]
            checks.append(close(f"draft {s_} logits (cached decoder) = training forward, depth {s_} row n-2",
                                draft_rows[s_ - 1], want, tol=1e-9))
    q_host = [np.exp(logsoftmax(r / tau)) for r in draft_rows]
    if q_lib is not None:
        checks.append(close("q_k = softmax(draft logits / T) (host)", np.array(q_lib), np.array(q_host),
                            tol=1e-12))
    rec.add("drafts from the MTP modules", "docs/deepseek-v3.md §4.6; docs/speculative-decoding.md §3",
            f"module s at row n-2 of seq + d_<s drafts d_s ~ q_s = softmax(logits_s / T), T = {tau:g}",
            {"seq": [len(seq)], "drafts": [K]}, {"seq[-4:]": seq[-4:], "drafts": drafts}, checks)

    # 2. verification rows ----------------------------------------------------------------------------
    o, _ = forward(ctx.params, cfg, xp.asarray([seq + drafts + [0]], dtype=xp.int64), need_cache=False)
    want = ctx.h(o.logits)[0, n - 1:n + K]
    p = np.exp(logsoftmax(target / tau))  # (K+1, V)
    q = np.array(q_host)
    rec.add("one target pass over [x_{n-1}, d_1..d_K]", "docs/speculative-decoding.md §0, §1.1",
            "p_k = softmax(target logits / T) at positions n-1..n-1+K (K+1 rows, the last is the bonus row)",
            {"p": list(p.shape)}, {"p_1[:4]": few(p[0])},
            [close("cached verification logits = full forward on seq + drafts", target, want, tol=1e-9),
             close("every p row sums to 1", p.sum(-1), np.ones(K + 1), tol=1e-12)])

    # 3. per-draft decisions ---------------------------------------------------------------------------
    u_acc, u_s = rng_v1_draws(bk.rng(ctx.seed), K)  # the documented RNG-v1 stream (R9)
    A_host = K
    for k in range(K):
        d_ = drafts[k]
        pd, qd = float(p[k, d_]), float(q[k, d_])
        ratio = min(1.0, pd / qd)
        accept = pd > 0 and u_acc[k] * qd <= pd
        if A_host == K and not accept:
            A_host = k
        examined = k <= A_host
        lib_acc = A_lib > k
        word = {True: "accept", False: "reject"}
        checks = [check("decision = host rule accept iff u q(d) <= p(d) (R2)",
                        (not examined) or (lib_acc == accept),
                        f"host {word[accept]}, library {word[lib_acc]}"
                        if examined else "after the first rejection: not examined (R6)")]
        if ratio < 1.0:  # the library's acceptance boundary sits exactly at min(1, p/q)
            u_lo, u_hi = ratio * (1 - 1e-9), min(ratio * (1 + 1e-9), 1 - 1e-16)
            lo = verify_drafts(p[k:k + 2], q[k:k + 1], [d_], [u_lo], 0.5).num_accepted
            hi = verify_drafts(p[k:k + 2], q[k:k + 1], [d_], [u_hi], 0.5).num_accepted
            checks.append(check("library accepts at u = a(1-1e-9) and rejects at u = a(1+1e-9)",
                                lo == 1 and hi == 0, f"accepted {lo}, {hi}"))
        rec.add(f"draft {k + 1}: acceptance ratio and decision", "docs/speculative-decoding.md §1.1, §2.2 R2",
                "a_k = min(1, p_k(d_k) / q_k(d_k));  accept iff u_k q_k(d_k) <= p_k(d_k)",
                {}, {"d": [d_], "p(d)": [num(pd)], "q(d)": [num(qd)], "a": [num(ratio)], "u": [num(u_acc[k])],
                     "decision": ["accept" if accept else "reject"] if examined else ["not examined"]},
                checks)

    # 4. residual or bonus --------------------------------------------------------------------------
    if A_host < K:
        w = np.maximum(p[A_host] - q[A_host], 0.0)
        what, formula = f"residual at position {A_host + 1}", "r = max(p_j - q_j, 0), y = ICDF(r, u_sample)"
        beta = math.fsum(np.minimum(p[A_host], q[A_host]))
        extra = [close("residual mass = 1 - sum min(p, q)  (P(reject) = R, docs/speculative-decoding.md §1.2)", math.fsum(w),
                       1 - beta, tol=1e-12)]
    else:
        w = p[K]
        what, formula = "bonus row", "all K accepted: y = ICDF(p_{K+1}, u_sample)"
        extra = []
    y_host = _host_icdf(w, u_s)
    S = math.fsum(w)
    part_ok, n_pos = True, 0
    acc = 0.0
    for yy, wy in enumerate(w):  # every token owns the u-interval [C_{y-1}, C_y) / S of length w_y / S
        if wy > 0:
            n_pos += 1
            mid = (acc + wy / 2) / S
            part_ok &= icdf(w, mid) == yy
        acc = math.fsum([acc, float(wy)])
    rec.add(f"emitted token: {what}", "docs/speculative-decoding.md §1.1, §2.2 R3-R5", formula,
            {"w": [len(w)]}, {"u_sample": [num(u_s)], "y": [y_host], "emitted": emitted},
            [check("A and the tokens = host replay (RNG-v1 coins, host ICDF with fsum)",
                   A_lib == A_host and emitted == drafts[:A_host] + [y_host],
                   f"library A={A_lib} {emitted}, host A={A_host} {drafts[:A_host] + [y_host]}"),
             check("library ICDF gives token y the u-interval of length w_y/sum(w) (midpoints)", part_ok,
                   f"{n_pos} tokens with positive weight")] + extra)

    # 5. the accept path: drafts equal to the target's own greedy continuation --------------------------
    g_tokens = generate(dec, seq, K + 1, temperature=0.0)  # plain cached greedy decoding
    o, _ = forward(ctx.params, cfg, xp.asarray([seq + g_tokens[:K] + [0]], dtype=xp.int64), need_cache=False)
    rows = o.logits[0, n - 1:n + K]  # (K+1, V) target rows over [x_{n-1}, d_1..d_K]
    vg = verify_drafts(None, None, g_tokens[:K], None, None, greedy=True, logits=rows)
    p_g = np.exp(logsoftmax(ctx.h(rows) / tau))
    vs = verify_drafts(p_g, None, g_tokens[:K], u_acc, u_s)  # one-hot q: a_k = p_k(d_k)
    A_oh = next((k for k in range(K) if not (p_g[k, g_tokens[k]] > 0 and u_acc[k] <= p_g[k, g_tokens[k]])), K)
    rec.add("accept path: drafts = the target's greedy continuation", "docs/speculative-decoding.md §1.4, §2.2 R1, R2, R4",
            "greedy: accept while d_k = argmax p_k, then the bonus argmax p_{K+1}; "
            "one-hot q: accept iff u_k <= p_k(d_k)",
            {}, {"drafts": g_tokens[:K], "p_k(d_k)": [num(p_g[k, g_tokens[k]]) for k in range(K)],
                 "greedy verdict": list(vg.tokens), "one-hot A": [vs.num_accepted]},
            [check("greedy: every draft accepted and the bonus = the next greedy token",
                   vg.num_accepted == K and vg.is_bonus and list(vg.tokens) == g_tokens,
                   f"A={vg.num_accepted}, tokens {list(vg.tokens)} vs greedy {g_tokens}"),
             check("one-hot q: A = host rule (accept iff u_k <= p_k(d_k))", vs.num_accepted == A_oh,
                   f"library A={vs.num_accepted}, host A={A_oh}")])

    # 6. greedy end-to-end ------------------------------------------------------------------------------
    new = 8
    res_g = speculative_generate(dec, seq, new, k=K, temperature=0.0)
    ref_g = generate(dec, seq, new, temperature=0.0)
    tps = len(res_g.tokens) / max(1, len(res_g.steps))
    rec.add("temperature 0: speculative = greedy decoding", "docs/speculative-decoding.md §1.4, §2.2 R1",
            f"{new} tokens with K = {K} drafts per step vs one main-model call per token",
            {}, {"tokens": res_g.tokens, "tokens per step": [num(tps)]},
            [check("identical token streams", res_g.tokens == ref_g, f"{res_g.tokens} vs {ref_g}")])
    return rec.steps
