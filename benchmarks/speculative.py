"""Benchmark: self-speculative (MTP-drafted) decoding against plain decoding, interleaved in one process.

    python benchmarks/speculative.py --threads 1                       # newest checkpoint under runs/
    python benchmarks/speculative.py --threads 1 --ckpt runs/x/checkpoint-0001500 --rounds 6
    python benchmarks/speculative.py --threads 1 --models small --quick

Models (``--models``): ``small`` = ``--ckpt``, else the newest checkpoint under ``--runs``, else
the small preset with random weights (the JSON says which); ``decode-membound`` = that preset
with random weights (seed 0): its drafts are random, so its tau is ~1 and its measured speedup
says nothing about a trained model; what it measures is the cost of a speculative step
relative to a plain one when decoding is memory-bound, and the table projects the speedup at
the small checkpoint's tau from it.

Runners (all greedy drafts are argmax of the MTP logits; K > D reuses the last module,
vLLM-style): ``plain`` (``refmtp.inference.decode.generate``) and ``spec-K`` for K in ``--ks``
(``speculative_generate``, lossless rule), at each temperature of ``--temperatures``; at
temperature > 0 both draft choices run: ``spec-K`` with drafts sampled from q = softmax(MTP
logits / T) and ``spec-K-argmax`` with argmax drafts (q one-hot), seeds ``seed + prompt index``.

Timing: ``--rounds`` rounds; in each round every runner decodes every prompt, the runners
interleaved per prompt and their order rotated from round to round, so load drifts hit all
alike. A round's speedup of a runner = its tokens/s over plain's in that round (prefill
included, as a user sees it); the table gives the median over rounds and the min-max spread.
At temperature 0 every speculative output is checked equal to plain greedy decoding, token for
token, in every round (``identical``); at temperature > 0 equality holds in distribution
(tests/test_speculative_enumeration.py), not per seed.

Step costs, measured after the rounds on the same model (median of ``--cost-repeats`` calls at
a context of prompt + half the new tokens): ``c1`` = one main-model call on 1 token, ``c_v(K)`` =
on K+1 tokens (a verification), ``c_m(r)`` = MTP module 1 on r rows. A K-draft step costs at
least ``c_v(K) + c_m(tau) + (K - 1) c_m(1)`` (module 1 catches up the ~tau committed rows; each
further draft reuses the module on one row), so the speedup is at most ``tau * c1 / that``
(``bound``); the gap to the measured speedup is the loop's own bookkeeping.

Writes ``benchmarks/results/speculative.json``. Not a test.
"""
from __future__ import annotations

import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from decode import load_model, model_args, prompts_for  # noqa: E402
from gemm_peak import blas_threads, run_context  # noqa: E402

REPO = HERE.parent


def runners_for(ks, temperature):
    out = [("plain", 0, False)]
    for k in ks:
        out.append((f"spec-K{k}", k, temperature > 0))
        if temperature > 0:
            out.append((f"spec-K{k}-argmax", k, False))
    return out


def run_rounds(dec, prompts, new, temperature, ks, rounds, seed):
    from refmtp.inference.decode import generate
    from refmtp.inference.speculative import speculative_generate

    D = dec.cfg.D
    runners = runners_for(ks, temperature)
    per_round = {name: [] for name, _, _ in runners}  # (tokens, seconds) per round
    steps = {name: [] for name, _, _ in runners}
    identical = {name: 0 for name, _, _ in runners}
    checked = 0
    for r in range(rounds):
        order = runners[r % len(runners):] + runners[: r % len(runners)]
        tot = {name: [0, 0.0] for name, _, _ in runners}
        for i, prompt in enumerate(prompts):
            outs = {}
            for name, k, sampled in order:
                t0 = time.perf_counter()
                if k == 0:
                    toks = generate(dec, prompt, new, temperature=temperature, seed=seed + i)
                else:
                    res = speculative_generate(dec, prompt, new, k=k, temperature=temperature, seed=seed + i,
                                               sample_drafts=sampled, reuse_last_module=k > D)
                    toks = res.tokens
                    if r == 0:
                        steps[name].extend(res.steps)
                tot[name][1] += time.perf_counter() - t0
                tot[name][0] += len(toks)
                outs[name] = toks
            if temperature == 0:
                checked += 1
                for name in outs:
                    identical[name] += outs[name] == outs["plain"]
        for name in tot:
            per_round[name].append(tuple(tot[name]))
    return runners, per_round, steps, identical, checked


def median_call(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_costs(dec, prompt, context_extra: int, ks, repeats: int) -> dict:
    """Median seconds of the model calls a plain / speculative step makes (module docstring)."""
    xp = dec.bk.xp
    seq = list(prompt) + [prompt[i % len(prompt)] for i in range(context_extra)]
    cache = dec.new_cache("main", capacity=len(seq) + 8)
    out = dec.main(xp.asarray([seq], dtype=xp.int64), cache)
    n = cache.length
    mcache = dec.new_cache(("mtp", 1), capacity=len(seq) + 8)
    dec.mtp(1, xp.asarray([seq[1:]], dtype=xp.int64), out.hidden[:, :-1], mcache)
    m = mcache.length
    h = out.hidden

    def main_call(T):
        def run():
            dec.main(xp.asarray([seq[-T:]], dtype=xp.int64), cache)
            cache.truncate(n)
        return run

    def mtp_call(rows):
        def run():
            dec.mtp(1, xp.asarray([seq[-rows:]], dtype=xp.int64), h[:, -rows:], mcache)
            mcache.truncate(m)
        return run

    costs = {"c1": median_call(main_call(1), repeats)}
    for k in ks:
        costs[f"c_v{k}"] = median_call(main_call(k + 1), repeats)
    for rows in (1, 2, 3, 4):
        costs[f"c_m{rows}"] = median_call(mtp_call(rows), repeats)
    return costs


def bound(costs, k, tau):
    """tau * c1 / (c_v(K) + c_m(tau rows, interpolated) + (K-1) c_m(1))."""
    lo = max(1, min(3, int(tau)))
    frac = min(max(tau - lo, 0.0), 1.0)
    c_m = costs[f"c_m{lo}"] * (1 - frac) + costs[f"c_m{lo + 1}"] * frac
    return tau * costs["c1"] / (costs[f"c_v{k}"] + c_m + (k - 1) * costs["c_m1"])


def measure(name, args):
    from refmtp.inference.decode import Decoder, generate
    from refmtp.inference.speculative import spec_metrics, speculative_generate

    cfg, params, source, path = load_model(name, args.ckpt, args.runs)
    dec = Decoder(params, cfg)
    membound = name == "decode-membound"
    samples = args.samples or (1 if membound else (2 if args.quick else 4))
    new = args.max_new_tokens or (16 if membound else (48 if args.quick else 96))
    rounds = args.rounds or (3 if args.quick else 6)
    temps = [0.0] if membound else args.temperatures
    prompts, where = prompts_for(cfg, path, samples, args.prompt_len)
    generate(dec, prompts[0], 4)  # warm-up (kernels, RoPE tables)
    for k in args.ks:
        speculative_generate(dec, prompts[0], 4, k=k, reuse_last_module=k > cfg.D)
    rows = []
    for temp in temps:
        runners, per_round, steps, identical, checked = run_rounds(dec, prompts, new, temp, args.ks, rounds,
                                                                   args.seed)
        plain = [tok / sec for tok, sec in per_round["plain"]]
        for rname, k, sampled in runners:
            tps = [tok / sec for tok, sec in per_round[rname]]
            speed = [a / b for a, b in zip(tps, plain)]
            row = {"temperature": temp, "runner": rname, "K": k, "drafts": "sampled" if sampled else "argmax",
                   "reuse_last_module": k > cfg.D, "tokens_per_s_median": statistics.median(tps),
                   "speedup_median": statistics.median(speed), "speedup_min": min(speed),
                   "speedup_max": max(speed), "speedup_rounds": speed}
            if k:
                m = spec_metrics(steps[rname], k)
                row.update({"tau": m["tau"], "draft_acceptance_rate": m["draft_acceptance_rate"],
                            "acceptance_per_position": m["acceptance_per_position"]})
            if temp == 0:
                row["identical"] = f"{identical[rname]}/{checked}"
            rows.append(row)
    costs = step_costs(dec, prompts[0], new // 2, args.ks, args.cost_repeats)
    return {"model": name, "source": source, "prompts_from": where, "samples": samples, "prompt_len": args.prompt_len,
            "max_new_tokens": new, "rounds": rounds, "D": cfg.D, "dtype": str(params["lm_head.weight"].dtype),
            "rows": rows, "step_costs_ms": {k: v * 1e3 for k, v in costs.items()}}


def main(argv=None):
    from _machine import machine_info, write_result

    ap = model_args(__doc__)
    ap.add_argument("--samples", type=int, default=None, help="prompts (default 4; 1 for decode-membound)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 96 (16 for decode-membound)")
    ap.add_argument("--rounds", type=int, default=None, help="default 6 (--quick 3)")
    ap.add_argument("--ks", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--temperatures", nargs="+", type=float, default=[0.0, 1.0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cost-repeats", type=int, default=31)
    ap.add_argument("--out", default=str(HERE / "results" / "speculative.json"))
    args = ap.parse_args(argv)
    blas_threads(args.threads)
    ctx_start = run_context(args.threads)
    models = [measure(name, args) for name in args.models]

    tau_small = {}
    for mdl in models:
        c = mdl["step_costs_ms"]
        print(f"\n{mdl['model']} ({mdl['source']}; D={mdl['D']}, {mdl['dtype']}), {mdl['samples']} prompts x "
              f"{mdl['max_new_tokens']} new tokens, {mdl['rounds']} rounds, BLAS threads {blas_threads()}, "
              f"load average {ctx_start['load_average_1_5_15m']}")
        print("step costs (ms): c1 %.3f | " % c["c1"]
              + " ".join(f"c_v{k} {c[f'c_v{k}']:.3f}" for k in args.ks) + " | "
              + " ".join(f"c_m{r} {c[f'c_m{r}']:.3f}" for r in (1, 2, 3, 4)))
        head = (f"{'temp':>4} {'runner':16} {'tok/s':>8} {'speedup':>8} {'min-max':>11} {'tau':>5} "
                f"{'accept':>6} {'P(A>=i)':>16} {'bound':>6} {'same':>6}")
        print(head)
        print("-" * len(head))
        for r in mdl["rows"]:
            if r["K"] and "tau" in r:
                src = r["tau"]
                if mdl["model"] == "small" and r["temperature"] == 0:
                    tau_small[r["K"]] = r["tau"]
                r["bound"] = bound({k: v for k, v in c.items()}, r["K"], src)
                if mdl["model"] == "decode-membound" and r["K"] in tau_small:
                    r["projected_speedup_at_small_tau"] = bound(c, r["K"], tau_small[r["K"]])
            acc = ", ".join(f"{a:.2f}" for a in r.get("acceptance_per_position", []) if a is not None)
            print(f"{r['temperature']:4.1f} {r['runner']:16} {r['tokens_per_s_median']:8.1f} "
                  f"{r['speedup_median']:7.2f}x {r['speedup_min']:5.2f}-{r['speedup_max']:<5.2f} "
                  f"{(format(r['tau'], '5.2f') if 'tau' in r else '-'):>5} "
                  f"{(format(r['draft_acceptance_rate'], '6.2f') if 'tau' in r else '-'):>6} {acc:>16} "
                  f"{(format(r['bound'], '5.2f') + 'x') if 'bound' in r else '-':>6} {r.get('identical', '-'):>6}")
        for r in mdl["rows"]:
            if "projected_speedup_at_small_tau" in r:
                print(f"  {r['runner']}: at the small checkpoint's tau {tau_small[r['K']]:.2f} the step costs above "
                      f"allow {r['projected_speedup_at_small_tau']:.2f}x (projection, not a measurement)")
    result = {
        "benchmark": "speculative",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "timing": ("per round: every runner on every prompt, interleaved per prompt, runner order rotated "
                   "per round; speedup = runner tokens/s / plain tokens/s in the same round (prefill "
                   "included); median and min-max over rounds; tau and acceptance from round 0's steps"),
        "context_start": ctx_start, "context_end": run_context(args.threads),
        "machine": machine_info(), "models": models,
    }
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
