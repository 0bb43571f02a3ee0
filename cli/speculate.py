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
``--draft-ckpt DIR`` adds "draft": K drafts from an independent draft model on the same tokens
(refmtp/inference/draft_model.py), lossless rule.

``--compare`` runs the two schools of drafting side by side on the same target and prompts
(docs/inference.md, "One comparison on one target"), interleaved per prompt: plain decoding;
the target's own drafters at K = 1..Kmax (causal MTP, modules reused past D; or its parallel
heads at K = 1..D) and blockwise parallel decoding (greedy exact match) at the largest K; the
draft model at K = 1..Kmax (``--draft-ckpt``); and a parallel-heads checkpoint (``--heads-ckpt``,
on the same tokens) with its own plain decoding, heads at K = 1..D and blockwise. ``--k`` is
Kmax (default D + 1). ``--plot FILE`` draws P(A >= i) per draft position (matplotlib, the
``plot`` extra), ``--markdown FILE`` writes the table as markdown (docs/inference.md shows it).

Exit codes: 2 for input the user can fix (checkpoint, data, K, sizes, a draft or heads model
that does not share the target's tokens, a missing matplotlib for --plot), 1 for other errors.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from refmtp.cli.common import check_output_file
from refmtp.cli.generate import InputError, check_k_option, check_temperature, load_decoder, load_draft

PLOT_FORMATS = (".png", ".pdf", ".svg")


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


@dataclass(frozen=True)
class Method:
    """One row of the report: a drafter and a rule on one target (``model``: which decoder)."""

    name: str  # mtp | heads | draft | blockwise | typical
    rule: str  # lossless | blockwise | typical
    drafter: str  # what drafts, in words
    k: int  # drafts per step
    model: str = "target"  # "target" (--ckpt) or "heads" (--heads-ckpt)
    draft: bool = False  # drafts come from the --draft-ckpt model


def _methods(cfg, K):
    if cfg.refmtp.mtp_kind == "parallel":
        return [Method("heads", "lossless", "parallel heads", K),
                Method("blockwise", "blockwise", "parallel heads", K),
                Method("typical", "typical", "parallel heads", K)]
    return [Method("mtp", "lossless", "MTP chain", K)]


def _self_rows(cfg, kmax, model):
    """The target's own drafters at K = 1..Kmax (heads: 1..D) and blockwise at the largest K."""
    if cfg.refmtp.mtp_kind == "parallel":
        ks, name, drafter = range(1, cfg.D + 1), "heads", "parallel heads"
    else:
        ks, name, drafter = range(1, kmax + 1) if cfg.D else (), "mtp", "MTP chain"
    rows = [Method(name, "lossless", drafter, k, model) for k in ks]
    if rows:
        rows.append(Method("blockwise", "blockwise", drafter, rows[-1].k, model))
    return rows


def _compare_methods(cfg, kmax, draft, heads):
    rows = _self_rows(cfg, kmax, "target")
    if draft is not None:
        rows += [Method("draft", "lossless", "draft model", k, draft=True) for k in range(1, kmax + 1)]
    if heads is not None:
        rows += _self_rows(heads.cfg, kmax, "heads")
    return rows


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
@click.option("--k", "k", type=int, default=None,
              help="Drafts per step (default: D, the number of modules; with --compare the largest K, default D + 1).")
@click.option("--reuse", is_flag=True, help="Reuse the last MTP module for drafts past D (K > D).")
@click.option("--draft-ckpt", default=None,
              help="Also draft with this independent draft model (same tokens as --ckpt).")
@click.option("--heads-ckpt", default=None,
              help="With --compare: a parallel-heads checkpoint (same tokens) for the heads rows.")
@click.option("--compare", is_flag=True,
              help="Every drafter side by side: plain, MTP K=1..Kmax, blockwise, draft model, heads.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Write a plot of P(A>=i) per draft position (.png/.pdf/.svg; needs matplotlib).")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the table as markdown to this file.")
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
def speculate(ckpt, data, k, reuse, draft_ckpt, heads_ckpt, compare, plot_path, markdown_path, temperature,
              sample_drafts, samples, prompt_len, max_new_tokens, seed, mode, backend, dtype, json_path):
    """Acceptance per draft position, tokens per step and speedup of speculative decoding."""
    from refmtp.inference.decode import check_budget
    from refmtp.inference.decode import generate as plain_generate
    from refmtp.inference.speculative import spec_metrics, speculative_generate

    for name, value, low in (("--samples", samples, 1), ("--prompt-len", prompt_len, 2),
                             ("--max-new-tokens", max_new_tokens, 1)):
        if value < low:
            raise InputError(f"{name} {value} must be >= {low}")
    check_temperature(temperature)
    if heads_ckpt is not None and not compare:
        raise InputError("--heads-ckpt is read by --compare only: add --compare")
    for path, option, suffixes in ((json_path, "--json", None), (markdown_path, "--markdown", None),
                                   (plot_path, "--plot", PLOT_FORMATS)):
        if path:
            check_output_file(path, option, suffixes)  # before the measurement, not after
    if plot_path:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise InputError("--plot needs matplotlib: pip install 'refmtp[plot]' (or pip install "
                             "matplotlib)") from None
    dec, ckpt_dir = load_decoder(ckpt, backend, dtype)
    cfg = dec.cfg
    draft = None if draft_ckpt is None else load_draft(draft_ckpt, backend, dtype, dec, ckpt_dir)[0]
    heads = None
    if heads_ckpt is not None:
        heads, heads_dir = load_draft(heads_ckpt, backend, dtype, dec, ckpt_dir)  # same tokens
        if heads.cfg.refmtp.mtp_kind != "parallel" or heads.cfg.D == 0:
            raise InputError(f"--heads-ckpt {heads_ckpt} has no parallel heads (mtp_kind="
                             f"{heads.cfg.refmtp.mtp_kind!r}, D={heads.cfg.D}): train one with "
                             "refmtp.mtp_kind 'parallel'")
    if compare:
        K = (cfg.D + 1 if cfg.refmtp.mtp_kind == "causal" else max(cfg.D, 1)) if k is None else k
        if K < 1:
            raise InputError(f"--k {K} must be >= 1 (the largest number of drafts per step)")
        methods = _compare_methods(cfg, K, draft, heads)
        if not methods:
            raise InputError("nothing to compare: the target has no MTP modules; give --draft-ckpt "
                             "or --heads-ckpt")
        K = max(m.k for m in methods)
    else:
        K = (cfg.D if draft is None or cfg.D else 1) if k is None else k
        if K < 1:
            raise InputError(f"--k {K} must be >= 1 (the number of drafts per step)")
        methods = [] if draft is not None and cfg.D == 0 else _methods(cfg, K)
        if methods:
            check_k_option(dec, K, reuse)
        if draft is not None:
            methods.append(Method("draft", "lossless", "draft model", K, draft=True))
    try:
        for model in [dec] + [m for m in (draft, heads) if m is not None]:
            check_budget(max_new_tokens, prompt_len, model.cfg, extra=K)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    data = data if data is not None else _run_data(ckpt_dir)
    prompts, where = _prompts(data, samples, prompt_len)
    if max(max(p) for p in prompts) >= cfg.vocab_size:
        raise InputError(f"the data has bytes >= vocab_size={cfg.vocab_size}: use a byte-level model")

    decoders = {"target": dec, "heads": heads}

    def plain(model):
        def run(i_p):
            i, p = i_p
            return plain_generate(decoders[model], p, max_new_tokens, temperature=temperature,
                                  seed=seed + i, mode=mode)
        return run

    def spec(m: Method):
        def run(i_p):
            i, p = i_p
            return speculative_generate(decoders[m.model], p, max_new_tokens, k=m.k, temperature=temperature,
                                        seed=seed + i, rule=m.rule, sample_drafts=sample_drafts,
                                        reuse_last_module=reuse or compare, mode=mode,
                                        draft=draft if m.draft else None)
        return run

    plains = ["target"] + (["heads"] if any(m.model == "heads" for m in methods) else [])
    items = list(enumerate(prompts))
    try:
        runners = [plain(model) for model in plains] + [spec(m) for m in methods]
        for run in runners:  # warm-up: kernel compilation and caches, outside the timings
            run(items[0])
        measured = _measure(runners, items)
        base = dict(zip(plains, measured))
        report = {
            "ckpt": str(ckpt_dir), "draft_ckpt": None if draft is None else str(resolve(draft_ckpt)),
            "heads_ckpt": None if heads is None else str(heads_dir), "compare": compare,
            "data": where, "mtp_kind": cfg.refmtp.mtp_kind, "D": cfg.D,
            "k": K, "reuse_last_module": reuse or compare, "temperature": temperature,
            "sample_drafts": sample_drafts, "samples": len(prompts), "prompt_len": prompt_len,
            "max_new_tokens": max_new_tokens, "seed": seed, "mode": mode, "backend": backend,
            "dtype": str(dec.dtype),
            "plain": _plain_entry(*base["target"]),
            "methods": [],
        }
        if "heads" in base:
            report["heads_plain"] = _plain_entry(*base["heads"])
        for m, (outs, secs) in zip(methods, measured[len(plains):]):
            steps = [s for o in outs for s in o.steps]
            toks = sum(len(o.tokens) for o in outs)
            plain_out, plain_s = base[m.model]
            same = sum(1 for o, p in zip(outs, plain_out) if o.tokens == p)
            report["methods"].append({
                **asdict(m), **spec_metrics(steps, m.k), "seconds": secs,
                "tokens_per_s": toks / secs, "speedup": plain_s / secs, "identical_to_plain": same,
                "lossless": _lossless(m.rule, temperature, same, len(prompts)),
            })
    except ValueError as exc:
        raise click.ClickException(str(exc).splitlines()[0]) from None

    click.echo(f"checkpoint {ckpt_dir}  ({cfg.refmtp.mtp_kind} MTP, D={cfg.D}, {report['dtype']}, "
               f"{backend}, {mode} cache)")
    if draft is not None:
        click.echo(f"draft      {report['draft_ckpt']}  ({draft.cfg.num_hidden_layers} layers, "
                   f"hidden {draft.cfg.hidden_size})")
    if heads is not None:
        click.echo(f"heads      {heads_dir}  (parallel heads, D={heads.cfg.D}; its own main model is "
                   "the target of its rows)")
    click.echo(f"prompts    {len(prompts)} held-out windows of {prompt_len} bytes from {where}")
    reused = " (last module reused past D)" if (reuse or compare) and K > cfg.D and cfg.D else ""
    click.echo(f"decoding   K={'1..' if compare else ''}{K}{reused}, temperature {temperature}, "
               f"{max_new_tokens} new tokens per prompt\n")
    for line in table(report, markdown=False):
        click.echo(line)
    if compare:
        click.echo("\nlossless: at temperature 0 'yes' means every sample came out identical to plain "
                   "decoding; at temperature > 0 'rule' marks the lossless rule (equal in distribution, "
                   "tests/test_draft_model.py), 'no' a rule that is not")
    if markdown_path:
        _write(markdown_path, "--markdown", "\n".join(table(report, markdown=True)) + "\n")
        click.echo(f"\nwrote {markdown_path}")
    if json_path:
        _write(json_path, "--json", json.dumps(report, indent=2) + "\n")
        click.echo(f"\nwrote {json_path}")
    if plot_path:
        try:
            plot_acceptance(report, plot_path)
        except OSError as exc:
            raise InputError(f"cannot write --plot {plot_path}: {exc.strerror or exc}") from None
        click.echo(f"\nwrote {plot_path}")


def resolve(path) -> Path:
    from refmtp.cli.generate import resolve_checkpoint

    return resolve_checkpoint(path)


def _plain_entry(outs, secs) -> dict:
    n_tokens = sum(len(o) for o in outs)
    return {"seconds": secs, "tokens": n_tokens, "tokens_per_s": n_tokens / secs}


def _lossless(rule, temperature, same, n) -> str:
    if temperature == 0:
        return "yes" if same == n else "NO"
    return "rule" if rule == "lossless" else "no"


def _write(path, option, text) -> None:
    try:
        Path(path).write_text(text)
    except OSError as exc:
        raise InputError(f"cannot write {option} {path}: {exc.strerror or exc}") from None


def table(report: dict, markdown: bool) -> list[str]:
    """The report's table: one row per method (plain rows first), text or markdown."""
    K = report["k"]
    head = ["method", "target", "K", "rule"] + [f"P(A>={i})" for i in range(1, K + 1)] + \
        ["tau", "accept", "tok/s", "speedup", "same", "lossless"]
    n = report["samples"]
    rows = []
    for model, key in (("target", "plain"), ("heads", "heads_plain")):
        if key in report:
            rows.append(["plain", model, "0", "-"] + ["-"] * K +
                        ["1.00", "-", f"{report[key]['tokens_per_s']:.1f}", "1.00x", "-", "-"])
    for m in report["methods"]:
        rates = [("-" if r is None else f"{r:.3f}") for r in m["acceptance_per_position"]]
        rates += [""] * (K - len(rates))
        rows.append([m["name"], m["model"], str(m["k"]), m["rule"]] + rates + [
            "-" if m["tau"] is None else f"{m['tau']:.2f}",
            "-" if m["draft_acceptance_rate"] is None else f"{m['draft_acceptance_rate']:.3f}",
            f"{m['tokens_per_s']:.1f}", f"{m['speedup']:.2f}x", f"{m['identical_to_plain']}/{n}",
            m["lossless"]])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        return lines + ["| " + " | ".join(r) + " |" for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt = lambda cells: " ".join(c.ljust(w) if i < 4 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return [fmt(head)] + [fmt(r) for r in rows]


def plot_acceptance(report: dict, path) -> None:
    """P(A >= i) against the draft position i, one line per method row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for m in report["methods"]:
        ys = m["acceptance_per_position"]
        xs = [i for i, y in enumerate(ys, 1) if y is not None]
        if xs:
            ax.plot(xs, [y for y in ys if y is not None], marker="o",
                    label=f"{m['name']} K={m['k']} ({m['model']}, {m['rule']})")
    ax.set_xlabel("draft position i")
    ax.set_ylabel("P(A >= i)")
    ax.set_ylim(0, 1)
    ax.set_xticks(range(1, report["k"] + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"acceptance per draft position, temperature {report['temperature']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
