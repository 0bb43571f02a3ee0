"""Golden bytes on disk: the format's file names, canonical JSON, sha256, safetensors.

Everything is host-side numpy. Unreadable, tampered or foreign files raise
:class:`GoldenError` with one line (the CLI exits 2 on it). Pickles and zip archives
(torch.save) are refused by their first bytes before any parser sees them.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np  # host-side only: file I/O of finished arrays
from safetensors.numpy import load, save

FORMAT = "refmtp-golden"
FORMAT_VERSION = 1
MODEL_FILES = ("config.json", "model.safetensors", "inputs.safetensors", "expected.safetensors")
ACCEPTANCE_FILE = "records.json"
MANIFEST = "manifest.json"
RECIPE = "recipe.json"


class GoldenError(Exception):
    """A golden file is unreadable, tampered, foreign or inconsistent (one-line message; exit 2)."""


def json_bytes(obj) -> bytes:
    """Canonical JSON: sorted keys, 2-space indent, ASCII, trailing newline (byte-stable)."""
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=True, allow_nan=False)
            + "\n").encode("ascii")


def write_json(path, obj) -> None:
    Path(path).write_bytes(json_bytes(obj))


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_tensors(path, tensors: dict) -> None:
    """Write host arrays to safetensors; the bytes depend only on names, dtypes and values."""
    arrays = {}
    for name in sorted(tensors):
        a = np.asarray(tensors[name])
        if not a.flags.c_contiguous:  # (np.ascontiguousarray would turn a 0-d scalar into 1-d)
            a = a.copy(order="C")
        if a.dtype not in (np.float64, np.float32, np.int64):
            raise ValueError(f"golden tensor {name} has dtype {a.dtype}: use float64, float32 or int64")
        arrays[name] = a
    Path(path).write_bytes(save(arrays, metadata={"format": FORMAT}))


def sniff(path: Path, what: str) -> None:
    """Refuse pickles and zip archives (torch.save) before any parser sees them.

    A safetensors file starts with its header length (u64 little-endian) and then ``{``; a
    pickle (protocol 2+) with ``0x80 <protocol>``; a torch.save zip with ``PK``.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    n = int.from_bytes(head[:8], "little")
    if len(head) == 9 and head[8:9] == b"{" and 8 + n <= size:
        return  # looks like safetensors; the parser checks the rest
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        raise GoldenError(f"{what} {path} is a Python pickle, not safetensors: refusing to load it "
                          "(golden files hold safetensors only)")
    if head[:2] == b"PK":
        raise GoldenError(f"{what} {path} is a zip archive (torch.save?), not safetensors: save "
                          "the outputs with safetensors (save_file)")
    if len(head) < 9:
        raise GoldenError(f"{what} {path} is truncated ({size} bytes): not a safetensors file")


def read_tensors(path, what: str = "file") -> dict:
    """Read a safetensors file into host arrays; anything else raises GoldenError (one line)."""
    path = Path(path)
    if not path.is_file():
        raise GoldenError(f"{what} {path} does not exist")
    sniff(path, what)
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise GoldenError(f"{what} {path} is not a safetensors file or is truncated "
                          f"(header length {n}, file size {len(data)})")
    try:
        return load(data)
    except Exception as exc:  # SafetensorError and friends: keep one line
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise GoldenError(f"{what} {path} is not a readable safetensors file: {msg}") from None


def read_json(path, what: str = "file"):
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GoldenError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise GoldenError(f"{what} {path} cannot be read: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise GoldenError(f"{what} {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def check_out_dir(out_dir: Path) -> None:
    """Only an empty directory or an earlier golden case may be replaced."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file: --out names the case directory to write")
    if any(out_dir.iterdir()):
        try:
            ours = json.loads((out_dir / MANIFEST).read_text()).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise ValueError(f"refusing to replace {out_dir}: it is not empty and not a golden case "
                             "(give a new or empty directory)")


def replace_dir(tmp: Path, out_dir: Path) -> None:
    check_out_dir(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
