"""The ``refmtp`` command group.

Every subcommand lives in its own module (``cli/<name>.py``) and is registered here. Errors the
user can fix are raised as :class:`click.ClickException` (one line, exit 1) or
:class:`UsageError`-style exits with code 2; no traceback reaches the user.
"""
from __future__ import annotations

import importlib
import sys

import click

from refmtp import __version__

# (module in refmtp.cli, attribute): each module defines one click command or group.
COMMANDS = [
    ("info", "info"),
    ("train", "train"),
    ("plot", "plot"),
    ("generate", "generate"),
    ("speculate", "speculate"),
    ("golden", "golden"),
    ("audit", "audit"),
]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
    except KeyboardInterrupt:  # pragma: no cover
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
