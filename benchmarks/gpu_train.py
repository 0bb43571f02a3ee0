"""Benchmark: one training step on the GPU (cupy backend), plain CuPy vs CuPy with the RawKernels.

    python benchmarks/gpu_train.py                       # small and gpu-large, float32
    python benchmarks/gpu_train.py --quick               # fewer repeats (a few minutes)
    python benchmarks/gpu_train.py --presets small --batch 64 --seq 256 --repeats 9

For each preset and kernel setting (``refmtp.backends.set_kernels_enabled(False)``: plain CuPy
array code; ``True``: the RawKernels of backends/*.cu for RoPE, fused cross-entropy and MoE
dispatch/combine) the step of ``refmtp.training.trainer.Trainer`` (forward, the host read of the losses,
backward, global-norm clip, AdamW, expert-bias update) is run on a fixed (B, T+1) batch of
random tokens: ``--warmup`` steps first (NVRTC compiles the kernels, cuBLAS and the memory pool
warm up), then ``--repeats`` timed steps, each bracketed by CUDA events on the current stream and
ended by a device synchronize; the MEDIAN is reported. Both settings start from the same
initial parameters.

* tokens/s = B*T / median step time (T main positions; the MTP depths reuse the same window).
* achieved TFLOP/s = the analytic matmul FLOPs of the step (:func:`refmtp.verification.flops.train_step_flops`,
  checked against the executed matmuls by tests/test_flops.py; elementwise work is not counted)
  / median step time; ``pct_of_gemm_peak`` divides it by the float32 cuBLAS GEMM rate measured
  in the same process (square 8192 products; TF32 only if CuPy was told to use it, see
  ``CUPY_TF32`` in the output).

Presets: ``small`` is the default training model (refmtp.config.preset("small")) at its
training batch (16 x 128); ``gpu-large`` (:data:`GPU_LARGE`, defined here) is a model sized to
fill one 80 GB GPU: hidden 1536, 8 layers + 1 MTP module, 16 heads, 16 routed experts (top-4)
plus a shared one, vocabulary 32768, batch 8 x 1024 tokens. When a step runs out of GPU
memory the batch is halved (recorded as ``batch`` and ``oom_halvings``).

float32 only by default (``--dtypes float32 float64`` adds float64); bf16 is not supported by
refmtp. Writes ``benchmarks/results/gpu_train.json`` with the GPU name, driver and runtime
(benchmarks/_machine.py). Needs cupy and a GPU: without them it prints one line and exits 2.
Not a test.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# A model that fills one 80 GB GPU in float32 (~440M parameters, ~13 TFLOP per step at 8 x 1024
# tokens). Field names as refmtp.config.ModelConfig / DeepSeek-V3's config.json.
GPU_LARGE = dict(
    vocab_size=32768, hidden_size=1536, intermediate_size=4096, moe_intermediate_size=512,
    num_hidden_layers=8, num_nextn_predict_layers=1, num_attention_heads=16,
    q_lora_rank=768, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
    n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
    routed_scaling_factor=2.5, first_k_dense_replace=1, max_position_embeddings=4096,
)
# (batch, seq) per preset: small at its training settings, gpu-large large enough to be GEMM-bound
DEFAULT_SHAPES = {"small": (16, 128), "gpu-large": (8, 1024)}


def model_config(name: str):
    from refmtp.config import ModelConfig, preset

    if name == "gpu-large":
        return ModelConfig(**GPU_LARGE).validate()
    return preset(name)


def unavailable() -> str | None:
    """None when the cupy backend works, else the one-line reason."""
    from refmtp.backends import BackendUnavailable, get_backend

    try:
        get_backend("cupy")
    except BackendUnavailable as exc:
        return str(exc)
    return None


class StepRunner:
    """refmtp.training.step.train_step (the Trainer's step) without data loading, logging or
    checkpoints, timed by phase with CUDA events."""

    def __init__(self, cfg, params, grad_clip: float = 1.0, lr: float = 1e-3):
        from refmtp.training.optim import AdamW

        self.cfg, self.params, self.grad_clip, self.lr = cfg, params, grad_clip, lr
        self.opt = AdamW()

    def step(self, tokens):
        import cupy

        from refmtp.training.step import train_step

        ev = {"start": cupy.cuda.Event()}

        def mark(phase):
            ev[phase] = cupy.cuda.Event()
            ev[phase].record()

        t0 = time.perf_counter()
        ev["start"].record()
        r = train_step(self.params, self.cfg, tokens, self.opt, self.lr, self.grad_clip, mark=mark)
        ev["update"].synchronize()
        wall = time.perf_counter() - t0
        names = ["start", "forward", "backward", "update"]
        ms = [cupy.cuda.get_elapsed_time(ev[a], ev[b]) for a, b in zip(names, names[1:])]
        return {"forward": ms[0] / 1e3, "backward": ms[1] / 1e3, "optimizer": ms[2] / 1e3,
                "step": sum(ms) / 1e3, "wall": wall, "loss": r.losses["total"], "grad_norm": r.grad_norm}


def _free_gpu_memory():
    import cupy

    gc.collect()
    cupy.get_default_memory_pool().free_all_blocks()
    cupy.get_default_pinned_memory_pool().free_all_blocks()


def time_setting(cfg, base_params: dict, tokens, kernels: bool, warmup: int, repeats: int) -> dict:
    """Median phase times (seconds) of ``repeats`` steps after ``warmup``, from a copy of
    ``base_params``, with the kernel table on or off."""
    import cupy

    from refmtp.backends import set_kernels_enabled

    prev = set_kernels_enabled(kernels)
    pool = cupy.get_default_memory_pool()
    try:
        params = {k: v.copy() for k, v in base_params.items()}
        runner = StepRunner(cfg, params)
        first = None
        for _ in range(warmup):
            r = runner.step(tokens)
            first = first or r
        recs = [runner.step(tokens) for _ in range(repeats)]
        first = first or recs[0]
        pool_bytes = pool.total_bytes()
    finally:
        set_kernels_enabled(prev)
        runner = params = None  # noqa: F841  (release the AdamW state before the next setting)
        _free_gpu_memory()
    med = {k: statistics.median(r[k] for r in recs) for k in ("forward", "backward", "optimizer", "step", "wall")}
    med["best_step"] = min(r["step"] for r in recs)
    med["first_loss"] = first["loss"]
    med["first_grad_norm"] = first["grad_norm"]
    med["pool_bytes"] = pool_bytes
    return med


def gemm_peak_tflops(dtype: str = "float32", n: int = 8192, repeats: int = 10) -> dict:
    """cuBLAS GEMM rate of (n, n) @ (n, n) in ``dtype``: median and best TFLOP/s over repeats."""
    import cupy

    a = cupy.random.default_rng(0).standard_normal((n, n), dtype=cupy.float64).astype(dtype)
    b = a.T.copy()
    c = a @ b  # warm-up (cuBLAS handle, workspace)
    times = []
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    for _ in range(repeats):
        start.record()
        c = a @ b
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end) / 1e3)
    del a, b, c
    _free_gpu_memory()
    flops = 2.0 * n ** 3
    return {"dtype": dtype, "n": n, "median_tflops": flops / statistics.median(times) / 1e12,
            "best_tflops": flops / min(times) / 1e12}


def run_preset(name: str, dtype: str, batch: int, seq: int, warmup: int, repeats: int,
               seed: int = 0) -> list[dict]:
    """Both kernel settings of one preset and dtype; halves the batch on out-of-memory."""
    import cupy
    import numpy as np

    from refmtp.backends import get_backend
    from refmtp.verification.flops import model_flops
    from refmtp.params import is_bias
    from refmtp.model import init_params

    bk = get_backend("cupy")
    cfg = model_config(name)
    params = init_params(cfg, seed=seed, backend=bk, dtype=dtype)
    n_params = sum(int(v.size) for k, v in params.items() if not is_bias(k))
    halvings = 0
    while True:
        tokens = bk.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(batch, seq + 1)),
                            dtype="int64")  # (B, T+1)
        rows, oom = [], False
        try:
            for kernels in (False, True):
                rows.append((kernels, time_setting(cfg, params, tokens, kernels, warmup, repeats)))
        except cupy.cuda.memory.OutOfMemoryError:
            if batch == 1:
                raise
            oom = True
        if not oom:
            break
        _free_gpu_memory()  # outside the except block: the traceback no longer pins the caches
        batch //= 2
        halvings += 1
        print(f"  {name} {dtype}: out of GPU memory, retrying with batch {batch}", flush=True)
    fl = model_flops(cfg, batch, seq)
    out = []
    for kernels, m in rows:
        tokens_per_step = batch * seq
        out.append({
            "preset": name, "dtype": dtype, "kernels": kernels, "batch": batch, "seq": seq,
            "tokens": tokens_per_step, "oom_halvings": halvings, "n_params": n_params,
            "forward_ms": m["forward"] * 1e3, "backward_ms": m["backward"] * 1e3,
            "optimizer_ms": m["optimizer"] * 1e3, "step_ms": m["step"] * 1e3,
            "wall_ms": m["wall"] * 1e3, "best_step_ms": m["best_step"] * 1e3,
            "tokens_per_s": tokens_per_step / m["step"],
            "matmul_tflop_per_step": fl.total / 1e12,
            "tflops": fl.total / m["step"] / 1e12,
            "first_loss": m["first_loss"], "first_grad_norm": m["first_grad_norm"],
            "memory_pool_gib": m["pool_bytes"] / 2 ** 30,
        })
    plain, fast = out
    fast["speedup_vs_plain"] = plain["step_ms"] / fast["step_ms"]
    # the two settings compute the same step: their first losses agree to float rounding
    fast["first_loss_rel_diff_vs_plain"] = abs(fast["first_loss"] - plain["first_loss"]) / abs(plain["first_loss"])
    del params
    _free_gpu_memory()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["small", "gpu-large"],
                    choices=["tiny", "small", "gpu-large"])
    ap.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "float64"])
    ap.add_argument("--batch", type=int, default=None, help="override every preset's batch")
    ap.add_argument("--seq", type=int, default=None, help="override every preset's sequence length")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=None, help="timed steps (default 7, --quick 3)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--gemm-n", type=int, default=8192, help="size of the cuBLAS GEMM peak probe")
    ap.add_argument("--out", default=str(HERE / "results" / "gpu_train.json"))
    args = ap.parse_args(argv)

    reason = unavailable()
    if reason is not None:
        print(f"gpu_train: no GPU benchmark: {reason}", file=sys.stderr)
        return 2

    import cupy

    from _machine import machine_info, write_result
    from refmtp.backends import get_backend
    from refmtp.verification.flops import model_flops

    repeats = args.repeats or (3 if args.quick else 7)
    bk = get_backend("cupy")
    free, total = cupy.cuda.runtime.memGetInfo()
    gpu = {**bk.describe(), "memory_total_gib": total / 2 ** 30, "memory_free_gib_at_start": free / 2 ** 30}
    print(f"GPU: {gpu['gpu']} (driver {gpu['driver']}, CUDA runtime {gpu['runtime']}, "
          f"cupy {gpu['cupy']}, {gpu['memory_total_gib']:.0f} GiB)", flush=True)
    peaks = {dt: gemm_peak_tflops(dt, n=args.gemm_n) for dt in args.dtypes}
    rows, presets = [], {}
    for name in args.presets:
        B, T = DEFAULT_SHAPES.get(name, (16, 128))
        B, T = args.batch or B, args.seq or T
        cfg = model_config(name)
        for dtype in args.dtypes:
            print(f"  {name} {dtype} B={B} T={T} ...", flush=True)
            for r in run_preset(name, dtype, B, T, args.warmup, repeats):
                r["pct_of_gemm_peak"] = 100.0 * r["tflops"] / peaks[dtype]["median_tflops"]
                rows.append(r)
        ran = rows[-1]  # the batch actually used (after any out-of-memory halving)
        presets[name] = {"config": cfg.to_dict(),
                         "forward_flops_parts": model_flops(cfg, ran["batch"], ran["seq"]).parts}

    print(f"Training step on {gpu['gpu']} (forward + bwd + clip + AdamW + bias update), median of "
          f"{repeats} after {args.warmup} warm-up steps, CUDA events")
    head = (f"{'preset':9} {'dtype':7} {'kernels':7} {'B x T':>10} {'fwd ms':>8} {'bwd ms':>8} "
            f"{'opt ms':>7} {'step ms':>8} {'tokens/s':>10} {'TFLOP/s':>8} {'%gemm':>6} {'GiB':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['preset']:9} {r['dtype']:7} {'cuda' if r['kernels'] else 'off':7} "
              f"{str(r['batch']) + 'x' + str(r['seq']):>10} {r['forward_ms']:8.1f} {r['backward_ms']:8.1f} "
              f"{r['optimizer_ms']:7.1f} {r['step_ms']:8.1f} {r['tokens_per_s']:10.0f} {r['tflops']:8.2f} "
              f"{r['pct_of_gemm_peak']:5.1f}% {r['memory_pool_gib']:6.1f}")
    for dt, pk in peaks.items():
        print(f"cuBLAS {dt} GEMM {pk['n']}^3: {pk['median_tflops']:.1f} TFLOP/s (median)")
    result = {
        "benchmark": "gpu_train",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backend": "cupy",
        "gpu": gpu,
        "warmup": args.warmup, "repeats": repeats,
        "timing": ("CUDA events around forward (incl. the host read of the loss), backward and "
                   "clip + AdamW + bias update, device-synchronized after every step; median over "
                   "repeats after the warm-up steps; tokens_per_s = B*T / median step; tflops = analytic "
                   "matmul FLOPs (refmtp.verification.flops.train_step_flops) / median step; pct_of_gemm_peak "
                   "against the cuBLAS GEMM rate measured in this process; wall_ms = host clock"),
        "flops_source": "refmtp.verification.flops.train_step_flops",
        "gemm_peak": peaks,
        "env": {k: os.environ[k] for k in ("CUPY_TF32", "CUPY_ACCELERATORS", "REFMTP_KERNELS",
                                            "CUDA_VISIBLE_DEVICES") if k in os.environ},
        "presets": presets,
        "machine": machine_info(),
        "results": rows,
    }
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
