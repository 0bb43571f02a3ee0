"""``refmtp generate``: byte-level text generation from a checkpoint, plain or self-speculative.

    refmtp generate --ckpt runs/x --prompt "def main(" --max-new-tokens 200
    refmtp generate --ckpt runs/x --prompt "def main(" --speculative 2 --reuse --temperature 0.8

Tokens are bytes: the prompt is encoded as UTF-8, the output decoded with ``errors="replace"``
and streamed as it is produced (an incremental decoder, so multi-byte characters split across
steps still print correctly). ``--speculative K`` drafts K tokens per step with the model's MTP
modules (or parallel heads) and verifies them in one main-model call (refmtp/inference/speculative.py);
with ``--draft-ckpt DIR`` an independent draft model on the same tokens drafts them instead
(refmtp/inference/draft_model.py). At temperature 0 the text is the same as without it. A
one-line summary goes to stderr.

Exit codes: 2 for input the user can fix (missing or invalid checkpoint, bad K, a prompt byte
outside the vocabulary, a budget past max_position_embeddings, a draft model that does not
share the target's tokens), 1 for other errors.
"""
from __future__ import annotations

import codecs
import math
import time
from pathlib import Path

import click

from refmtp.cli.common import InputError


def check_temperature(temperature: float) -> None:
    if not 0 <= temperature < math.inf:
        raise InputError(f"--temperature {temperature} must be a finite number >= 0 (0 = greedy)")


def resolve_checkpoint(path) -> Path:
    """A checkpoint directory, or a training run directory (its newest checkpoint)."""
    from refmtp.training.rundir import latest_checkpoint

    p = Path(path)
    if not p.exists():
        raise InputError(f"checkpoint {path} does not exist: pass a checkpoint or run directory")
    if p.is_dir() and not (p / "config.json").exists():
        latest = latest_checkpoint(p)
        if latest is None:
            raise InputError(f"{path} holds neither config.json nor a checkpoint-* directory")
        return latest
    return p


def load_decoder(path, backend: str, dtype: str | None):
    """(Decoder, checkpoint dir) for ``--ckpt``; every loading problem is an InputError."""
    from refmtp.backends import BackendUnavailable
    from refmtp.checkpoint import load_checkpoint
    from refmtp.inference.decode import Decoder

    ckpt = resolve_checkpoint(path)
    try:
        cfg, params = load_checkpoint(ckpt, backend=backend, dtype=dtype)
        return Decoder(params, cfg), ckpt
    except (ValueError, BackendUnavailable) as exc:
        raise InputError(str(exc).splitlines()[0]) from None


def load_draft(path, backend: str, dtype: str | None, target, target_dir: Path):
    """(draft Decoder, its checkpoint dir) for ``--draft-ckpt``, refused in one line unless it
    shares the target's tokens (vocabulary, special tokens, tokenizer files)."""
    from refmtp.checkpoint import tokenizer_metadata
    from refmtp.inference.draft_model import check_pair

    draft, draft_dir = load_decoder(path, backend, dtype)
    try:
        check_pair(tokenizer_metadata(target.cfg, target_dir), tokenizer_metadata(draft.cfg, draft_dir))
    except ValueError as exc:
        raise InputError(f"--draft-ckpt {path}: {exc}") from None
    return draft, draft_dir


def check_k_option(dec, k: int, reuse: bool, draft=None) -> None:
    from refmtp.inference.draft_model import check_draft_k
    from refmtp.inference.speculative import check_k

    try:
        if draft is None:
            check_k(dec.cfg, k, reuse)
        else:
            check_draft_k(k)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def fmt_rates(rates) -> str:
    return "[" + ", ".join("-" if r is None else f"{r:.2f}" for r in rates) + "]"


@click.command()
@click.option("--ckpt", required=True, help="Checkpoint directory (or a training run directory).")
@click.option("--prompt", required=True, help="Prompt text (UTF-8 bytes are the tokens).")
@click.option("--max-new-tokens", type=int, default=128, show_default=True, help="Tokens to generate.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--speculative", "k", type=int, default=0, show_default=True,
              help="Drafts per step from the MTP modules / parallel heads (0 = plain cached decoding).")
@click.option("--reuse", is_flag=True, help="Reuse the last MTP module for drafts past D (K > D).")
@click.option("--draft-ckpt", default=None,
              help="Draft the --speculative K tokens with this independent draft model (same tokens).")
@click.option("--sample-drafts", is_flag=True,
              help="Sample drafts from the drafter's distribution at --temperature (default: argmax drafts).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the sampling coins (RNG-v1).")
@click.option("--mode", type=click.Choice(["absorbed", "naive"]), default="absorbed", show_default=True,
              help="KV cache: MLA latent (absorbed) or full per-head K/V (naive).")
@click.option("--backend", type=click.Choice(["numpy", "cupy"]), default="numpy", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default=None,
              help="Compute dtype (default: the checkpoint's).")
def generate(ckpt, prompt, max_new_tokens, temperature, k, reuse, draft_ckpt, sample_drafts, seed, mode,
             backend, dtype):
    """Generate text from a checkpoint (byte-level), optionally with self-speculative decoding."""
    from refmtp.inference.decode import check_budget, check_prompt
    from refmtp.inference.decode import generate as plain_generate
    from refmtp.inference.speculative import spec_metrics, speculative_generate

    if max_new_tokens < 0:
        raise InputError(f"--max-new-tokens {max_new_tokens} must be >= 0")
    check_temperature(temperature)
    try:
        prompt_bytes = prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError("--prompt is not valid UTF-8 text: pass the prompt as UTF-8") from None
    if k < 0:
        raise InputError(f"--speculative {k} must be >= 0 (the number of drafts per step)")
    if draft_ckpt is not None and k == 0:
        raise InputError("--draft-ckpt drafts --speculative K tokens per step: give --speculative K >= 1")
    dec, ckpt_dir = load_decoder(ckpt, backend, dtype)
    draft = None if draft_ckpt is None else load_draft(draft_ckpt, backend, dtype, dec, ckpt_dir)[0]
    check_k_option(dec, k, reuse, draft)
    ids = list(prompt_bytes)
    try:
        check_prompt(ids, dec.cfg)
        check_budget(max_new_tokens, len(ids), dec.cfg, extra=k)
        if draft is not None:
            check_budget(max_new_tokens, len(ids), draft.cfg, extra=k)
    except ValueError as exc:
        raise InputError(str(exc)) from None

    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def stream(tokens):
        click.echo(utf8.decode(bytes(tokens)), nl=False)  # click.echo flushes

    click.echo(prompt, nl=False)
    t0 = time.perf_counter()
    try:
        if k == 0:
            tokens = plain_generate(dec, ids, max_new_tokens, temperature=temperature, seed=seed,
                                    mode=mode, on_tokens=stream)
            res = None
        else:
            res = speculative_generate(dec, ids, max_new_tokens, k=k, temperature=temperature,
                                       seed=seed, sample_drafts=sample_drafts,
                                       reuse_last_module=reuse, mode=mode, on_tokens=stream, draft=draft)
            tokens = res.tokens
    except ValueError as exc:
        raise click.ClickException(str(exc).splitlines()[0]) from None
    seconds = time.perf_counter() - t0
    click.echo(utf8.decode(b"", final=True))
    line = f"{len(tokens)} tokens in {seconds:.2f} s ({len(tokens) / max(seconds, 1e-9):.1f} tok/s)"
    if res is not None:
        m = spec_metrics(res.steps, k)
        tau = "-" if m["tau"] is None else f"{m['tau']:.2f}"
        line += (f"; speculative K={k}{' (draft model)' if draft is not None else ''}: {m['steps']} verification steps, {tau} tokens/step, "
                 f"P(A>=i) {fmt_rates(m['acceptance_per_position'])}")
    click.echo(line, err=True)
