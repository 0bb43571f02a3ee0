"""Benchmark: the machine's measured GEMM peak (float32 and float64), the CPU roofline.

    python benchmarks/gemm_peak.py                 # square n x n products, n = 256 .. 2048
    python benchmarks/gemm_peak.py --threads 1 --quick

For each dtype and size, ``a @ b`` (numpy, hence the BLAS numpy was built with) is run
back to back for at least ``--sample-s`` seconds per sample, ``--repeats`` samples after one
warm-up; GFLOP/s = 2 n^3 * products / time. The peak of a dtype is the largest MEDIAN GFLOP/s
over the sizes (the fastest sample is recorded too). The other
benchmarks call :func:`measure_peak` in their own process, so a training step is compared with
the peak measured in the same run, under the same load and thread count.

Also the home of two helpers every benchmark uses: :func:`blas_threads` (read / set the
OpenBLAS thread count at run time through the library numpy loaded) and :func:`run_context`
(load average, thread counts and the environment variables that change BLAS timings).
Writes ``benchmarks/results/gemm_peak.json``. Not a test.
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

from refmtp.backends import openblas  # noqa: E402

SIZES = (256, 512, 1024, 2048)
QUICK_SIZES = (256, 512, 1024)
ENV_KEYS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
            "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "REFMTP_KERNELS")


# -------------------------------------------------------------------------------------------
# BLAS threads
# -------------------------------------------------------------------------------------------
# read / set OpenBLAS's thread count at run time; the kernel family it chose (refmtp's own helpers)
blas_threads = openblas.threads
blas_kernel = openblas.kernels


def load_average():
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def run_context(threads: int | None) -> dict:
    """What changes timings on a shared machine: load, BLAS / torch threads, env variables."""
    return {
        "blas_threads": blas_threads(),
        "blas_kernel": blas_kernel(),
        "threads_requested": threads,
        "load_average_1_5_15m": load_average(),
        "env": {k: os.environ[k] for k in ENV_KEYS if k in os.environ},
    }


def add_common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--threads", type=int, default=None,
                    help="BLAS threads (default: leave OpenBLAS's own setting)")
    ap.add_argument("--quick", action="store_true", help="fewer repeats and points")


# -------------------------------------------------------------------------------------------
# GEMM peak
# -------------------------------------------------------------------------------------------
def gemm_sample(a, b, seconds: float) -> float:
    """GFLOP/s of back-to-back ``a @ b`` (square) for at least ``seconds``."""
    n = a.shape[0]
    count, t0 = 0, time.perf_counter()
    while True:
        a @ b
        count += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return count * 2.0 * n ** 3 / elapsed / 1e9


def measure_peak(dtypes=("float32", "float64"), sizes=SIZES, repeats: int = 7,
                 min_sample_s: float = 0.2) -> dict:
    """{dtype: {"peak_gflops": max median GFLOP/s, "best_gflops": fastest sample, "size": n,
    "by_size": {n: {"median_gflops", "best_gflops"}}}}.

    One sample = back-to-back products for at least ``min_sample_s`` seconds (total FLOPs / total
    time), so on a shared machine the peak sees the same preemption as a training step of
    similar length instead of the luck of a single millisecond product.
    """
    import numpy as np

    rng = np.random.default_rng(0)
    out = {}
    for dtype in dtypes:
        by_size = {}
        for n in sizes:
            a = rng.standard_normal((n, n)).astype(dtype)
            b = rng.standard_normal((n, n)).astype(dtype)
            a @ b  # warm-up
            rates = [gemm_sample(a, b, min_sample_s) for _ in range(repeats)]
            by_size[n] = {"median_gflops": statistics.median(rates), "best_gflops": max(rates)}
        best_n = max(by_size, key=lambda n: by_size[n]["median_gflops"])
        out[dtype] = {"peak_gflops": by_size[best_n]["median_gflops"],
                      "best_gflops": max(v["best_gflops"] for v in by_size.values()),
                      "size": best_n, "by_size": by_size}
    return out


def main(argv=None):
    from _machine import machine_info, write_result

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--sample-s", type=float, default=0.2)
    ap.add_argument("--out", default=str(HERE / "results" / "gemm_peak.json"))
    args = ap.parse_args(argv)
    blas_threads(args.threads)
    sizes = QUICK_SIZES if args.quick else SIZES
    repeats = args.repeats or (5 if args.quick else 9)
    ctx_start = run_context(args.threads)
    peaks = measure_peak(sizes=sizes, repeats=repeats, min_sample_s=args.sample_s)
    print(f"GEMM peak (numpy a @ b, square n x n), BLAS threads {blas_threads()}, kernels {blas_kernel()}, "
          f"median of {repeats}, load average {ctx_start['load_average_1_5_15m']}")
    head = f"{'dtype':8} " + " ".join(f"{'n=' + str(n):>9}" for n in sizes) + f" {'peak':>8} {'best':>8}"
    print(head)
    print("-" * len(head))
    for dtype, r in peaks.items():
        cells = " ".join(f"{r['by_size'][n]['median_gflops']:9.1f}" for n in sizes)
        print(f"{dtype:8} {cells} {r['peak_gflops']:8.1f} {r['best_gflops']:8.1f}   GFLOP/s")
    result = {
        "benchmark": "gemm_peak",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "timing": ("median GFLOP/s of repeats (each >= sample_s of back-to-back products) after one "
                   "warm-up; peak = max over sizes of the median"),
        "sizes": list(sizes), "repeats": repeats, "sample_s": args.sample_s,
        "context_start": ctx_start, "context_end": run_context(args.threads),
        "machine": machine_info(),
        "results": peaks,
    }
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
