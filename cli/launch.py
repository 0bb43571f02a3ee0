"""``refmtp launch -n N [MPIEXEC OPTIONS] COMMAND ...``: run a refmtp command on N MPI ranks and
say in ONE line how a run ended that did not end by itself (docs/distributed.md §2).

    refmtp launch -n 2 train --preset tiny --batch-size 4 --expert-parallel 2 --out runs/ep2
    refmtp launch -n 16 -f hosts train --preset small --batch-size 32 --out runs/dp16

It runs the ``mpiexec`` of this Python environment (the mpich wheel's, next to the Python
executable; else the one on PATH) on ``python -m refmtp.cli.main COMMAND ...`` and passes the
ranks' output through, except what MPI prints when a rank dies or gives up: hydra's
"BAD TERMINATION OF ONE OF YOUR APPLICATION PROCESSES" block, MPICH's "Abort(...)" lines, its
Ctrl-C notices, and the ranks' own ``refmtp: rank R of N: ...; stopping every rank`` lines.
Those become one line on stderr, once every rank's process is gone::

    refmtp: rank 1 (pid 4242) was killed by signal 9 (SIGKILL); all 2 ranks stopped; last checkpoint: runs/ep2/checkpoint-0000040
    refmtp: rank 0 of 2: step 7: the gradient all-gather: rank 1 has not arrived within --rank-timeout 5 s (hung, stopped or much slower); all 2 ranks stopped; last checkpoint: ...

Exit code: the command's own when the ranks end by themselves (0, 1, 2, 130, 143); 128 + S when
a rank was killed by signal S (137 for SIGKILL); the code of a rank that stopped every rank
(124 after --rank-timeout, 1 after an error on one rank). Everything before the first refmtp
command name goes to mpiexec. Ctrl-C and SIGTERM are passed to mpiexec, which passes them to
every rank (they checkpoint and stop together). ``mpiexec -n N refmtp ...`` works as well; it
prints MPI's own multi-line notices instead of the one line.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click

from refmtp.cli.common import InputError

# hydra's notice when a rank ends by a signal or a non-zero exit without MPI_Abort
BANNER_START = re.compile(r"^=+\s*$")
BANNER_FIELDS = {"pid": re.compile(r"PID (\d+) RUNNING AT (\S+)"),
                 "code": re.compile(r"EXIT CODE: (\d+)"),
                 "string": re.compile(r"EXIT STRING: (.*?)\s*$")}
BANNER_END = "Please see the FAQ page for debugging suggestions"
ABORT_LINE = re.compile(r"^Abort\(\d+\) on node \d+ .*MPI_Abort")  # MPICH, one per aborting rank
RANK_LINE = re.compile(r"^refmtp: rank \d+ of \d+: (.*); stopping every rank$")  # World.abort
HYDRA_CTRL_C = re.compile(r"^\[mpiexec@[^\]]*\] (Sending Ctrl-C to processes|Press Ctrl-C again)")
GONE_WAIT_S = 10.0  # how long the launcher waits for the ranks' processes to disappear


def find_mpiexec() -> str | None:
    """The mpiexec of this environment: next to the Python executable, else on PATH."""
    return (shutil.which("mpiexec", path=str(Path(sys.executable).parent))
            or shutil.which("mpiexec"))


def _commands() -> list[str]:
    from refmtp.cli.main import COMMANDS

    return [name for name, _ in COMMANDS]


class _Report:
    """What the filters saw on the launcher's and the ranks' output."""

    def __init__(self):
        self.banner: dict = {}  # the fields of hydra's termination notice
        self.rank_lines: list[str] = []  # the ranks' own "stopping every rank" reasons
        self.out_dir: str | None = None  # rank 0's "out     DIR" line of refmtp train
        self.lock = threading.Lock()


def _pump(src, dst, report: _Report) -> None:
    """Copy the lines of ``src`` to ``dst`` but the notices of MPI (noted in ``report``)."""
    in_banner = False
    blanks = []  # empty lines are held back: hydra's notice starts with one
    for raw in iter(src.readline, b""):
        line = raw.decode("utf-8", "replace").rstrip("\n")
        if not line.strip() and not in_banner:
            blanks.append(raw)
            continue
        with report.lock:
            if in_banner:
                for key, pattern in BANNER_FIELDS.items():
                    m = pattern.search(line)
                    if m:
                        report.banner[key] = m.groups()
                if BANNER_END in line:
                    in_banner = False
                continue
            if BANNER_START.match(line) and len(line) > 20:
                in_banner = True
                report.banner.setdefault("seen", True)
                blanks = []
                continue
            reason = _rank_reason(line)
            if reason is not None:
                report.rank_lines.append(reason)
                continue
            if ABORT_LINE.match(line) or HYDRA_CTRL_C.match(line):
                continue
            if line.startswith("out     ") and report.out_dir is None:
                report.out_dir = line[len("out     "):].strip()
        dst.write(b"".join(blanks) + raw)
        dst.flush()
        blanks = []
    if blanks and not report.banner:
        dst.write(b"".join(blanks))
        dst.flush()


def _run_dir(command: list[str], report: _Report) -> Path | None:
    """The run directory of a ``train`` command: --resume / --out, else rank 0's ``out`` line."""
    if not command or command[0] != "train":
        return None
    for i, tok in enumerate(command):
        for opt in ("--resume", "--out"):
            if tok == opt and i + 1 < len(command):
                return Path(command[i + 1])
            if tok.startswith(opt + "="):
                return Path(tok[len(opt) + 1:])
    return Path(report.out_dir) if report.out_dir else None


def _rank_pids(pid_dir: Path) -> dict[int, int]:
    """{pid: rank} from the files the ranks left (refmtp.training.distributed.detect_world)."""
    out = {}
    for f in pid_dir.glob("rank-*.pid"):
        try:
            out[int(f.read_text().strip())] = int(f.stem.split("-")[1])
        except (OSError, ValueError):
            continue
    return out


def _rank_reason(line: str) -> str | None:
    """``rank R of N: <why>`` from a rank's ``refmtp: ...; stopping every rank`` line, else None."""
    if RANK_LINE.match(line):
        return line[len("refmtp: "):-len("; stopping every rank")]
    return None


def _rank_abort_lines(pid_dir: Path) -> list[str]:
    """The reasons of the ranks that stopped the run, from the files World.abort left, by rank."""
    out = []
    for f in sorted(pid_dir.glob("rank-*.abort"), key=lambda f: int(f.stem.split("-")[1])):
        try:
            reason = _rank_reason(f.read_text(encoding="utf-8").strip())
        except (OSError, ValueError):
            continue
        if reason is not None:
            out.append(reason)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:  # a zombie has died: state Z
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _stop_all(pids: dict[int, int]) -> list[int]:
    """Wait for the ranks' processes to be gone; kill (SIGKILL) the ones MPI left (a stopped
    rank); returns the ranks still there after that."""
    deadline = time.monotonic() + GONE_WAIT_S
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    time.sleep(0.1)
    return sorted(rank for pid, rank in pids.items() if _alive(pid))


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


@click.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("-n", "--np", "n", type=click.IntRange(min=1), required=True,
              help="Number of ranks (processes).")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def launch(n, args):
    """Run a refmtp COMMAND on N MPI ranks; a rank that dies or hangs ends the run with one line.

    Options before COMMAND go to mpiexec (for example a host file: -f hosts). Example:
    refmtp launch -n 2 train --preset tiny --expert-parallel 2
    """
    args = list(args)
    names = _commands()
    at = next((i for i, a in enumerate(args) if a in names), None)
    if at is None:
        raise InputError(f"refmtp launch -n {n}: name the refmtp command to run on the ranks "
                         f"({', '.join(x for x in names if x != 'launch')}), e.g. refmtp launch "
                         f"-n {n} train --preset tiny")
    mpi_opts, command = args[:at], args[at:]
    if command[0] == "launch":
        raise InputError("refmtp launch runs a refmtp command on the ranks, not another launch")
    mpiexec = find_mpiexec()
    if mpiexec is None:
        from refmtp.training.distributed import INSTALL_HINT

        raise InputError(f"refmtp launch needs mpiexec (not next to {sys.executable} nor on "
                         f"PATH): install it with {INSTALL_HINT}")
    sys.exit(_launch(mpiexec, n, mpi_opts, command))


def _launch(mpiexec: str, n: int, mpi_opts: list, command: list) -> int:
    from refmtp.training.distributed import PID_DIR_ENV

    pid_dir = Path(tempfile.mkdtemp(prefix="refmtp-launch-"))
    env = {**os.environ, PID_DIR_ENV: str(pid_dir), "PYTHONUNBUFFERED": "1"}
    cmd = [mpiexec, "-n", str(n), *mpi_opts, sys.executable, "-m", "refmtp.cli.main", *command]
    report = _Report()
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                start_new_session=True)  # Ctrl-C reaches the ranks once, via us
    except OSError as exc:
        shutil.rmtree(pid_dir, ignore_errors=True)
        raise InputError(f"cannot start {mpiexec}: {exc}") from None

    def forward(signum, frame):
        try:
            proc.send_signal(signum)
        except OSError:
            pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    pumps = [threading.Thread(target=_pump, args=(src, dst, report), daemon=True)
             for src, dst in ((proc.stdout, sys.stdout.buffer), (proc.stderr, sys.stderr.buffer))]
    try:
        for t in pumps:
            t.start()
        code = proc.wait()
        for t in pumps:
            t.join()
        pids = _rank_pids(pid_dir)
        if not report.rank_lines:  # the ranks' own lines, where MPI_Abort outran their output
            report.rank_lines = _rank_abort_lines(pid_dir)
        if not (report.banner or report.rank_lines):
            return code
        left = _stop_all(pids)
        if report.banner.get("pid"):
            pid = int(report.banner["pid"][0])
            rank = pids.get(pid)
            sig = None
            m = re.search(r"signal (\d+)", (report.banner.get("string") or ("",))[0])
            if m:
                sig = int(m.group(1))
            who = f"rank {rank} (pid {pid})" if rank is not None else f"the process {pid}"
            if sig is not None:
                what = f"{who} was killed by signal {sig} ({_signal_name(sig)})"
                code = 128 + sig
            else:
                exit_code = int((report.banner.get("code") or ("1",))[0])
                what = f"{who} exited with code {exit_code} without stopping the others"
                code = exit_code or 1
        else:
            what = report.rank_lines[0]
        stopped = (f"all {n} ranks stopped" if not left else
                   f"ranks {', '.join(map(str, left))} could not be stopped")
        line = f"refmtp: {what}; {stopped}"
        run_dir = _run_dir(command, report)
        if run_dir is not None:
            from refmtp.training.rundir import latest_checkpoint

            try:
                ckpt = latest_checkpoint(run_dir) if run_dir.is_dir() else None
            except (OSError, ValueError):
                ckpt = None
            line += f"; last checkpoint: {ckpt if ckpt is not None else 'none yet'}"
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        return code if code else 1
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(pid_dir, ignore_errors=True)
