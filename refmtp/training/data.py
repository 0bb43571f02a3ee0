"""Byte-level training data: a corpus, its held-out split, and seeded random windows.

Tokens are bytes (vocabulary 256): no tokenizer to download, nothing to train.

The default corpus (no ``--data``) is the source of the running Python's standard library: every
``.py`` file under ``sysconfig.get_paths()["stdlib"]``, concatenated in sorted POSIX relative
path order. It exists on every machine that runs refmtp and is the same for a given Python
version, so it leaves out what differs between installations of one version:

* ``site-packages`` / ``dist-packages`` (whatever happens to be installed);
* test directories (``test``, ``tests``, ``idle_test``) and the packages some Linux
  distributions ship separately (``idlelib``, ``tkinter``, ``turtledemo``, ``lib2to3``,
  ``distutils``, ``ensurepip``);
* build-specific files (``_sysconfigdata*.py``, ``config-*`` directories), caches and hidden
  entries.

``--data PATH`` takes a text file or a directory (every non-hidden regular file below it, sorted
by relative path; the bytes are used as they are).

Held-out split (never trained on): the last 5% of the files (at least one) when the corpus has
20 files or more, otherwise the last 5% of the bytes. ``Corpus.fingerprint`` (sha256 over the
file names and bytes) lets a resumed run check that it sees the same data.

Windows: ``B`` random windows of ``T + 1`` tokens per step, offsets drawn on the host from a
numpy PCG64 generator (:class:`refmtp.backends.HostRNG`) whose state is saved with every
checkpoint. The held-out windows are fixed (evenly spaced), so evaluations are comparable
across steps and across runs. Windows go to the backend as int64 with ``bk.asarray``.
"""
from __future__ import annotations

import hashlib
import math
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np  # host bookkeeping only: the byte buffer and window offsets

VOCAB_SIZE = 256
HELDOUT_FRACTION = 0.05
MIN_FILES_FOR_FILE_SPLIT = 20

STDLIB_EXCLUDED_DIRS = frozenset({
    "site-packages", "dist-packages", "__pycache__",
    "test", "tests", "idle_test",
    "idlelib", "tkinter", "turtledemo", "lib2to3", "distutils", "ensurepip",
})


@dataclass(frozen=True)
class Corpus:
    """A byte corpus split into training and held-out tokens (host uint8 arrays)."""

    source: str  # "python-stdlib" or the resolved --data path
    description: str  # one line for the user
    files: tuple  # relative paths, in order ("" for a single file)
    train: np.ndarray  # (N_train,) uint8
    heldout: np.ndarray  # (N_heldout,) uint8
    split: str  # "files" | "bytes"
    fingerprint: str  # sha256 hex over names and bytes

    def summary(self) -> dict:
        return {
            "source": self.source,
            "files": len(self.files),
            "split": self.split,
            "train_tokens": int(self.train.size),
            "heldout_tokens": int(self.heldout.size),
            "fingerprint": self.fingerprint,
        }


def stdlib_files() -> tuple[Path, list[str]]:
    """The stdlib root and the sorted relative paths of its ``.py`` files (see module doc)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [
            d for d in dirnames
            if d not in STDLIB_EXCLUDED_DIRS and not d.startswith((".", "config-"))
        ]
        for f in filenames:
            if f.endswith(".py") and not f.startswith(("_sysconfigdata", ".")):
                rel.append((Path(dirpath) / f).relative_to(root).as_posix())
    return root, sorted(rel)


def _dir_files(root: Path) -> list[str]:
    rel = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            p = Path(dirpath) / f
            if not f.startswith(".") and p.is_file():
                rel.append(p.relative_to(root).as_posix())
    return sorted(rel)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(
            f"cannot read {path}: {exc.strerror or exc}; check the path and its permissions"
        ) from None


def load_corpus(path=None) -> Corpus:
    """Load the default corpus (``path=None``) or a text file / directory of text files.

    Raises ValueError (one line) for a missing or unreadable path and for an empty corpus.
    """
    if path is None:
        root, names = stdlib_files()
        source = "python-stdlib"
        version = ".".join(map(str, sys.version_info[:2]))
        where = f"Python {version} standard library source ({root})"
    else:
        root = Path(path).expanduser()
        if not root.exists():
            raise ValueError(f"data path {path} does not exist: pass a text file or a directory")
        root = root.resolve()
        source = str(root)
        if root.is_dir():
            try:
                names = _dir_files(root)
            except OSError as exc:
                raise ValueError(f"cannot list {root}: {exc.strerror or exc}") from None
            where = str(root)
        elif root.is_file():
            names = [""]
            where = str(root)
        else:
            raise ValueError(f"data path {path} is neither a file nor a directory")
    parts = [_read(root / n if n else root) for n in names]
    total = sum(len(p) for p in parts)
    if total == 0:
        what = "directory has no non-hidden files" if not names else "files are empty"
        raise ValueError(f"corpus {where} is empty ({what}): pass --data with some text")

    digest = hashlib.sha256()
    for n, p in zip(names, parts):
        digest.update(n.encode() + b"\0" + str(len(p)).encode() + b"\0")
        digest.update(p)

    if len(names) >= MIN_FILES_FOR_FILE_SPLIT:
        n_held = max(1, math.ceil(HELDOUT_FRACTION * len(names)))
        train_b = b"".join(parts[:-n_held])
        held_b = b"".join(parts[-n_held:])
        split = "files"
        desc = (f"{where}: {len(names)} files, held out the last {n_held} files "
                f"({len(held_b):,} bytes)")
    else:
        data = b"".join(parts)
        n_held = max(1, math.ceil(HELDOUT_FRACTION * len(data)))
        train_b, held_b = data[:-n_held], data[-n_held:]
        split = "bytes"
        desc = (f"{where}: {len(names)} file(s), held out the last {n_held:,} bytes (5%)")
    train = np.frombuffer(train_b, dtype=np.uint8).copy()  # (N_train,)
    held = np.frombuffer(held_b, dtype=np.uint8).copy()  # (N_heldout,)
    return Corpus(source=source, description=desc, files=tuple(names), train=train,
                  heldout=held, split=split, fingerprint=digest.hexdigest())


def check_window(corpus: Corpus, seq_len: int) -> None:
    """Both splits must hold at least one window of ``seq_len + 1`` tokens."""
    need = seq_len + 1
    for name, arr in (("training", corpus.train), ("held-out", corpus.heldout)):
        if arr.size < need:
            raise ValueError(
                f"the {name} split of {corpus.source} has {arr.size} tokens, fewer than one "
                f"window of seq_len+1={need}: use more data or a smaller --seq-len"
            )


class WindowSampler:
    """Random training windows ``(B, T+1)`` drawn with a seeded host PCG64 generator.

    ``state()``/``set_state()`` capture the generator and the number of batches drawn, so a
    resumed run draws exactly the windows the uninterrupted run would have drawn.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, backend):
        self.tokens = tokens  # (N,) uint8
        self.seq_len = int(seq_len)
        self.backend = backend
        self.rng = backend.rng(seed)  # HostRNG: numpy PCG64 on the host
        self.batches = 0
        if tokens.size < self.seq_len + 1:
            raise ValueError(f"{tokens.size} tokens cannot hold a window of {self.seq_len + 1}")
        self._span = np.arange(self.seq_len + 1)  # (T+1,)

    def next_host(self, batch_size: int) -> np.ndarray:
        """The next batch on the host: (B, T+1) uint8."""
        high = self.tokens.size - self.seq_len  # offsets 0 .. N-T-1, windows end at N-1
        starts = self.rng.host_integers(0, high, (batch_size,))  # (B,)
        self.batches += 1
        return self.tokens[starts[:, None] + self._span[None, :]]  # (B, T+1)

    def next(self, batch_size: int):
        """The next batch on the backend: (B, T+1) int64."""
        return self.backend.asarray(self.next_host(batch_size), dtype="int64")

    def state(self) -> dict:
        return {"bit_generator": self.rng.get_state(), "batches": self.batches}

    def set_state(self, state: dict) -> None:
        self.rng.set_state(state["bit_generator"])
        self.batches = int(state["batches"])


def heldout_windows(tokens: np.ndarray, seq_len: int, n_windows: int) -> np.ndarray:
    """``n_windows`` fixed, evenly spaced windows (n, T+1) uint8 covering the held-out split."""
    last = tokens.size - (seq_len + 1)  # last valid start
    if last < 0:
        raise ValueError(f"{tokens.size} held-out tokens cannot hold a window of {seq_len + 1}")
    n = max(1, int(n_windows))
    starts = np.linspace(0, last, n).round().astype(np.int64)  # (n,)
    return tokens[starts[:, None] + np.arange(seq_len + 1)[None, :]]  # (n, T+1)
