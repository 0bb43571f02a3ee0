"""The run directory of a training run: its files, the checkpoint directories and ``latest``.

    run_dir/run.json            settings, model config, data fingerprint, run id (format "refmtp-run")
    run_dir/metrics.jsonl       one JSON object per logged step
    run_dir/checkpoints.json    the manifest: the names of the checkpoints this run wrote
    run_dir/latest              the name of the newest complete checkpoint
    run_dir/.lock               the pid of the process training in this directory
    run_dir/checkpoint-NNNNNNN/ config.json, model.safetensors, optimizer.safetensors,
                                trainer_state.json

Saving (:func:`write_checkpoint`): the files go into ``ckpt.tmp/``; the final name is added to
the manifest; ``ckpt.tmp`` is renamed with ``os.replace``; ``latest`` is replaced the same way;
the run's older checkpoints are removed and dropped from the manifest. A crash at any point
leaves the previous checkpoint complete and never a half-written one under a final name.

What the run owns is what its manifest names: clean-up deletes nothing else (a user's own
``checkpoint-*`` copy survives), and :func:`latest_checkpoint` derives the newest complete
checkpoint from the manifest, so a ``latest`` file that is stale (a kill between the rename and
its update), missing or garbage is repaired (:func:`repair_latest`) rather than trusted.
One process per run directory: :class:`RunLock` (``flock`` on ``.lock``, which holds the pid;
a lock left by a dead process is taken over). docs/training.md, "What survives what".
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Callable

try:  # POSIX; elsewhere the lock falls back to the pid in the file
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

RUN_FORMAT = "refmtp-run"
RUN_FORMAT_VERSION = 1
STATE_FILE = "trainer_state.json"  # the last file of a checkpoint: present means complete
MANIFEST_FILE = "checkpoints.json"
MANIFEST_FORMAT = "refmtp-checkpoints"
LOCK_FILE = ".lock"
TMP_DIR = "ckpt.tmp"
NAME_RE = re.compile(r"checkpoint-(\d{7})")
FAULT_ENV = "REFMTP_TEST_KILL_AT"  # tests only: SIGKILL this process at a named point of a save


class RunError(ValueError):
    """A run directory or a resume request that cannot be used (one line, says the fix)."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, ...); the previous one is intact."""


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:07d}"


def checkpoint_step(name: str) -> int | None:
    m = NAME_RE.fullmatch(name)
    return int(m.group(1)) if m else None


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _fault_point(name: str, step: int) -> None:
    """Test hook: with REFMTP_TEST_KILL_AT=<name> (or <name>:<step>) the process is SIGKILLed
    here (docs/training.md, "What survives what"; tests/test_faults.py)."""
    want = os.environ.get(FAULT_ENV)
    if want and want in (name, f"{name}:{step}"):  # pragma: no cover - the process dies
        os.kill(os.getpid(), signal.SIGKILL)


# -------------------------------------------------------------------------------------------
# the manifest and latest
# -------------------------------------------------------------------------------------------
def read_manifest(run_dir) -> list[str] | None:
    """The checkpoint names the run wrote (oldest first), or None for a run without a manifest
    (written by an older refmtp)."""
    path = Path(run_dir) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
        names = data["checkpoints"]
        if data.get("format") != MANIFEST_FORMAT or not isinstance(names, list):
            raise ValueError("not a checkpoint manifest")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RunError(f"{path} is not a readable checkpoint manifest ({exc}): restore it, or "
                       "start a new run with --out") from None
    return [n for n in names if isinstance(n, str) and checkpoint_step(n) is not None]


def _write_manifest(run_dir: Path, names: list[str]) -> None:
    names = sorted(set(names), key=checkpoint_step)
    write_json_atomic(run_dir / MANIFEST_FILE, {"format": MANIFEST_FORMAT, "checkpoints": names})


def read_pointer(run_dir) -> str | None:
    """The checkpoint name in ``latest`` when it is one (anything else reads as None)."""
    try:
        text = (Path(run_dir) / "latest").read_bytes().decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if checkpoint_step(text) is not None else None


def is_complete(path: Path) -> bool:
    """A real directory (not a link) holding the state file, which a save writes last."""
    return path.is_dir() and not path.is_symlink() and (path / STATE_FILE).is_file()


def run_checkpoints(run_dir) -> list[str]:
    """Names of the run's checkpoints (complete or not), oldest first: the manifest's; for a run
    without one, the ``checkpoint-NNNNNNN`` directories."""
    run_dir = Path(run_dir)
    names = read_manifest(run_dir)
    if names is None:
        try:
            names = [p.name for p in run_dir.iterdir() if checkpoint_step(p.name) is not None]
        except OSError:
            names = []
    return sorted(names, key=checkpoint_step)


def latest_checkpoint(run_dir) -> Path | None:
    """The newest complete checkpoint of a run (the highest step the run wrote), or None.

    Derived from the manifest, not from ``latest``, which may be stale after a crash."""
    run_dir = Path(run_dir)
    done = [run_dir / n for n in run_checkpoints(run_dir) if is_complete(run_dir / n)]
    return done[-1] if done else None


def repair_latest(run_dir) -> Path | None:
    """Point ``latest`` at :func:`latest_checkpoint` when it names another (or nothing)."""
    run_dir = Path(run_dir)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None and read_pointer(run_dir) != ckpt.name:
        _write_pointer(run_dir, ckpt.name)
    return ckpt


def _write_pointer(run_dir: Path, name: str) -> None:
    (run_dir / "latest.tmp").write_text(name + "\n")
    os.replace(run_dir / "latest.tmp", run_dir / "latest")


def owned_by_run(run_dir: Path) -> list[str]:
    """The checkpoint names clean-up may delete: the manifest's; for a run without a manifest
    only the one ``latest`` names (the one an older refmtp wrote last)."""
    names = read_manifest(run_dir)
    if names is not None:
        return names
    pointer = read_pointer(run_dir)
    return [pointer] if pointer else []


# -------------------------------------------------------------------------------------------
# saving
# -------------------------------------------------------------------------------------------
def write_checkpoint(run_dir: Path, step: int, contents: Callable[[Path], None]) -> Path:
    """Write checkpoint ``step`` of the run: ``contents(tmp_dir)`` fills a temporary directory
    (ending with STATE_FILE), which is renamed to its final name; then ``latest`` points to it
    and the run's older checkpoints are removed. Returns the checkpoint directory.

    A failure of the writer (an OSError, or safetensors' SafetensorError on a full disk) is
    raised as one-line :class:`CheckpointWriteError`, after removing the temporary directory;
    the previous checkpoint and ``latest`` are untouched."""
    run_dir = Path(run_dir)
    final = run_dir / checkpoint_name(step)
    owned = owned_by_run(run_dir)
    if final.name in owned and is_complete(final):
        _write_pointer(run_dir, final.name)
        return final  # already saved at this step: identical content
    if final.exists() and final.name not in owned:
        raise CheckpointWriteError(
            f"{final} exists but was not written by this run: move it away, then resume")
    tmp = run_dir / TMP_DIR
    if tmp.exists():
        shutil.rmtree(tmp)  # leftover of an interrupted save
    try:
        tmp.mkdir()
        contents(tmp)
    except Exception as exc:  # OSError, SafetensorError (not an OSError), ...
        shutil.rmtree(tmp, ignore_errors=True)
        detail = (str(exc).splitlines() or [type(exc).__name__])[0]
        previous = latest_checkpoint(run_dir)
        raise CheckpointWriteError(
            f"cannot write checkpoint {final.name} in {run_dir} ({type(exc).__name__}: "
            f"{detail}); "
            + (f"the previous checkpoint {previous} is intact" if previous else
               "no checkpoint was written")
            + "; free some space and continue with --resume"
        ) from None
    _fault_point("before_manifest", step)
    _write_manifest(run_dir, owned + [final.name])
    _fault_point("before_rename", step)
    if final.exists():
        shutil.rmtree(final)  # an incomplete directory of this run under the final name
    os.replace(tmp, final)
    _fault_point("after_rename", step)
    _write_pointer(run_dir, final.name)
    _fault_point("after_latest", step)
    for name in owned:
        old = run_dir / name
        if name != final.name and old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
    _write_manifest(run_dir, [final.name])
    return final


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics logged after ``step`` (written before a crash, past the checkpoint)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_bytes().splitlines():
        try:
            rec = json.loads(line)
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
                keep.append(line.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            break  # a torn last line
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------------
# one process per run directory
# -------------------------------------------------------------------------------------------
class RunLock:
    """An exclusive lock on a run directory: ``flock`` on ``DIR/.lock``, which holds the pid.

    The kernel drops the lock when its process dies, so a lock file left by a killed run is
    simply taken over. ``acquire`` raises RunError naming the holder's pid."""

    def __init__(self, run_dir):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def holder(self) -> str:
        try:
            text = self.path.read_bytes().decode("ascii", "replace").strip()
        except OSError:
            return "unknown"
        return text if text.isdigit() else "unknown"

    def acquire(self) -> "RunLock":
        if self.fd is not None:
            return self
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                elif _pid_alive(self.holder()):  # pragma: no cover - no flock
                    raise BlockingIOError
            except OSError:
                os.close(fd)
                raise RunError(
                    f"{self.path.parent} is in use by process {self.holder()} (lock file "
                    f"{self.path}): wait for it to finish or stop it; one process per run "
                    "directory"
                ) from None
            try:  # the file may have been removed and re-created while we waited
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except OSError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self.fd = fd
            return self
        raise RunError(f"cannot lock {self.path}: it keeps changing")  # pragma: no cover

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __del__(self):  # a trainer dropped without run(): free the directory
        try:
            self.release()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


def _pid_alive(pid: str) -> bool:  # pragma: no cover - only without fcntl
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
