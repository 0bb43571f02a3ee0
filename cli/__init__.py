"""refmtp's command line (click). Installed as ``refmtp.cli``; the commands stay thin and call
into ``refmtp``.

:func:`entry` is the console script: it imports the command group only inside its guard, so a
Ctrl-C at any moment, the start-up imports included, exits 130 without a traceback.
"""
import sys


def entry() -> None:
    try:
        from refmtp.cli.main import main

        main()
    except KeyboardInterrupt:
        try:
            sys.stderr.write("interrupted\n")
        finally:
            sys.exit(130)
