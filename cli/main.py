"""The ``refmtp`` command group.

Every subcommand lives in its own module (``cli/<name>.py``) and is registered here. Every
subcommand runs through one guard (:func:`refmtp.cli.common.invoke_guarded`): input the user can
fix exits 2 with one line, a failure of the work exits 1 with one line, signal N exits 128 + N;
no traceback reaches the user. The console script is :func:`refmtp.cli.entry`, which also turns
a Ctrl-C during the start-up imports into exit 130.
"""
from __future__ import annotations

import importlib
import sys

import click

from refmtp import __version__
from refmtp.cli.common import invoke_guarded, one_line_text

# (module in refmtp.cli, attribute): each module defines one click command or group.
COMMANDS = [
    ("info", "info"),
    ("train", "train"),
    ("launch", "launch"),
    ("plot", "plot"),
    ("generate", "generate"),
    ("speculate", "speculate"),
    ("golden", "golden"),
    ("audit", "audit"),
    ("experiment", "experiment"),
]


class RefmtpGroup(click.Group):
    """The ``refmtp`` group: every subcommand runs through :func:`refmtp.cli.common.invoke_guarded`
    (one line and exit 2 for bad input, 128 + N after signal N, never a traceback)."""

    def invoke(self, ctx):
        return invoke_guarded(ctx, super().invoke)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """Like click's standalone mode, but every error is ONE line on stderr (a usage error
        too: the message and where the help is) and Ctrl-C while parsing exits 130."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            click.echo(f"Error: {one_line_text(exc.format_message())}{where}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"Error: {one_line_text(exc.format_message())}", err=True)
            sys.exit(exc.exit_code)
        except (click.Abort, KeyboardInterrupt):
            click.echo("interrupted", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=RefmtpGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="refmtp")
def cli():
    """refmtp: reference DeepSeek-V3 MLA, DeepSeekMoE and causal MTP on NumPy or CuPy."""


for _module, _attr in COMMANDS:
    try:
        _mod = importlib.import_module(f"refmtp.cli.{_module}")
    except ModuleNotFoundError as exc:
        if exc.name == f"refmtp.cli.{_module}":
            continue  # command not written yet
        raise
    cli.add_command(getattr(_mod, _attr))


def main(argv=None):
    try:
        cli.main(args=argv, prog_name="refmtp", standalone_mode=True)
    except KeyboardInterrupt:  # pragma: no cover - while click parses the arguments
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
