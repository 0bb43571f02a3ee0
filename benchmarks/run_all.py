"""Run every refmtp benchmark and print a summary (docs/performance.md explains the numbers).

    python benchmarks/run_all.py                 # full run (tens of minutes on 2 busy cores)
    python benchmarks/run_all.py --quick         # fewer repeats, points and tokens (a few minutes)
    python benchmarks/run_all.py --threads 2 --torch-python /path/to/venv-with-torch/bin/python
    python benchmarks/run_all.py --only train_step scaling

Each benchmark runs in its own process (``<name>.py``, which also runs alone) and writes
``benchmarks/results/<name>.json`` with the machine (CPU model, cores, BLAS and its threads, GPU if
any), the versions, the load average before and after, and every figure. This script then
writes ``benchmarks/results/run_all.json`` (the headline numbers of the newest result of every
benchmark, whether run now or by an earlier ``--only`` call) and prints them.

``vs_torch`` needs torch and transformers, which refmtp never requires: it runs under
``--torch-python`` (default: ``$REFMTP_TORCH_PYTHON``, else this interpreter) and is reported as
skipped, with the reason, when that Python cannot import them.

BLAS kernels: when the environment pins OpenBLAS's kernel family (``OPENBLAS_CORETYPE``, e.g.
Haswell = AVX2 on an AVX-512 machine), ``gemm_peak``, ``train_step`` and ``vs_torch`` run a second
time without the pin (``OPENBLAS_CORETYPE`` and ``OPENBLAS_L2_SIZE`` both unset: OpenBLAS picks
its kernels for the CPU), writing ``<name>_auto-blas.json``;
``--blas-variants env`` turns that off.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ORDER = ("gemm_peak", "train_step", "vs_torch", "scaling", "decode", "speculative")
BLAS_VARIANT_BENCHMARKS = ("gemm_peak", "train_step", "vs_torch")
AUTO = "_auto-blas"


def _run(python: str, name: str, extra: list[str], env=None, label=None) -> tuple[int, float]:
    cmd = [python, str(HERE / f"{name}.py"), *extra]
    print(f"\n=== {label or name}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, cwd=str(HERE.parent), env=env)
    return rc, time.perf_counter() - t0


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summarize(names, suffix: str = "") -> dict:
    """Headline figures of each benchmark's JSON (what docs/performance.md quotes)."""
    s: dict = {}
    r = _load("gemm_peak" + suffix) if "gemm_peak" in names else None
    if r:
        s["blas_kernel"] = r["context_start"].get("blas_kernel")
        s["gemm_peak_gflops"] = {dt: v["peak_gflops"] for dt, v in r["results"].items()}
    r = _load("train_step" + suffix) if "train_step" in names else None
    if r:
        s["train_step"] = [{k: row[k] for k in ("preset", "dtype", "kernels", "tokens_per_s", "gflops",
                                                "pct_of_peak")} for row in r["results"]]
    r = _load("vs_torch" + suffix) if "vs_torch" in names else None
    if r and "results" in r:
        s["vs_torch"] = [{"preset": row["preset"], "dtype": row["dtype"], "threads": t["threads"],
                          "refmtp_tokens_per_s": t["refmtp"]["tokens_per_s"],
                          "torch_tokens_per_s": t["torch"]["tokens_per_s"],
                          "ratio": t["ratio_refmtp_over_torch"],
                          "max_loss_abs_diff": row["check"]["max_loss_abs_diff"],
                          "grad_max_rel_diff": row["check"]["grad_max_rel_diff"]}
                         for row in r["results"] for t in row["timings"]]
    elif r:
        s["vs_torch"] = {"skipped": r.get("skipped")}
    if suffix:
        return s
    r = _load("scaling") if "scaling" in names else None
    if r:
        s["scaling_exponents"] = {k: {"time": v["time_exponent"], "flops": v["flop_exponent"]}
                                  for k, v in r["sweeps"].items()}
    r = _load("decode") if "decode" in names else None
    if r and "results" in r:
        s["decode"] = [{k: row.get(k) for k in ("model", "ms_per_token", "roofline_ms_large",
                                                "python_overhead_share")} for row in r["results"]]
    r = _load("speculative") if "speculative" in names else None
    if r and "models" in r:
        s["speculative"] = [{"model": m["model"], **{k: row.get(k) for k in (
            "temperature", "runner", "speedup_median", "speedup_min", "speedup_max", "tau", "identical")}}
            for m in r["models"] for row in m["rows"] if row["K"]]
    return s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1,
                    help="BLAS threads of every benchmark (default 1: OpenBLAS threads spin badly on a "
                         "loaded machine); 0 leaves OpenBLAS's own default")
    ap.add_argument("--torch-threads", nargs="+", type=int, default=[1, 2],
                    help="thread counts of vs_torch (BLAS threads = torch.set_num_threads)")
    ap.add_argument("--torch-python", default=os.environ.get("REFMTP_TORCH_PYTHON", sys.executable))
    ap.add_argument("--only", nargs="+", choices=ORDER, default=list(ORDER))
    ap.add_argument("--blas-variants", nargs="+", choices=("env", "auto"),
                    default=["env", "auto"] if "OPENBLAS_CORETYPE" in os.environ else ["env"],
                    help="env: the environment as it is; auto: without OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE")
    args = ap.parse_args(argv)
    common = (["--quick"] if args.quick else [])
    status = {}
    for name in ORDER:
        if name not in args.only:
            continue
        extra = list(common)
        if name == "vs_torch":
            extra += ["--threads", *map(str, args.torch_threads)]
        elif args.threads:
            extra += ["--threads", str(args.threads)]
        python = args.torch_python if name == "vs_torch" else sys.executable
        variants = args.blas_variants if name in BLAS_VARIANT_BENCHMARKS else ["env"]
        for variant in variants:
            if variant == "env":
                rc, secs = _run(python, name, extra)
                status[name] = {"returncode": rc, "seconds": round(secs, 1)}
            else:
                # both pins together: with OPENBLAS_L2_SIZE alone left set, some CPUs keep other kernels
                env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
                out = ["--out", str(RESULTS / f"{name}{AUTO}.json")]
                rc, secs = _run(python, name, extra + out, env=env,
                                label=f"{name} (OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset)")
                status[name + AUTO] = {"returncode": rc, "seconds": round(secs, 1)}
    summary = summarize(ORDER)  # the newest result of every benchmark, run now or earlier
    if "auto" in args.blas_variants or any((RESULTS / f"{n}{AUTO}.json").is_file() for n in BLAS_VARIANT_BENCHMARKS):
        summary["auto_blas"] = summarize(BLAS_VARIANT_BENCHMARKS, AUTO)
    out = {"benchmark": "run_all", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "quick": args.quick, "threads": args.threads, "torch_threads": args.torch_threads,
           "blas_variants": args.blas_variants,
           "env_OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"), "runs": status,
           "summary": summary}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "run_all.json").write_text(json.dumps(out, indent=2) + "\n")

    print("\n=== summary")
    for name, st in status.items():
        print(f"{name:20} {'ok' if st['returncode'] == 0 else 'FAILED (rc ' + str(st['returncode']) + ')':>10} "
              f"{st['seconds']:8.1f} s")
    _print_summary(summary)
    if "auto_blas" in summary:
        print("\n--- again with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset (OpenBLAS's own kernel choice for this CPU)")
        _print_summary(summary["auto_blas"])
    print(f"wrote {RESULTS / 'run_all.json'}")
    return 0 if all(st["returncode"] == 0 for st in status.values()) else 1


def _print_summary(summary: dict) -> None:
    if "gemm_peak_gflops" in summary:
        print(f"GEMM peak GFLOP/s ({summary.get('blas_kernel')} kernels): "
              + ", ".join(f"{k} {v:.1f}" for k, v in summary["gemm_peak_gflops"].items()))
    for row in summary.get("train_step", []):
        print(f"train step {row['preset']:5} {row['dtype']:7} kernels={'on ' if row['kernels'] else 'off'} "
              f"{row['tokens_per_s']:8.0f} tokens/s {row['gflops']:6.1f} GFLOP/s {row['pct_of_peak']:5.1f}% of peak")
    vt = summary.get("vs_torch")
    if isinstance(vt, dict):
        print(f"vs torch: skipped ({vt['skipped']})")
    for row in vt or []:
        if isinstance(row, dict) and "ratio" in row:
            print(f"vs torch {row['preset']:5} {row['dtype']:7} {row['threads']} thr: refmtp/torch = "
                  f"{row['ratio']:.2f}x, |dloss| {row['max_loss_abs_diff']:.1e}, grad rel {row['grad_max_rel_diff']:.1e}")
    for k, v in summary.get("scaling_exponents", {}).items():
        print(f"scaling {k:8}: time ~ x^{v['time']:.2f} (FLOPs ~ x^{v['flops']:.2f})")
    for row in summary.get("decode", []):
        print(f"decode {row['model']:16} {row['ms_per_token']:8.3f} ms/token, roofline "
              f"{row['roofline_ms_large']:.3f} ms, Python {100 * row['python_overhead_share']:.0f}%")
    for row in summary.get("speculative", []):
        print(f"speculative {row['model']:16} T={row['temperature']:.1f} {row['runner']:16} "
              f"{row['speedup_median']:5.2f}x ({row['speedup_min']:.2f}-{row['speedup_max']:.2f}) "
              f"tau {row['tau']:.2f}{' same ' + row['identical'] if row.get('identical') else ''}")


if __name__ == "__main__":
    sys.exit(main())
