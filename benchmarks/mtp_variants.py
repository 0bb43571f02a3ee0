"""Benchmark: training-step time of the MTP experiment's four variants (sizing its budget).

    python benchmarks/mtp_variants.py                    # preset mini, B*T = 8*128, 22 rounds
    python benchmarks/mtp_variants.py --preset tiny --batch 8 --seq 64

The four variants of ``refmtp experiment mtp`` (D=0, causal D=1, causal D=2, parallel D=2;
refmtp/verification/experiment_mtp.py) each get their own parameters, optimizer and window
sampler; one round takes one ``train_step`` of each variant in turn (alternated, so load drifts
hit all four alike). Reported: the median step time over the rounds after ``--warmup`` rounds,
the ratio to D=0, and the experiment's estimated training time at ``--steps`` steps and 3 seeds
(12 same-token runs plus 9 same-wall-time runs, docs/experiments.md). Prints a table and writes
``benchmarks/results/mtp_variants.json`` with the machine description. Not a test.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _machine import machine_info, write_result  # noqa: E402

from refmtp.backends import get_backend  # noqa: E402
from refmtp.config import preset  # noqa: E402
from refmtp.model import init_params  # noqa: E402
from refmtp.training.data import WindowSampler, load_corpus  # noqa: E402
from refmtp.training.optim import AdamW  # noqa: E402
from refmtp.training.step import train_step  # noqa: E402
from refmtp.verification.experiment_mtp import VARIANTS, variant_config  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=22)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=400, help="same-token steps per run (the plan's)")
    ap.add_argument("--out", default=str(HERE / "results" / "mtp_variants.json"))
    args = ap.parse_args(argv)

    bk = get_backend("numpy")
    corpus = load_corpus(None)
    runs = []
    for v in VARIANTS:
        cfg = variant_config(preset(args.preset), v).replace(vocab_size=256)
        runs.append((v, cfg, init_params(cfg, seed=0, dtype="float32"), AdamW(),
                     WindowSampler(corpus.train, args.seq, 1, bk)))
    times = {v.name: [] for v in VARIANTS}
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    for _ in range(args.rounds):
        for v, cfg, params, opt, sampler in runs:
            tokens = sampler.next(args.batch)  # (B, T+1)
            t0 = time.perf_counter()
            train_step(params, cfg, tokens, opt, 1e-3, 1.0)
            times[v.name].append(time.perf_counter() - t0)
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None
    median = {k: statistics.median(t[args.warmup:]) for k, t in times.items()}
    base = median[VARIANTS[0].name]
    ratio = {k: m / base for k, m in median.items()}
    units = 3 * (sum(ratio.values()) + (len(VARIANTS) - 1))  # in D=0 runs of --steps steps
    estimate_s = units * args.steps * base

    print(f"preset {args.preset}, B*T = {args.batch}*{args.seq}, {args.rounds} alternated rounds "
          f"(median after {args.warmup}), load average {load_start} -> {load_end}")
    print(f"{'variant':<14} {'step ms':>8} {'/ D=0':>6}")
    for k in median:
        print(f"{k:<14} {median[k] * 1000:8.1f} {ratio[k]:6.2f}")
    print(f"experiment estimate: {units:.1f} D=0 runs x {args.steps} steps = "
          f"{estimate_s / 60:.1f} min of training steps (plus evaluation and decoding)")
    result = {
        "benchmark": "mtp_variants", "date": datetime.now(timezone.utc).isoformat(),
        "preset": args.preset, "batch": args.batch, "seq": args.seq, "rounds": args.rounds,
        "warmup": args.warmup, "steps": args.steps,
        "step_s": {k: t for k, t in times.items()}, "median_step_s": median, "ratio": ratio,
        "estimate": {"units": units, "training_s": estimate_s},
        "load_average": {"start": load_start, "end": load_end},
        "machine": machine_info(),
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
