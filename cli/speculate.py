"""``refmtp speculate``: measure self-speculative decoding on held-out prompts.

    refmtp speculate --ckpt runs/x --k 2 --reuse --samples 8 --json spec.json

For ``--samples`` held-out windows of the data (``--data``, default: the run's own data when
the checkpoint sits in a training run directory, else the Python stdlib corpus; the held-out
split is never trained on) it generates ``--max-new-tokens`` tokens after a ``--prompt-len``
byte prompt twice in the same process: plain cached decoding, then speculative decoding with K
drafts per step. It reports (docs/speculative-decoding.md §5), pooled over every step of
every sample: the acceptance rate per draft position P(A >= i), the mean tokens per
verification step tau (bonus / residual token included), the draft acceptance rate, decode
throughput and the wall-clock speedup over plain decoding, and how many samples came out
identical to plain decoding (all of them at temperature 0 for the lossless rule).

Causal MTP models get one method, "mtp" (MTP chain drafts, RNG-v1 lossless rule). Models with
parallel heads (mtp_kind "parallel") get "heads" (head drafts, lossless rule) and the two
baselines "blockwise" (Stern et al.: longest prefix equal to the greedy choice) and "typical"
(Medusa typical acceptance, lossy; at temperature 0 its test uses p at temperature 1).

Exit codes: 2 for input the user can fix (checkpoint, data, K, sizes), 1 for other errors.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import click

from refmtp.cli.common import check_output_file
from refmtp.cli.generate import InputError, check_k_option, check_temperature, load_decoder


def _run_data(ckpt: Path):
    """The ``--data`` of the training run that wrote ``ckpt`` (None: the default corpus)."""
    run = ckpt.parent / "run.json"
    if not run.is_file():
        return None
    try:
        return json.loads(run.read_text()).get("settings", {}).get("data")
    except (OSError, ValueError):
        return None


def _prompts(data, samples: int, prompt_len: int):
    from refmtp.training.data import heldout_windows, load_corpus

    try:
        corpus = load_corpus(data)
        windows = heldout_windows(corpus.heldout, prompt_len - 1, samples)  # (n, prompt_len) uint8
    except ValueError as exc:
        raise InputError(f"{exc} (data: {data or 'python-stdlib'}); lower --prompt-len") from None
    return [[int(b) for b in w] for w in windows], corpus.description


def _methods(cfg):
    if cfg.refmtp.mtp_kind == "parallel":
        return [("heads", "lossless", "parallel heads"), ("blockwise", "blockwise", "parallel heads"),
                ("typical", "typical", "parallel heads")]
    return [("mtp", "lossless", "MTP chain")]


def _measure(runners, items):
    """Run every runner on each item, interleaved per item (so load drifts hit all alike);
    return per runner (outputs, seconds summed)."""
    outs = [[] for _ in runners]
    secs = [0.0 for _ in runners]
    for item in items:
        for i, run in enumerate(runners):
            t0 = time.perf_counter()
            outs[i].append(run(item))
            secs[i] += time.perf_counter() - t0
    return list(zip(outs, secs))


@click.command()
@click.option("--ckpt", required=True, help="Checkpoint directory (or a training run directory).")
@click.option("--data", type=click.Path(), default=None,
              help="Text file or directory for the held-out prompts (default: the run's data).")
@click.option("--k", "k", type=int, default=None, help="Drafts per step (default: D, the number of modules).")
@click.option("--reuse", is_flag=True, help="Reuse the last MTP module for drafts past D (K > D).")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--sample-drafts", is_flag=True, help="Sample drafts from q at --temperature (default argmax).")
@click.option("--samples", type=int, default=8, show_default=True, help="Held-out prompts.")
@click.option("--prompt-len", type=int, default=64, show_default=True, help="Prompt bytes.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True, help="Tokens per sample.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of sample i is seed + i.")
@click.option("--mode", type=click.Choice(["absorbed", "naive"]), default="absorbed", show_default=True)
@click.option("--backend", type=click.Choice(["numpy", "cupy"]), default="numpy", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default=None,
              help="Compute dtype (default: the checkpoint's).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the report as JSON to this file.")
def speculate(ckpt, data, k, reuse, temperature, sample_drafts, samples, prompt_len, max_new_tokens,
              seed, mode, backend, dtype, json_path):
    """Acceptance per draft position, tokens per step and speedup of self-speculative decoding."""
    from refmtp.inference.decode import check_budget
    from refmtp.inference.decode import generate as plain_generate
    from refmtp.inference.speculative import spec_metrics, speculative_generate

    for name, value, low in (("--samples", samples, 1), ("--prompt-len", prompt_len, 2),
                             ("--max-new-tokens", max_new_tokens, 1)):
        if value < low:
            raise InputError(f"{name} {value} must be >= {low}")
    check_temperature(temperature)
    if json_path:
        check_output_file(json_path, "--json")  # before the measurement, not after
    dec, ckpt_dir = load_decoder(ckpt, backend, dtype)
    cfg = dec.cfg
    K = cfg.D if k is None else k
    if K < 1:
        raise InputError(f"--k {K} must be >= 1 (the number of drafts per step)")
    check_k_option(dec, K, reuse)
    try:
        check_budget(max_new_tokens, prompt_len, cfg, extra=K)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    data = data if data is not None else _run_data(ckpt_dir)
    prompts, where = _prompts(data, samples, prompt_len)
    if max(max(p) for p in prompts) >= cfg.vocab_size:
        raise InputError(f"the data has bytes >= vocab_size={cfg.vocab_size}: use a byte-level model")

    def plain(i_p):
        i, p = i_p
        return plain_generate(dec, p, max_new_tokens, temperature=temperature, seed=seed + i, mode=mode)

    def spec(rule):
        def run(i_p):
            i, p = i_p
            return speculative_generate(dec, p, max_new_tokens, k=K, temperature=temperature,
                                        seed=seed + i, rule=rule, sample_drafts=sample_drafts,
                                        reuse_last_module=reuse, mode=mode)
        return run

    items = list(enumerate(prompts))
    try:
        plain(items[0])  # warm-up: kernel compilation and caches, outside the timings
        for _, rule, _ in _methods(cfg):
            spec(rule)(items[0])
        methods = _methods(cfg)
        measured = _measure([plain] + [spec(rule) for _, rule, _ in methods], items)
        plain_out, plain_s = measured[0]
        n_tokens = sum(len(o) for o in plain_out)
        report = {
            "ckpt": str(ckpt_dir), "data": where, "mtp_kind": cfg.refmtp.mtp_kind, "D": cfg.D,
            "k": K, "reuse_last_module": reuse, "temperature": temperature,
            "sample_drafts": sample_drafts, "samples": len(prompts), "prompt_len": prompt_len,
            "max_new_tokens": max_new_tokens, "seed": seed, "mode": mode, "backend": backend,
            "dtype": str(dec.dtype),
            "plain": {"seconds": plain_s, "tokens": n_tokens, "tokens_per_s": n_tokens / plain_s},
            "methods": [],
        }
        for (name, rule, drafter), (outs, secs) in zip(methods, measured[1:]):
            steps = [s for o in outs for s in o.steps]
            toks = sum(len(o.tokens) for o in outs)
            m = spec_metrics(steps, K)
            same = sum(1 for o, p in zip(outs, plain_out) if o.tokens == p)
            report["methods"].append({
                "name": name, "rule": rule, "drafter": drafter, **m, "seconds": secs,
                "tokens_per_s": toks / secs, "speedup": plain_s / secs,
                "identical_to_plain": same,
            })
    except ValueError as exc:
        raise click.ClickException(str(exc).splitlines()[0]) from None

    click.echo(f"checkpoint {ckpt_dir}  ({cfg.refmtp.mtp_kind} MTP, D={cfg.D}, {report['dtype']}, "
               f"{backend}, {mode} cache)")
    click.echo(f"prompts    {len(prompts)} held-out windows of {prompt_len} bytes from {where}")
    click.echo(f"decoding   K={K}{' (last module reused)' if reuse and K > cfg.D else ''}, "
               f"temperature {temperature}, {max_new_tokens} new tokens per prompt\n")
    pos = " ".join(f"P(A>={i})" for i in range(1, K + 1))
    click.echo(f"{'method':<10} {'rule':<10} {pos}  {'tau':>5}  {'accept':>6}  {'tok/s':>8}  "
               f"{'speedup':>7}  same")
    dash = " ".join("-".rjust(8) for _ in range(K))
    click.echo(f"{'plain':<10} {'-':<10} {dash}  {1.0:>5.2f}  "
               f"{'-':>6}  {report['plain']['tokens_per_s']:>8.1f}  {1.0:>6.2f}x  -")
    for m in report["methods"]:
        rates = " ".join(("-" if r is None else f"{r:.3f}").rjust(8) for r in m["acceptance_per_position"])
        rate = "-" if m["draft_acceptance_rate"] is None else f"{m['draft_acceptance_rate']:.3f}"
        click.echo(f"{m['name']:<10} {m['rule']:<10} {rates}  {m['tau']:>5.2f}  {rate:>6}  "
                   f"{m['tokens_per_s']:>8.1f}  {m['speedup']:>6.2f}x  "
                   f"{m['identical_to_plain']}/{len(prompts)}")
    if json_path:
        try:
            Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
        except OSError as exc:
            raise InputError(f"cannot write --json {json_path}: {exc.strerror or exc}") from None
        click.echo(f"\nwrote {json_path}")
