"""Benchmark: how the training-step time grows with batch, sequence length and number of experts.

    python benchmarks/scaling.py                      # small preset, float32, Numba kernels on
    python benchmarks/scaling.py --quick --threads 1

Three sweeps around the small preset (one variable at a time, the others fixed):

* batch B in ``--batches`` at T = ``--seq``;
* sequence length T in ``--seqs`` at B = ``--batch``;
* routed experts E in ``--experts`` (K = 2 per token, n_group = topk_group = 2 kept) at
  (``--batch``, ``--seq``): per-token compute stays the same, parameters and optimizer work grow.

Each point is the median of ``--repeats`` full training steps (forward + backward + clip + AdamW +
bias update, benchmarks/train_step.py) after a warm-up. The exponent ``a`` of ``time ~ x^a`` is
the least-squares slope of log(time) on log(x), printed next to the slope of the analytic matmul
FLOPs (refmtp.verification.flops) over the same points, so the gap shows what the FLOP count does not explain
(fixed per-call overheads at small sizes, the T^2 attention at long sequences). Writes
``benchmarks/results/scaling.json``. Not a test.
"""
from __future__ import annotations

import argparse
import math
import sys
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from gemm_peak import add_common_args, blas_threads, run_context  # noqa: E402


def loglog_slope(xs, ys) -> float:
    """Least-squares slope of log(y) against log(x)."""
    lx = [math.log(x) for x in xs]
    ly = [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    sxx = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sxx


def main(argv=None):
    from _machine import machine_info, write_result

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batches", nargs="+", type=int, default=None)
    ap.add_argument("--seqs", nargs="+", type=int, default=None)
    ap.add_argument("--experts", nargs="+", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", default=str(HERE / "results" / "scaling.json"))
    args = ap.parse_args(argv)
    blas_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 5)
    batches = args.batches or ([1, 2, 4, 8] if args.quick else [1, 2, 4, 8, 16, 32])
    seqs = args.seqs or ([32, 64, 128, 256] if args.quick else [32, 64, 128, 256, 512])
    experts = args.experts or ([4, 8, 16, 32] if args.quick else [4, 8, 16, 32, 64])

    from refmtp.config import preset
    from refmtp.verification.flops import train_step_flops
    from train_step import time_steps

    base = preset(args.preset)
    ctx_start = run_context(args.threads)
    sweeps = {
        "batch": [(b, base, b, args.seq) for b in batches],
        "seq": [(t, base, args.batch, t) for t in seqs],
        "experts": [(e, base.replace(n_routed_experts=e, n_group=2, topk_group=2), args.batch, args.seq)
                    for e in experts],
    }
    out_sweeps = {}
    for name, points in sweeps.items():
        rows = []
        for x, cfg, B, T in points:
            m = time_steps(cfg, args.dtype, B, T, repeats, kernels=True)
            flops = train_step_flops(cfg, B, T)
            rows.append({"x": x, "batch": B, "seq": T, "n_routed_experts": cfg.n_routed_experts,
                         "step_ms": m["step"] * 1e3, "forward_ms": m["forward"] * 1e3,
                         "backward_ms": m["backward"] * 1e3, "optimizer_ms": m["optimizer"] * 1e3,
                         "tokens_per_s": B * T / m["step"], "matmul_gflop": flops / 1e9,
                         "gflops": flops / m["step"] / 1e9})
        xs = [r["x"] for r in rows]
        out_sweeps[name] = {
            "points": rows,
            "time_exponent": loglog_slope(xs, [r["step_ms"] for r in rows]),
            "flop_exponent": loglog_slope(xs, [r["matmul_gflop"] for r in rows]),
        }

    print(f"Training-step scaling, preset {args.preset} {args.dtype}, Numba kernels on, BLAS threads "
          f"{blas_threads()}, median of {repeats}, load average {ctx_start['load_average_1_5_15m']}")
    for name, s in out_sweeps.items():
        fixed = {"batch": f"T={args.seq}", "seq": f"B={args.batch}",
                 "experts": f"B={args.batch}, T={args.seq}, K=2"}[name]
        print(f"\n{name} ({fixed}): time ~ x^{s['time_exponent']:.2f}   (matmul FLOPs ~ x^{s['flop_exponent']:.2f})")
        head = f"{name:>8} {'step ms':>9} {'tokens/s':>9} {'GFLOP':>7} {'GFLOP/s':>8}"
        print(head)
        print("-" * len(head))
        for r in s["points"]:
            print(f"{r['x']:8d} {r['step_ms']:9.1f} {r['tokens_per_s']:9.0f} {r['matmul_gflop']:7.2f} "
                  f"{r['gflops']:8.1f}")
    result = {
        "benchmark": "scaling",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "preset": args.preset, "dtype": args.dtype, "repeats": repeats,
        "fixed": {"batch": args.batch, "seq": args.seq},
        "timing": ("median training step (fwd + bwd + clip + AdamW + bias update) after one warm-up; "
                   "exponents: least-squares slope of log(time) / log(matmul FLOPs) on log(x)"),
        "context_start": ctx_start, "context_end": run_context(args.threads),
        "machine": machine_info(),
        "sweeps": out_sweeps,
    }
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
