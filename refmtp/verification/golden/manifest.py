"""A case directory's ``manifest.json``: reading and checking it, and the files it lists."""
from __future__ import annotations

from pathlib import Path

from refmtp import __version__
from refmtp.verification.golden.files import (ACCEPTANCE_FILE, FORMAT, FORMAT_VERSION, MANIFEST,
                                              MODEL_FILES, GoldenError, read_json, sha256_file,
                                              sniff)

KINDS = ("model", "trajectory", "acceptance", "decode", "speculative")
DECODE_OPS = ("append", "truncate")


def refmtp_version() -> str:
    return __version__


def file_entries(case_dir: Path, names) -> dict:
    return {n: {"bytes": (case_dir / n).stat().st_size, "sha256": sha256_file(case_dir / n)}
            for n in sorted(names)}


def read_manifest(case_dir) -> dict:
    """Read and check ``manifest.json`` of a case directory (format, version, fields)."""
    case_dir = Path(case_dir)
    if not case_dir.is_dir():
        raise GoldenError(f"{case_dir} is not a directory (give a golden case directory)")
    path = case_dir / MANIFEST
    if not path.is_file():
        raise GoldenError(f"{case_dir} has no {MANIFEST}: not a golden case directory")
    m = read_json(path, "manifest")
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise GoldenError(f"{path} is not a {FORMAT} manifest (format={m.get('format') if isinstance(m, dict) else None!r})")
    version = m.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise GoldenError(f"{path} has format_version {version!r}; this refmtp reads version "
                          f"{FORMAT_VERSION}: HINT upgrade refmtp or regenerate with `refmtp golden generate`")
    need = ["case", "kind", "files", "dtype"] + (["tolerances"] if m.get("kind") != "acceptance" else [])
    for key in need:
        if key not in m:
            raise GoldenError(f"{path} lacks the field {key!r}")
    if m["kind"] not in KINDS:
        raise GoldenError(f"{path}: kind {m['kind']!r} is not one of {', '.join(KINDS)}")
    if m["kind"] == "trajectory" and not isinstance(m.get("train"), dict):
        raise GoldenError(f"{path}: a trajectory case needs the 'train' settings object")
    if m["kind"] == "decode":
        check_schedule(m.get("schedule"), str(path))
    if m["kind"] == "speculative" and not isinstance(m.get("speculative"), dict):
        raise GoldenError(f"{path}: a speculative case needs the 'speculative' settings object")
    for entry in m.get("tolerances", []) if isinstance(m.get("tolerances"), list) else [None]:
        ok = isinstance(entry, dict) and isinstance(entry.get("pattern"), str) and all(
            isinstance(entry.get(k), (int, float)) and not isinstance(entry.get(k), bool)
            and entry[k] >= 0 for k in ("atol", "rtol"))
        if not ok:
            raise GoldenError(f"{path}: tolerances must be a list of {{pattern, atol >= 0, rtol >= 0}}, "
                              f"got {entry!r}")
    files = m["files"]
    if not isinstance(files, dict) or not files:
        raise GoldenError(f"{path}: files must be an object of name -> sha256")
    required = (ACCEPTANCE_FILE,) if m["kind"] == "acceptance" else MODEL_FILES
    for name in required:
        if name not in files:
            raise GoldenError(f"{path} does not list {name}, which a {m['kind']} case needs")
    for name, entry in files.items():
        if "/" in name or "\\" in name or name in ("", ".", "..") or not isinstance(entry, dict) \
                or not isinstance(entry.get("sha256"), str):
            raise GoldenError(f"{path}: bad files entry {name!r} (need a plain file name -> "
                              "{{sha256, bytes}})")
    return m


def check_files(case_dir, manifest: dict) -> None:
    """Every listed file exists with its sha256 and size; nothing unlisted lies beside them."""
    case_dir = Path(case_dir)
    for name, entry in sorted(manifest["files"].items()):
        path = case_dir / name
        if not path.is_file():
            raise GoldenError(f"manifest names {name} but {path} is not there")
        if name.endswith(".safetensors"):
            sniff(path, "golden file")
        size = path.stat().st_size
        if "bytes" in entry and size != entry["bytes"]:
            raise GoldenError(f"{path} has {size} bytes, the manifest says {entry['bytes']}: "
                              "truncated or tampered (HINT: regenerate with `refmtp golden generate`)")
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise GoldenError(f"{path} sha256 {digest[:16]}... does not match the manifest "
                              f"({entry['sha256'][:16]}...): tampered or corrupted (HINT: regenerate "
                              "with `refmtp golden generate`)")
    listed = set(manifest["files"]) | {MANIFEST}
    for path in sorted(case_dir.iterdir()):
        if path.name.startswith("."):
            continue
        if path.name not in listed:
            raise GoldenError(f"{path} is not listed in the manifest: remove it (a golden case "
                              "holds exactly the files its manifest names)")


def check_schedule(schedule, where: str) -> list[dict]:
    """A decode schedule: a list of {"op": "append", "n": >= 1} / {"op": "truncate", "length": m}
    whose first op appends and whose truncations only roll back."""
    if not isinstance(schedule, list) or not schedule:
        raise GoldenError(f"{where}: schedule must be a non-empty list of ops")
    length, out = 0, []
    for i, op in enumerate(schedule):
        kind = op.get("op") if isinstance(op, dict) else None
        if kind not in DECODE_OPS:
            raise GoldenError(f"{where}: schedule step {i} must be an object with op "
                              f"{' or '.join(DECODE_OPS)}, got {op!r}")
        key = "n" if kind == "append" else "length"
        val = op.get(key)
        if isinstance(val, bool) or not isinstance(val, int) or val < (1 if kind == "append" else 0) \
                or (kind == "truncate" and val > length):
            raise GoldenError(f"{where}: schedule step {i} ({kind}) needs {key} "
                              + ("an integer >= 1" if kind == "append" else f"in [0, {length}]")
                              + f", got {val!r}")
        length = length + val if kind == "append" else val
        out.append({"op": kind, key: val})
    if out[0]["op"] != "append":
        raise GoldenError(f"{where}: a schedule starts with an append (the prompt prefill)")
    return out
