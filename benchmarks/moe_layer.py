"""Benchmark: one DeepSeekMoE layer, forward + backward, at the ``small`` preset.

    python benchmarks/moe_layer.py                       # numpy, B*T = 4*512 = 2048 tokens
    python benchmarks/moe_layer.py --backend cupy --repeats 20

For float32 and float64, times the plain array path (refmtp/model/moe.py ``*_ref`` dispatch functions)
against the kernel path (Numba on numpy, RawKernels on cupy), switched with
``refmtp.backends.set_kernels_enabled``. Each timing is the median of ``--repeats`` runs after
one warm-up run (which also compiles the kernels). The two paths must give the same output
(checked, bit-identical forward). Prints a table and writes ``benchmarks/results/moe_layer.json``
with the machine description. Not a test.
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

from refmtp.backends import get_backend, kernels_enabled, set_kernels_enabled  # noqa: E402
from refmtp.config import preset  # noqa: E402
from refmtp.model.moe import moe_backward, moe_forward  # noqa: E402
from refmtp.params import BIAS, moe_param_shapes  # noqa: E402


def _sync(bk):
    if bk.name == "cupy":
        bk._raw.cuda.get_current_stream().synchronize()


def make_inputs(bk, cfg, B, T, dtype, seed=0):
    rng = bk.rng(seed)
    p = {}
    for name, shape in sorted(moe_param_shapes(cfg).items()):
        if name == BIAS:
            p[name] = rng.normal(shape, std=0.01, dtype="float32")
        else:
            p[name] = rng.normal(shape, std=0.02, dtype=dtype)
    x = rng.normal((B, T, cfg.hidden_size), std=1.0, dtype=dtype)  # RMSNorm'ed input: unit scale
    dout = rng.normal((B, T, cfg.hidden_size), std=1.0, dtype=dtype)
    return x, p, dout


def time_path(bk, cfg, x, p, dout, kernels: bool, repeats: int):
    prev = set_kernels_enabled(kernels)
    try:
        out, aux, cache = moe_forward(x, p, cfg)  # warm-up (compiles Numba / CUDA kernels)
        moe_backward(dout, 1.0, cache)
        fwd, bwd = [], []
        for _ in range(repeats):
            _sync(bk)
            t0 = time.perf_counter()
            out, aux, cache = moe_forward(x, p, cfg)
            _sync(bk)
            t1 = time.perf_counter()
            moe_backward(dout, 1.0, cache)
            _sync(bk)
            t2 = time.perf_counter()
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    finally:
        set_kernels_enabled(prev)
    return out, statistics.median(fwd), statistics.median(bwd), min(a + b for a, b in zip(fwd, bwd))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="numpy", choices=("numpy", "cupy"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=str(HERE / "results" / "moe_layer.json"))
    args = ap.parse_args(argv)

    bk = get_backend(args.backend)
    cfg = preset("small")
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # shared machines: context
    B, T = args.batch, args.seq
    N = B * T
    rows = []
    for dtype in ("float32", "float64"):
        x, p, dout = make_inputs(bk, cfg, B, T, dtype)
        outs = {}
        for kernels in (False, True):
            out, tf, tb, best = time_path(bk, cfg, x, p, dout, kernels, args.repeats)
            outs[kernels] = bk.to_numpy(out)
            rows.append({"dtype": dtype, "path": "kernel" if kernels else "plain",
                         "forward_ms": tf * 1e3, "backward_ms": tb * 1e3,
                         "fwd_bwd_ms": (tf + tb) * 1e3, "best_fwd_bwd_ms": best * 1e3,
                         "tokens_per_s": N / (tf + tb)})
        identical = bool((outs[False] == outs[True]).all())
        rows[-1]["forward_identical_to_plain"] = identical
        if not identical:
            print(f"WARNING: {dtype} kernel path output differs from the plain path", file=sys.stderr)
    plain = {r["dtype"]: r["fwd_bwd_ms"] for r in rows if r["path"] == "plain"}
    for r in rows:
        r["speedup_vs_plain"] = plain[r["dtype"]] / r["fwd_bwd_ms"]

    print(f"MoE layer fwd+bwd, preset small (d={cfg.hidden_size}, E={cfg.n_routed_experts}, "
          f"K={cfg.num_experts_per_tok}, I={cfg.moe_intermediate_size}, shared={cfg.n_shared_experts}), "
          f"B*T = {B}*{T} = {N} tokens, backend {bk.name}, median of {args.repeats}")
    head = (f"{'dtype':8} {'path':7} {'fwd ms':>8} {'bwd ms':>8} {'total ms':>9} {'best ms':>8} "
            f"{'tokens/s':>10} {'speedup':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['dtype']:8} {r['path']:7} {r['forward_ms']:8.2f} {r['backward_ms']:8.2f} "
              f"{r['fwd_bwd_ms']:9.2f} {r['best_fwd_bwd_ms']:8.2f} {r['tokens_per_s']:10.0f} "
              f"{r['speedup_vs_plain']:7.2f}x")

    result = {
        "benchmark": "moe_layer",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backend": bk.name,
        "preset": "small",
        "config": {k: getattr(cfg, k) for k in ("hidden_size", "n_routed_experts", "num_experts_per_tok",
                                                "n_group", "topk_group", "moe_intermediate_size",
                                                "n_shared_experts", "scoring_func", "topk_method")},
        "balance_loss": cfg.refmtp.balance_loss,
        "batch": B, "seq": T, "tokens": N, "repeats": args.repeats,
        "timing": ("median over repeats after one warm-up; tokens_per_s = tokens / (fwd + bwd); "
                   "best_fwd_bwd_ms = fastest single fwd+bwd"),
        "kernels_enabled_by_default": kernels_enabled(),
        "load_average_1m": {"start": load_start,
                            "end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
        "machine": machine_info(),
        "results": rows,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
