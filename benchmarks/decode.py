"""Benchmark: cached decoding (absorbed vs naive MLA) and self-speculative decoding, K = 1, 2, 3.

    python benchmarks/decode.py                          # newest checkpoint under runs/
    python benchmarks/decode.py --ckpt runs/x/checkpoint-0001500 --samples 8 --max-new-tokens 128

Checkpoint: ``--ckpt``, else the newest directory under ``--runs`` (default ``runs/`` of the
repository) holding a ``config.json`` and ``model.safetensors`` (e.g. ``runs/<run>/checkpoint-N``).
When there is none, a short run is trained here with ``refmtp.training.trainer.Trainer`` (``--train-steps``,
the default small preset on the Python-stdlib corpus) and the JSON says so (``"trained_here"``).

Prompts: ``--samples`` held-out windows of ``--prompt-len`` bytes (``refmtp.training.data.heldout_windows``,
never trained on). For every prompt the runners below generate ``--max-new-tokens`` tokens one
after the other (interleaved per prompt, so load drifts hit all alike), at each temperature:

* ``plain-absorbed`` / ``plain-naive``: ``refmtp.inference.decode.generate``, latent cache vs per-head K/V;
* ``spec-K`` (K = 1, 2, 3): ``refmtp.inference.speculative.speculative_generate`` with the lossless rule,
  MTP-chain drafts; drafts past the checkpoint's D modules reuse the last module (vLLM-style).

Reported: tokens/s (generated tokens / wall time, prefill included), speedup over
plain-absorbed, and for the speculative runners the acceptance rate per draft position
P(A >= i), the draft acceptance rate and tau = mean tokens committed per verification step
(bonus token included); at temperature 0 every speculative output must equal plain greedy
decoding (checked, ``identical_to_plain``). Writes ``benchmarks/results/decode.json``. Not a test.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from gemm_peak import add_common_args, blas_threads, run_context  # noqa: E402

REPO = HERE.parent


def find_checkpoint(runs_dir: Path) -> Path | None:
    """Newest (by modification time) directory below ``runs_dir`` with config.json + model.safetensors."""
    if not runs_dir.is_dir():
        return None
    cands = [p.parent for p in runs_dir.rglob("config.json")
             if (p.parent / "model.safetensors").is_file() and ".tmp" not in p.parent.name]
    return max(cands, key=lambda p: (p / "model.safetensors").stat().st_mtime) if cands else None


def train_here(out_dir: Path, steps: int) -> Path:
    from refmtp.config import preset
    from refmtp.training.trainer import Trainer, TrainSettings

    settings = TrainSettings(preset="small", steps=steps, eval_every=0, checkpoint_every=0,
                             log_every=max(1, steps // 10))
    result = Trainer.new(settings, preset("small"), out_dir).run()
    return result.checkpoint


def main(argv=None):
    from _machine import machine_info, write_result

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--ckpt", default=None, help="checkpoint directory (default: newest under --runs)")
    ap.add_argument("--runs", default=str(REPO / "runs"))
    ap.add_argument("--train-dir", default="/tmp/refmtp-bench-decode-run",
                    help="where to train a short run when no checkpoint is found")
    ap.add_argument("--train-steps", type=int, default=600)
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--ks", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--temperatures", nargs="+", type=float, default=None)
    ap.add_argument("--dtype", default=None, help="decode dtype (default: the checkpoint's)")
    ap.add_argument("--out", default=str(HERE / "results" / "decode.json"))
    args = ap.parse_args(argv)
    blas_threads(args.threads)
    samples = args.samples or (3 if args.quick else 8)
    max_new = args.max_new_tokens or (48 if args.quick else 128)
    temps = args.temperatures or ([0.0] if args.quick else [0.0, 1.0])

    from refmtp.checkpoint import load_checkpoint
    from refmtp.training.data import heldout_windows, load_corpus
    from refmtp.inference.decode import Decoder, generate
    from refmtp.inference.speculative import spec_metrics, speculative_generate

    ctx_start = run_context(args.threads)
    trained_here = None
    ckpt = Path(args.ckpt) if args.ckpt else find_checkpoint(Path(args.runs))
    if ckpt is None:
        tdir = Path(args.train_dir)
        ckpt = find_checkpoint(tdir)
        if ckpt is None:
            print(f"no checkpoint under {args.runs}: training {args.train_steps} steps into {tdir}")
            t0 = time.perf_counter()
            ckpt = train_here(tdir, args.train_steps)
            trained_here = {"steps": args.train_steps, "dir": str(tdir),
                            "seconds": time.perf_counter() - t0}
        else:
            steps = json.loads((ckpt.parent / "run.json").read_text())["settings"]["steps"]
            trained_here = {"steps": steps, "dir": str(tdir),
                            "note": "trained by an earlier run of this benchmark, reused"}
    cfg, params = load_checkpoint(ckpt, backend="numpy", dtype=args.dtype)
    dec = Decoder(params, cfg)
    run_json = ckpt.parent / "run.json"
    data = json.loads(run_json.read_text()).get("settings", {}).get("data") if run_json.is_file() else None
    corpus = load_corpus(data)
    prompts = [[int(b) for b in w] for w in heldout_windows(corpus.heldout, args.prompt_len - 1, samples)]
    D = cfg.D

    runners = [("plain-absorbed", None, "absorbed"), ("plain-naive", None, "naive")]
    runners += [(f"spec-K{k}", k, "absorbed") for k in args.ks]
    rows = []
    for name, k, mode in runners:  # warm-up (Numba kernels, caches), untimed
        if k is None:
            generate(dec, prompts[0], 8, mode=mode)
        else:
            speculative_generate(dec, prompts[0], 8, k=k, reuse_last_module=k > D, mode=mode)
    for temp in temps:
        outs = {name: [] for name, _, _ in runners}
        secs = {name: 0.0 for name, _, _ in runners}
        steps = {name: [] for name, _, _ in runners}
        for i, prompt in enumerate(prompts):
            for name, k, mode in runners:
                t0 = time.perf_counter()
                if k is None:
                    toks = generate(dec, prompt, max_new, temperature=temp, seed=i, mode=mode)
                else:
                    res = speculative_generate(dec, prompt, max_new, k=k, temperature=temp, seed=i,
                                               reuse_last_module=k > D, mode=mode)
                    toks = res.tokens
                    steps[name].extend(res.steps)
                secs[name] += time.perf_counter() - t0
                outs[name].append(toks)
        base = sum(len(t) for t in outs["plain-absorbed"]) / secs["plain-absorbed"]
        for name, k, mode in runners:
            n_tok = sum(len(t) for t in outs[name])
            row = {"temperature": temp, "runner": name, "mode": mode, "K": k or 0,
                   "reuse_last_module": bool(k and k > D), "tokens": n_tok, "seconds": secs[name],
                   "tokens_per_s": n_tok / secs[name], "speedup_vs_plain_absorbed": n_tok / secs[name] / base}
            if k is not None:
                m = spec_metrics(steps[name], k)
                row.update({"tau": m["tau"], "draft_acceptance_rate": m["draft_acceptance_rate"],
                            "acceptance_per_position": m["acceptance_per_position"],
                            "verification_steps": m["steps"]})
            if temp == 0:
                row["identical_to_plain"] = sum(a == b for a, b in zip(outs[name], outs["plain-absorbed"]))
            rows.append(row)

    print(f"Decoding, checkpoint {ckpt} (D={D}, {cfg.num_hidden_layers} layers, d={cfg.hidden_size}, "
          f"{params['lm_head.weight'].dtype}), {samples} prompts x {max_new} new tokens, BLAS threads "
          f"{blas_threads()}, load average {ctx_start['load_average_1_5_15m']}")
    head = (f"{'temp':>4} {'runner':15} {'tokens/s':>9} {'speedup':>8} {'tau':>5} {'accept':>7} "
            f"{'P(A>=i), i=1..K':>20} {'same':>5}")
    print(head)
    print("-" * len(head))
    for r in rows:
        acc = ", ".join(f"{a:.2f}" for a in r.get("acceptance_per_position", []) if a is not None)
        print(f"{r['temperature']:4.1f} {r['runner']:15} {r['tokens_per_s']:9.1f} "
              f"{r['speedup_vs_plain_absorbed']:7.2f}x "
              f"{(format(r['tau'], '5.2f') if 'tau' in r else '-'):>5} "
              f"{(format(r['draft_acceptance_rate'], '7.2f') if 'tau' in r else '-'):>7} {acc:>20} "
              f"{(str(r['identical_to_plain']) + '/' + str(samples)) if 'identical_to_plain' in r else '-':>5}")
    result = {
        "benchmark": "decode",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": str(ckpt), "trained_here": trained_here,
        "model": {"D": D, "layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
                  "mtp_kind": cfg.refmtp.mtp_kind, "dtype": str(params["lm_head.weight"].dtype)},
        "samples": samples, "prompt_len": args.prompt_len, "max_new_tokens": max_new,
        "data": corpus.description,
        "timing": ("wall time per runner summed over prompts (prefill included), runners interleaved "
                   "per prompt; tau and acceptance pooled over all verification steps"),
        "context_start": ctx_start, "context_end": run_context(args.threads),
        "machine": machine_info(),
        "results": rows,
    }
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
