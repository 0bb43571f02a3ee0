"""Benchmark: one training step (forward + backward + clip + AdamW + expert-bias update).

    python benchmarks/train_step.py                       # tiny and small, float32 and float64
    python benchmarks/train_step.py --threads 1 --presets small --repeats 9

For each preset, dtype and kernel setting (numpy alone, then with the Numba kernels, switched
with ``refmtp.backends.set_kernels_enabled``) the step of ``refmtp.training.trainer.Trainer`` is timed on a
fixed (B, T+1) batch of random byte tokens: median of ``--repeats`` steps after one warm-up
(which compiles the kernels). Achieved GFLOP/s = the analytic matmul FLOPs of the step
(:func:`refmtp.verification.flops.train_step_flops`, checked against the executed matmuls by
tests/test_flops.py) / the median step time, and ``pct_of_peak`` divides it by the float32 /
float64 GEMM peak measured in the same process and under the same load: after every timed step a
GEMM sample of the same duration runs at the size that was fastest in the up-front peak
measurement (benchmarks/gemm_peak.py), and the peak is the median of those samples (the
up-front and closing peak measurements are recorded too). ``--profile N`` adds a cProfile of
the small preset's float32 kernel step (top N functions by own time). Prints tables and writes
``benchmarks/results/train_step.json``.
Not a test.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from gemm_peak import (QUICK_SIZES, gemm_sample, add_common_args, blas_kernel, blas_threads, measure_peak,  # noqa: E402
                       run_context)


def make_batch(cfg, batch: int, seq: int, seed: int = 0):
    """(batch, seq+1) int64 random tokens in [0, vocab_size) (numpy)."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(batch, seq + 1)).astype(np.int64)


class StepRunner:
    """refmtp.training.step.train_step (the Trainer's step) without data loading, logging or
    checkpoints, timed by phase."""

    def __init__(self, cfg, params, grad_clip: float = 1.0, lr: float = 1e-3, grad_accum: int = 1,
                 workers: int = 1):
        from refmtp.training.optim import AdamW

        self.cfg, self.params, self.grad_clip, self.lr = cfg, params, grad_clip, lr
        self.grad_accum, self.workers = grad_accum, workers
        self.opt = AdamW()

    def step(self, tokens):
        from refmtp.training.step import train_step

        marks = [("start", time.perf_counter())]
        r = train_step(self.params, self.cfg, tokens, self.opt, self.lr, self.grad_clip,
                       grad_accum=self.grad_accum, workers=self.workers,
                       mark=lambda phase: marks.append((phase, time.perf_counter())))
        t = dict(marks)
        return {"forward": t["forward"] - t["start"], "backward": t["backward"] - t["forward"],
                "optimizer": t["update"] - t["backward"], "step": t["update"] - t["start"],
                "loss": r.losses["total"]}


def time_steps(cfg, dtype: str, batch: int, seq: int, repeats: int, kernels: bool, seed: int = 0,
               peak_size: int | None = None):
    """Median phase times (seconds) of ``repeats`` steps after one warm-up, plus the first loss.

    With ``peak_size`` n, every step is followed by a GEMM sample (n x n, as long as the step), and
    ``paired_peak_gflops`` is their median: the peak under the same load as the steps.
    """
    import numpy as np

    from refmtp.backends import get_backend, set_kernels_enabled
    from refmtp.model import init_params

    prev = set_kernels_enabled(kernels)
    rng = np.random.default_rng(1)
    if peak_size:
        a = rng.standard_normal((peak_size, peak_size)).astype(dtype)
        b = rng.standard_normal((peak_size, peak_size)).astype(dtype)
    peaks = []
    try:
        params = init_params(cfg, seed=seed, backend="numpy", dtype=dtype)
        tokens = get_backend("numpy").asarray(make_batch(cfg, batch, seq, seed))
        runner = StepRunner(cfg, params)
        first = runner.step(tokens)  # warm-up: compiles kernels, allocates AdamW state
        recs = []
        for _ in range(repeats):
            recs.append(runner.step(tokens))
            if peak_size:
                peaks.append(gemm_sample(a, b, max(0.05, recs[-1]["step"])))
    finally:
        set_kernels_enabled(prev)
    med = {k: statistics.median(r[k] for r in recs) for k in ("forward", "backward", "optimizer", "step")}
    med["best_step"] = min(r["step"] for r in recs)
    med["first_loss"] = first["loss"]
    med["paired_peak_gflops"] = statistics.median(peaks) if peaks else None
    return med


def profile_steps(cfg, dtype: str, batch: int, seq: int, steps: int = 3, top: int = 15) -> list:
    """cProfile of ``steps`` training steps (after a warm-up): the ``top`` functions by own time,
    as {"function", "calls", "own_ms_per_step", "cumulative_ms_per_step", "own_pct"}."""
    import cProfile
    import pstats

    from refmtp.backends import get_backend
    from refmtp.model import init_params

    runner = StepRunner(cfg, init_params(cfg, seed=0, dtype=dtype))
    tokens = get_backend("numpy").asarray(make_batch(cfg, batch, seq))
    runner.step(tokens)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        runner.step(tokens)
    prof.disable()
    st = pstats.Stats(prof)
    total = sum(v[2] for v in st.stats.values())
    rows = []
    for (file, line, func), (cc, nc, tt, ct, _) in sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:top]:
        where = f"{Path(file).parent.name}/{Path(file).name}:{line}" if line else file
        rows.append({"function": f"{where}({func})", "calls": nc // steps,
                     "own_ms_per_step": tt / steps * 1e3, "cumulative_ms_per_step": ct / steps * 1e3,
                     "own_pct": 100.0 * tt / total})
    return rows


def main(argv=None):
    from _machine import machine_info, write_result

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--profile", type=int, default=15,
                    help="cProfile the small (or last) preset's float32 kernel step: top N (0: off)")
    ap.add_argument("--out", default=str(HERE / "results" / "train_step.json"))
    args = ap.parse_args(argv)
    blas_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 7)

    from refmtp.config import preset
    from refmtp.verification.flops import model_flops

    ctx_start = run_context(args.threads)
    peak_before = measure_peak(args.dtypes, sizes=QUICK_SIZES, repeats=5)
    B, T = args.batch, args.seq
    rows = []
    for name in args.presets:
        cfg = preset(name)
        fl = model_flops(cfg, B, T)
        for dtype in args.dtypes:
            for kernels in (False, True):
                m = time_steps(cfg, dtype, B, T, repeats, kernels, peak_size=peak_before[dtype]["size"])
                rows.append({"preset": name, "dtype": dtype, "kernels": kernels, "batch": B, "seq": T,
                             "tokens": B * T, "forward_ms": m["forward"] * 1e3,
                             "backward_ms": m["backward"] * 1e3, "optimizer_ms": m["optimizer"] * 1e3,
                             "step_ms": m["step"] * 1e3, "best_step_ms": m["best_step"] * 1e3,
                             "tokens_per_s": B * T / m["step"], "first_loss": m["first_loss"],
                             "matmul_gflop_per_step": fl.total / 1e9,
                             "gflops": fl.total / m["step"] / 1e9,
                             "peak_gflops": m["paired_peak_gflops"]})
    peak_after = measure_peak(args.dtypes, sizes=QUICK_SIZES, repeats=5)
    for r in rows:
        r["pct_of_peak"] = 100.0 * r["gflops"] / r["peak_gflops"]

    print(f"Training step (fwd + bwd + clip + AdamW + bias update), B*T = {B}*{T} = {B * T} tokens, "
          f"BLAS threads {blas_threads()} ({blas_kernel()} kernels), median of {repeats}, load average "
          f"{ctx_start['load_average_1_5_15m']}")
    head = (f"{'preset':6} {'dtype':8} {'kernels':7} {'fwd ms':>8} {'bwd ms':>8} {'opt ms':>7} "
            f"{'step ms':>8} {'tokens/s':>9} {'GFLOP/s':>8} {'peak':>7} {'%peak':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['preset']:6} {r['dtype']:8} {'numba' if r['kernels'] else 'off':7} "
              f"{r['forward_ms']:8.1f} {r['backward_ms']:8.1f} {r['optimizer_ms']:7.1f} "
              f"{r['step_ms']:8.1f} {r['tokens_per_s']:9.0f} {r['gflops']:8.1f} "
              f"{r['peak_gflops']:7.1f} {r['pct_of_peak']:5.1f}%")
    prof = None
    if args.profile:
        pname = "small" if "small" in args.presets else args.presets[-1]
        prof = {"preset": pname, "dtype": "float32", "kernels": True,
                "top": profile_steps(preset(pname), "float32", B, T, top=args.profile)}
        print(f"\ncProfile, {pname} float32 with kernels, per step (own time = excluding callees):")
        print(f"{'own ms':>8} {'own %':>6} {'cum ms':>8} {'calls':>6}  function")
        for r in prof["top"]:
            print(f"{r['own_ms_per_step']:8.1f} {r['own_pct']:5.1f}% {r['cumulative_ms_per_step']:8.1f} "
                  f"{r['calls']:6d}  {r['function']}")
    result = {
        "benchmark": "train_step",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backend": "numpy",
        "batch": B, "seq": T, "repeats": repeats,
        "timing": ("median over repeats after one warm-up step; tokens_per_s = B*T / median step; "
                   "gflops = analytic matmul FLOPs (refmtp.verification.flops.train_step_flops) / median step; "
                   "peak_gflops = median of GEMM samples interleaved with the steps (same duration, "
                   "size of the best up-front peak); pct_of_peak = gflops / peak_gflops"),
        "flops": {name: {"forward": model_flops(preset(name), B, T).forward,
                         "step": model_flops(preset(name), B, T).total,
                         "parts_forward": model_flops(preset(name), B, T).parts}
                  for name in args.presets},
        "gemm_peak": {"before": peak_before, "after": peak_after},
        "context_start": ctx_start, "context_end": run_context(args.threads),
        "machine": machine_info(),
        "results": rows,
        "profile": prof,
    }
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
