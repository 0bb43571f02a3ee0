"""What every subcommand shares: the one-line input error (exit 2), the mapping of library
exceptions to exit codes (:func:`invoke_guarded`, used by the ``refmtp`` group for every
subcommand) and the up-front checks of output paths.

Exit codes: 0 success; 1 a failure of the work itself (a numerical mismatch, a non-finite loss,
an unexpected internal error, said in one line); 2 input the user can fix (a ValueError,
OSError, unavailable backend, refused size or unreadable file; one line naming what and how to
fix it); 128 + N after signal N (130 Ctrl-C, 143 SIGTERM). No traceback reaches the user
(``REFMTP_DEBUG=1`` shows the traceback of an internal error).
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import click

DEBUG_ENV = "REFMTP_DEBUG"


class InputError(click.ClickException):
    """Bad input the user can fix: one line, exit code 2."""

    exit_code = 2


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type when it has none)."""
    return one_line_text(str(exc)) or type(exc).__name__


def one_line_text(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def _is_input_error(exc: BaseException) -> bool:
    if isinstance(exc, (ValueError, OSError, UnicodeError)):
        return True
    names = {c.__name__ for c in type(exc).__mro__}
    return bool(names & {"BackendUnavailable", "GoldenError"})


def invoke_guarded(ctx: click.Context, invoke):
    """Run ``invoke(ctx)`` and turn what escapes into one line and an exit code."""
    try:
        return invoke(ctx)
    except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
        raise
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        click.echo("interrupted", err=True)
        ctx.exit(128 + int(signum))
    except BrokenPipeError:  # `refmtp ... | head`: stop quietly, as click does
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        ctx.exit(1)
    except MemoryError:
        raise InputError("out of memory: the sizes asked for do not fit in this machine's "
                         "memory; lower them (batch size, sequence length, model size)") from None
    except RecursionError:
        raise InputError("input nested too deeply to read") from None
    except Exception as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        if _is_input_error(exc):
            raise InputError(one_line(exc)) from None
        raise click.ClickException(
            f"internal error: {type(exc).__name__}: {one_line(exc)} ({DEBUG_ENV}=1 shows the "
            "traceback)") from None


def check_output_file(path, option: str, suffixes: tuple[str, ...] | None = None) -> Path:
    """An output file that can be written: its directory exists and is writable, it is not a
    directory, and (with ``suffixes``) it has one of them. Checked before any long work."""
    p = Path(path)
    if suffixes is not None and p.suffix.lower() not in suffixes:
        raise InputError(f"{option} {path}: the file name must end in "
                         f"{' or '.join(suffixes)}")
    if p.is_dir():
        raise InputError(f"{option} {path} is a directory: give a file name")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{option} {path}: directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise InputError(f"{option} {path} is not writable: choose another path")
    return p
