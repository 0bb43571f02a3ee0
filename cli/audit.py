"""``refmtp audit``: walk the model's math step by step, each step checked independently.

Thin wrapper around :func:`refmtp.verification.audit.run.run_audit` (docs/audit.md). Exit codes: 0 every check
passes, 1 a check FAILs (the report is still printed in full), 2 bad input (unknown preset,
unreadable config or checkpoint, position out of range, a model too large to audit).
"""
from __future__ import annotations

import sys

import click

from refmtp.verification.audit.corruptions import CORRUPTIONS
from refmtp.verification.audit.report import COMPONENTS, FORMATS


class InputError(click.ClickException):
    """Input the user can fix: one line, exit code 2."""

    exit_code = 2


@click.command()
@click.option("--preset", "preset_name", default=None,
              help="Model preset (tiny, small); weights drawn from --seed. Default: tiny.")
@click.option("--ckpt", type=click.Path(file_okay=False), default=None,
              help="Checkpoint directory (config.json + model.safetensors) to audit.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="Model config.json; weights drawn from --seed.")
@click.option("--component", type=click.Choice(list(COMPONENTS) + ["all"]), default="all",
              show_default=True, help="Which part of the model to walk through.")
@click.option("--position", type=click.IntRange(min=0), default=None,
              help="Position i whose values are shown [default: T-D-1, the last row every depth has].")
@click.option("--batch-row", type=click.IntRange(min=0), default=0, show_default=True,
              help="Batch row b whose values are shown (the audit batch has 2 sequences).")
@click.option("--backward", is_flag=True,
              help="Also check every parameter's gradient, per layer, against central differences.")
@click.option("--coords", type=click.IntRange(min=1), default=2, show_default=True,
              help="Random coordinates per tensor in the --backward checks.")
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)), default="text", show_default=True,
              help="text for a terminal, markdown for a review, json for tools.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the tokens (and of the weights for --preset/--config).")
@click.option("--backend", type=click.Choice(["numpy", "cupy"]), default="numpy", show_default=True,
              help="Backend the library runs on (the independent checks always run on the host).")
@click.option("--corrupt", type=click.Choice(sorted(CORRUPTIONS)), default=None,
              help="Self-test: inject a known fault into the weights the library runs on "
                   "(not into the reference); the relevant check must FAIL.")
def audit(preset_name, ckpt, config_file, component, position, batch_row, backward, coords, fmt, seed,
          backend, corrupt):
    """Print every step of the forward (and with --backward the gradients) with its equation,
    formula, shapes, values at (b, i) and an independent check; exit 1 if any check fails."""
    from refmtp.verification.audit.run import run_audit  # here: the model loads only for this command
    from refmtp.backends import BackendUnavailable
    from refmtp.config import ConfigError

    try:
        report = run_audit(preset=preset_name, ckpt=ckpt, config=config_file, component=component,
                           position=position, batch_row=batch_row, backward=backward, seed=seed,
                           backend=backend, corrupt=corrupt, coords=coords)
    except (ConfigError, ValueError, BackendUnavailable, OSError) as exc:
        raise InputError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    click.echo(report.render(fmt), nl=fmt != "markdown")
    if not report.passed:
        if fmt != "text":  # text already ends with the FAIL summary
            click.echo(f"audit FAILED: {len(report.failures())} check(s)", err=True)
        sys.exit(1)
