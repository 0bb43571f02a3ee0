"""Benchmark: plain cached decoding next to this machine's memory roofline, and its Python share.

    python benchmarks/decode.py --threads 1                          # small (newest checkpoint) + decode-membound
    python benchmarks/decode.py --threads 1 --ckpt runs/x/checkpoint-0001500 --models small
    python benchmarks/decode.py --threads 1 --quick

Models (``--models``): ``small`` is the checkpoint ``--ckpt``, else the newest under ``--runs``
(default ``runs/`` of the repository), else the small preset with random weights (the JSON says
which); ``decode-membound`` is that preset (refmtp/config.py) with random weights (seed 0,
float32): never trained, which timing does not need. Speculative decoding: benchmarks/speculative.py.

For each model, in one process (docs/performance.md "Decoding" explains the columns):

* **time per token**: greedy plain cached decoding (``refmtp.inference.decode.generate``, absorbed
  latent cache, batch 1) of a ``--prompt-len`` token prompt (a held-out window of the
  checkpoint's data; a fixed byte pattern for random weights); per round ``(t(generate N) -
  t(generate 1)) / (N - 1)``, so the prefill is left out; the median over ``--rounds``.
* **bytes read per token**: every weight a decoded token reads (embedding row, per layer the MLA
  projections and norms, the dense MLP or the router + shared expert + K of the E routed
  experts, the final norm and lm_head) plus its latent-cache rows (``L * (Rkv + Dr) * S``
  numbers, S = the mean context over the decoded tokens).
* **memory bandwidth**, measured here just before: the best of a few ``numpy.copyto`` of a
  ``--copy-mib`` array (bytes read + bytes written / time); and the same at the size of the
  weights one token reads (what a cache-resident model can get).
* **roofline** = bytes read per token / bandwidth: the time per token if nothing but the weight
  and cache traffic cost anything.
* **no-Python estimate**: the same token's matrix products (every weight matrix it reads, with a
  1-row input of the right width, plus the attention products over the cache) timed back to
  back in one loop: arithmetic and memory traffic with one interpreter call per product.
  **Python overhead share** = 1 - no-Python estimate / time per token (everything else: op
  dispatch, small elementwise ops, bookkeeping).

Writes ``benchmarks/results/decode.json``. Not a test.
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from gemm_peak import add_common_args, blas_threads, run_context  # noqa: E402

REPO = HERE.parent
MODELS = ("small", "decode-membound")


def find_checkpoint(runs_dir: Path) -> Path | None:
    """Newest (by modification time) directory below ``runs_dir`` with config.json + model.safetensors."""
    if not runs_dir.is_dir():
        return None
    cands = [p.parent for p in runs_dir.rglob("config.json")
             if (p.parent / "model.safetensors").is_file() and ".tmp" not in p.parent.name]
    return max(cands, key=lambda p: (p / "model.safetensors").stat().st_mtime) if cands else None


def load_model(name: str, ckpt: str | None, runs: str):
    """(cfg, params, description, checkpoint path or None) of ``name``: a checkpoint for small
    when there is one, else the preset with random weights (seed 0, float32). The description
    names the checkpoint by its run and directory only (no machine paths in the results)."""
    from refmtp.checkpoint import load_checkpoint
    from refmtp.config import preset
    from refmtp.model import init_params

    if name == "small":
        path = Path(ckpt) if ckpt else find_checkpoint(Path(runs))
        if path is not None:
            cfg, params = load_checkpoint(path, backend="numpy")
            return cfg, params, f"checkpoint {path.parent.name}/{path.name}", path
    cfg = preset(name)
    params = init_params(cfg, seed=0, backend="numpy", dtype="float32")
    return cfg, params, f"preset {name}, random weights", None


def prompts_for(cfg, path, n: int, length: int) -> tuple[list, str]:
    """Held-out windows of the checkpoint's data (never trained on), or fixed byte patterns
    for random weights (``path`` None)."""
    from refmtp.training.data import heldout_windows, load_corpus

    if path is not None:
        import json

        run_json = Path(path).parent / "run.json"
        data = json.loads(run_json.read_text()).get("settings", {}).get("data") if run_json.is_file() else None
        corpus = load_corpus(data)
        where = re.sub(r" \(/[^)]*\)", "", corpus.description)  # no machine paths in the results
        return [[int(b) for b in w] for w in heldout_windows(corpus.heldout, length - 1, n)], where
    return [[(7 * i + 13 * j + 11) % cfg.vocab_size for i in range(length)] for j in range(n)], "fixed byte patterns"


# -------------------------------------------------------------------------------------------
# what one decoded token reads
# -------------------------------------------------------------------------------------------
def token_matrices(cfg, params, layers) -> list:
    """The weight matrices one decoded token multiplies by, in order (2-D arrays as stored):
    MLA projections per layer, the dense MLP or router + shared expert + K routed experts
    (experts 0..K-1 stand for the routed ones: equal sizes), then lm_head."""
    from refmtp.params import LM_HEAD, layer_prefix

    K = cfg.num_experts_per_tok
    mats = []
    for layer in layers:
        pre = layer_prefix(layer)
        att = [params[k] for k in sorted(params) if k.startswith(pre + "self_attn.")
               and params[k].ndim == 2]
        mats += att
        if cfg.is_moe_layer(layer):
            names = ["mlp.gate.weight"] + [f"mlp.shared_experts.{w}.weight" for w in
                                           ("gate_proj", "up_proj", "down_proj")]
            names += [f"mlp.experts.{e}.{w}.weight" for e in range(K)
                      for w in ("gate_proj", "up_proj", "down_proj")]
        else:
            names = [f"mlp.{w}.weight" for w in ("gate_proj", "up_proj", "down_proj")]
        mats += [params[pre + n] for n in names]
    mats.append(params[LM_HEAD])
    return mats


def bytes_per_token(cfg, params, layers, context: float) -> dict:
    """Bytes a decoded token reads: weights (the matrices of :func:`token_matrices`, the norms,
    one embedding row) and the latent cache rows of ``context`` earlier tokens."""
    from refmtp.params import EMBED, NORM, layer_prefix

    item = params[EMBED].dtype.itemsize
    weights = sum(int(m.nbytes) for m in token_matrices(cfg, params, layers))
    norms = sum(int(params[k].nbytes) for layer in layers for k in params
                if k.startswith(layer_prefix(layer)) and params[k].ndim == 1)
    weights += norms + int(params[NORM].nbytes) + cfg.hidden_size * item  # + one embedding row
    cache = int(len(layers) * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * context * item)
    return {"weights": weights, "cache": cache, "total": weights + cache}


def replay_seconds(cfg, params, layers, context: int, repeats: int) -> float:
    """No-Python estimate: the token's matrix products back to back (median of ``repeats``)."""
    mats = token_matrices(cfg, params, layers)
    dt = mats[0].dtype
    xs = [np.ones((1, m.shape[1]), dtype=dt) for m in mats]
    H, R = cfg.num_attention_heads, cfg.kv_lora_rank + cfg.qk_rope_head_dim
    lat = np.ones((len(layers), context, R), dtype=dt)  # the latent cache rows read per layer
    q = np.ones((H, R), dtype=dt)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for x, m in zip(xs, mats):
            x @ m.T
        for c in lat:
            (q @ c.T) @ c[:, : cfg.kv_lora_rank]  # scores over the cache, then p @ c_KV
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(nbytes: int, repeats: int) -> float:
    """Bytes/s of ``numpy.copyto`` between two ``nbytes`` arrays, read + write counted, best of ``repeats``."""
    n = max(int(nbytes) // 8, 1)
    src = np.ones(n, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


# -------------------------------------------------------------------------------------------
# the measurement
# -------------------------------------------------------------------------------------------
def time_per_token(dec, prompt, new_tokens: int, rounds: int) -> list:
    from refmtp.inference.decode import generate

    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        generate(dec, prompt, 1)
        t1 = time.perf_counter()
        generate(dec, prompt, new_tokens)
        t2 = time.perf_counter()
        out.append(((t2 - t1) - (t1 - t0)) / (new_tokens - 1))
    return out


def measure(name, args) -> dict:
    from refmtp.inference.decode import Decoder, generate

    cfg, params, where, path = load_model(name, args.ckpt, args.runs)
    dec = Decoder(params, cfg)
    new = args.max_new_tokens or (8 if name == "decode-membound" else 64) // (2 if args.quick else 1)
    rounds = args.rounds or (3 if args.quick else 5)
    prompt = prompts_for(cfg, path, 1, args.prompt_len)[0][0]  # a held-out window for a checkpoint
    generate(dec, prompt, 4)  # warm-up: kernel compilation, RoPE tables
    layers = list(range(cfg.num_hidden_layers))
    context = args.prompt_len + new / 2
    nbytes = bytes_per_token(cfg, params, layers, context)
    bw_dram = copy_bandwidth(args.copy_mib * 2 ** 20, 3)
    bw_ws = copy_bandwidth(nbytes["weights"], 7)
    replay = replay_seconds(cfg, params, layers, int(context), 7 if name == "small" else 3)
    per_token = time_per_token(dec, prompt, new, rounds)
    t = statistics.median(per_token)
    total_bytes = sum(int(v.nbytes) for v in params.values())
    return {
        "model": name, "source": where, "dtype": str(params["lm_head.weight"].dtype),
        "parameter_bytes": total_bytes, "prompt_len": args.prompt_len, "new_tokens": new,
        "rounds": rounds, "bytes_per_token": nbytes, "mean_context": context,
        "bandwidth_copy_large_GBps": bw_dram / 1e9, "copy_mib": args.copy_mib,
        "bandwidth_copy_working_set_GBps": bw_ws / 1e9,
        "roofline_ms_large": nbytes["total"] / bw_dram * 1e3,
        "roofline_ms_working_set": nbytes["total"] / bw_ws * 1e3,
        "ms_per_token": t * 1e3, "ms_per_token_rounds": [x * 1e3 for x in per_token],
        "no_python_estimate_ms": replay * 1e3,
        "python_overhead_share": max(0.0, 1.0 - replay / t),
        "times_roofline_large": t / (nbytes["total"] / bw_dram),
    }


def model_args(doc: str) -> argparse.ArgumentParser:
    """The options decode.py and speculative.py share: threads, models, checkpoint, prompts."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--ckpt", default=None, help="checkpoint of the small model (default: newest under --runs)")
    ap.add_argument("--runs", default=str(REPO / "runs"))
    ap.add_argument("--prompt-len", type=int, default=64)
    return ap


def main(argv=None):
    from _machine import machine_info, write_result

    ap = model_args(__doc__)
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="decoded tokens per round (default 64 small, 8 decode-membound)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 5, --quick 3)")
    ap.add_argument("--copy-mib", type=int, default=1024, help="array size of the bandwidth copy")
    ap.add_argument("--out", default=str(HERE / "results" / "decode.json"))
    args = ap.parse_args(argv)
    blas_threads(args.threads)
    ctx_start = run_context(args.threads)
    rows = [measure(name, args) for name in args.models]

    print(f"Plain cached decoding (greedy, absorbed cache, batch 1), BLAS threads {blas_threads()}, "
          f"load average {ctx_start['load_average_1_5_15m']}")
    head = (f"{'model':16} {'weights':>9} {'read/token':>10} {'GB/s big':>8} {'GB/s ws':>8} "
            f"{'roofline':>9} {'ms/token':>9} {'no-Python':>9} {'Python':>7} {'x roofline':>10}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:16} {r['parameter_bytes'] / 2**20:7.1f}MB {r['bytes_per_token']['total'] / 2**20:8.2f}MB "
              f"{r['bandwidth_copy_large_GBps']:8.1f} {r['bandwidth_copy_working_set_GBps']:8.1f} "
              f"{r['roofline_ms_large']:7.3f}ms {r['ms_per_token']:7.3f}ms {r['no_python_estimate_ms']:7.3f}ms "
              f"{100 * r['python_overhead_share']:6.1f}% {r['times_roofline_large']:9.1f}x")
    print("roofline = bytes read per token / bandwidth of a large copy; no-Python = the token's matrix "
          "products back to back; Python = 1 - no-Python / ms per token")
    result = {
        "benchmark": "decode",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "method": {
            "ms_per_token": "median over rounds of (t(generate N) - t(generate 1)) / (N - 1): prefill excluded",
            "bytes_per_token": "weights read by one decoded token (embedding row, MLA, dense MLP or router + "
                               "shared + K routed experts, norms, lm_head) + latent cache rows at the mean context",
            "bandwidth": "best numpy.copyto of a copy_mib array (read + write bytes / time), and of an array "
                         "the size of the weights one token reads (working set)",
            "no_python_estimate": "the token's matrix products back to back in one loop (median)",
            "python_overhead_share": "1 - no_python_estimate / ms_per_token",
        },
        "context_start": ctx_start, "context_end": run_context(args.threads),
        "machine": machine_info(),
        "results": rows,
    }
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
