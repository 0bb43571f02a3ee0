"""Acceptance-rule cases (docs/speculative-decoding.md §2.2 RNG-v1, §2.4 R11): ``records.json``.

Each record holds the inputs of one verification step as exact decimal strings of dyadic
rationals and the decision ``verify_drafts`` computes for them; verifying replays every
record (exact), or compares another implementation's decisions (a JSON object) strictly.
"""
from __future__ import annotations

import json
import math
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np  # host-side only: float32 exactness checks and the replayed rows

from refmtp.backends import get_backend
from refmtp.inference.acceptance import verify_drafts
from refmtp.verification.golden.compare import NOT_CHECKED, Report, Row, json_equal, json_str
from refmtp.verification.golden.files import (ACCEPTANCE_FILE, FORMAT, FORMAT_VERSION, MANIFEST,
                                              GoldenError, check_out_dir, read_json, replace_dir,
                                              write_json)
from refmtp.verification.golden.manifest import file_entries, refmtp_version

ACCEPTANCE_FORMAT = "refmtp-golden-acceptance"


def dyadic_str(x, *, float32: bool = True) -> str:
    """Exact decimal string of a dyadic rational (float, int, Fraction or decimal string).

    Every float64 is dyadic, so the string always round-trips through ``float``. With
    ``float32`` (probabilities and logits, R11) the value must also be exactly a float32, so
    float32 stacks see the same numbers. Infinite logits are written "inf" / "-inf".
    """
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    f = Fraction(x)
    den = f.denominator
    if den & (den - 1):
        raise ValueError(f"{x!r} is not a dyadic rational (denominator {den} is not a power of 2)")
    if Fraction(float(f)) != f:
        raise ValueError(f"{x!r} is not exactly representable in float64")
    if float32 and Fraction(float(np.float32(float(f)))) != f:
        raise ValueError(f"{x!r} is not exactly a float32 (R11 wants the same numbers in float32 "
                         "and float64): use fewer binary digits")
    m = den.bit_length() - 1  # f = n / 2^m = n 5^m / 10^m, n odd when m > 0: no trailing zeros
    digits = str(abs(f.numerator) * 5 ** m).rjust(m + 1, "0")
    text = digits if m == 0 else f"{digits[:-m]}.{digits[-m:]}"
    return ("-" if f < 0 else "") + text


def parse_dyadic(s, where: str, *, allow_inf: bool = False) -> float:
    """A decimal string from a records file -> float, checked to be exact (else GoldenError)."""
    if not isinstance(s, str):
        raise GoldenError(f"{where}: numbers are exact decimal strings, got {s!r}")
    if allow_inf and s in ("inf", "-inf"):
        return float(s)
    try:
        f = Fraction(s)
    except (ValueError, ZeroDivisionError):
        raise GoldenError(f"{where}: {s!r} is not a decimal number") from None
    x = float(f)
    if Fraction(x) != f:
        raise GoldenError(f"{where}: {s!r} is not exactly representable in float64 (not dyadic)")
    return x


def _rows(value, where, allow_inf=False):
    if value is None:
        return None
    if not isinstance(value, list) or not all(r is None or isinstance(r, list) for r in value):
        raise GoldenError(f"{where}: expected a list of rows or null")
    return [None if r is None else [parse_dyadic(v, f"{where}[{i}]", allow_inf=allow_inf) for v in r]
            for i, r in enumerate(value)]


def result_dict(result) -> dict:
    """verify_drafts' 4-tuple -> the record's expected object (plain JSON types)."""
    num_accepted, tokens, residual_fallback, is_bonus = result
    return {"num_accepted": int(num_accepted), "tokens": [int(t) for t in tokens],
            "residual_fallback": bool(residual_fallback), "is_bonus": bool(is_bonus)}


ACCEPTANCE_INPUT_KEYS = ("case", "V", "K", "drafts", "q", "p", "u_accept", "u_sample", "greedy", "logits")


def record_inputs(rec: dict, where: str) -> dict:
    """Parse one record's inputs into floats (exactness checked) for verify_drafts."""
    for key in ACCEPTANCE_INPUT_KEYS:
        if key not in rec:
            raise GoldenError(f"{where} lacks {key!r}")
    u_accept = rec["u_accept"]
    if u_accept is not None and not isinstance(u_accept, list):
        raise GoldenError(f"{where}.u_accept: expected a list or null")
    if not isinstance(rec["drafts"], list) or not all(isinstance(d, int) for d in rec["drafts"]):
        raise GoldenError(f"{where}.drafts: expected a list of integers")
    return {
        "p": _rows(rec["p"], f"{where}.p"),
        "q": _rows(rec["q"], f"{where}.q"),
        "drafts": list(rec["drafts"]),
        "u_accept": None if u_accept is None else [parse_dyadic(u, f"{where}.u_accept") for u in u_accept],
        "u_sample": None if rec["u_sample"] is None else parse_dyadic(rec["u_sample"], f"{where}.u_sample"),
        "greedy": bool(rec["greedy"]),
        "logits": _rows(rec["logits"], f"{where}.logits", allow_inf=True),
    }


def run_record(inputs: dict, backend="numpy") -> dict:
    """Replay one record through refmtp.inference.acceptance.verify_drafts on ``backend``."""
    bk = get_backend(backend) if isinstance(backend, str) else backend

    def arr(rows):
        if rows is None:
            return None
        return bk.asarray(np.asarray(rows, dtype=np.float64), dtype="float64")  # (rows, V)

    result = verify_drafts(arr(inputs["p"]), arr(inputs["q"]), list(inputs["drafts"]),
                           inputs["u_accept"], inputs["u_sample"], greedy=inputs["greedy"],
                           logits=arr(inputs["logits"]))
    return result_dict(result)


def acceptance_record(case: dict) -> dict:
    """One golden record from a builder's input dict (``refmtp.verification.acceptance_cases.dyadic_cases`` keys:
    case, pins, V, K, drafts, q, p, u_accept, u_sample, greedy, logits): numbers become exact
    decimal strings, ``expected`` is computed by verify_drafts (never typed)."""
    def rows(r, float32=True):
        return None if r is None else [[dyadic_str(v, float32=float32) for v in row] for row in r]

    ua, us = case.get("u_accept"), case.get("u_sample")
    rec = {
        "case": str(case["case"]),
        "pins": str(case.get("pins", case.get("description", ""))),
        "V": int(case["V"]),
        "K": int(case["K"]),
        "drafts": [int(d) for d in case["drafts"]],
        "q": rows(case.get("q")),
        "p": rows(case.get("p")),
        # the coins need only be exact float64 (the worked cases of docs/speculative-decoding.md §2.4 use 0.7 and 0.2)
        "u_accept": None if ua is None else [dyadic_str(u, float32=False) for u in ua],
        "u_sample": None if us is None else dyadic_str(us, float32=False),
        "greedy": bool(case.get("greedy", False)),
        "logits": rows(case.get("logits")),
    }
    if rec["K"] != len(rec["drafts"]):
        raise ValueError(f"record {rec['case']}: K={rec['K']} but {len(rec['drafts'])} drafts")
    rec["expected"] = run_record(record_inputs(rec, f"record {rec['case']}"))
    return rec


def export_acceptance_case(out_dir, records: list[dict], *, name: str | None = None,
                           description: str = "", command: str = "", extra: dict | None = None) -> dict:
    """Write ``records.json`` + ``manifest.json``; records come from :func:`acceptance_record`."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    name = name or out_dir.name
    names = [r["case"] for r in records]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"acceptance record names must be unique; repeated: {', '.join(dup[:5])}")
    body = {
        "format": ACCEPTANCE_FORMAT,
        "format_version": FORMAT_VERSION,
        "rule": "RNG-v1 (docs/golden-format.md; docs/speculative-decoding.md §2.2, R1-R7)",
        "records": records,
    }
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write_json(tmp / ACCEPTANCE_FILE, body)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": "acceptance",
        "case": name,
        "description": description,
        "refmtp_version": refmtp_version(),
        "dtype": "float64",
        "command": command,
        "records": len(records),
        "tolerances": [{"pattern": "*", "atol": 0.0, "rtol": 0.0, "dtype": "exact"}],
        "files": file_entries(tmp, (ACCEPTANCE_FILE,)),
    }
    if extra:
        manifest.update(extra)
    write_json(tmp / MANIFEST, manifest)
    replace_dir(tmp, out_dir)
    return manifest


def read_records(case_dir) -> list[dict]:
    path = Path(case_dir) / ACCEPTANCE_FILE
    body = read_json(path, "acceptance records")
    if not isinstance(body, dict) or body.get("format") != ACCEPTANCE_FORMAT:
        raise GoldenError(f"{path} is not a {ACCEPTANCE_FORMAT} file")
    if not isinstance(body.get("records"), list) or not body["records"]:
        raise GoldenError(f"{path} has no records")
    for i, rec in enumerate(body["records"]):
        if not isinstance(rec, dict) or not isinstance(rec.get("expected"), dict):
            raise GoldenError(f"{path}: record {i} is not an object with 'expected'")
    return body["records"]


ACCEPTANCE_RESULT_KEYS = ("num_accepted", "tokens", "residual_fallback", "is_bonus")


def verify_acceptance(case_dir: Path, m: dict, backend: str, against, allow_missing: bool) -> Report:
    """Replay every record of an acceptance case on ``backend`` (exact), or compare the decisions
    of ``against`` (a JSON object case -> result) strictly (:func:`json_equal`)."""
    records = read_records(case_dir)
    rows = []
    if against is not None:
        other = _read_acceptance_outputs(against)
        mode = f"against {against}"
    else:
        mode = f"replay ({backend})"
    for i, rec in enumerate(records):
        name = str(rec.get("case", f"#{i}"))
        want = rec["expected"]
        if against is not None:
            got = other.get(name)
            if got is None:
                rows.append(Row(name, NOT_CHECKED if allow_missing else "missing", note="not in the outputs"))
                continue
        else:
            inputs = record_inputs(rec, f"{case_dir / ACCEPTANCE_FILE} record {name}")
            try:
                got = run_record(inputs, backend)
            except ValueError as exc:
                got = {"error": str(exc).splitlines()[0]}
        if not isinstance(got, dict):
            rows.append(Row(name, "FAIL", note=f"got {json_str(got)}, expected an object "
                                               "{num_accepted, tokens, residual_fallback, is_bonus}"))
            continue
        absent = object()
        diff = [k for k in ACCEPTANCE_RESULT_KEYS
                if not json_equal(got.get(k, absent), want.get(k, absent))]
        if diff:
            rows.append(Row(name, "FAIL", note="; ".join(
                f"{k}: got {json_str(got[k]) if k in got else '(absent)'}, expected {json_str(want.get(k))}"
                for k in diff) + (f" ({got['error']})" if "error" in got else "")))
        else:
            rows.append(Row(name, "pass", max_abs=0.0, max_rel=0.0, atol=0.0, rtol=0.0))
    if against is not None:
        known = {str(rec.get("case", f"#{i}")) for i, rec in enumerate(records)}
        for name in sorted(set(other) - known):
            rows.append(Row(name, "extra", note="not in the golden (ignored)"))
    return Report(m["case"], str(case_dir), "acceptance", mode, rows)


def _read_acceptance_outputs(against) -> dict:
    """``--against`` for an acceptance case: a JSON object case -> result (or a list of records)."""
    path = Path(against)
    what = ("a JSON object case -> {num_accepted, tokens, residual_fallback, is_bonus} "
            "(docs/golden-format.md section 2)")
    if path.is_file():
        with open(path, "rb") as f:
            head = f.read(9)
        n = int.from_bytes(head[:8], "little")
        if len(head) == 9 and head[8:9] == b"{" and 8 + n <= path.stat().st_size:
            raise GoldenError(f"outputs file {against} is a safetensors file, but an acceptance case "
                              f"compares decisions: JSON expected, {what}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GoldenError(f"outputs file {against} does not exist") from None
    except (OSError, UnicodeDecodeError):
        raise GoldenError(f"outputs file {against} is not text: JSON expected, {what}") from None
    try:
        other = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GoldenError(f"outputs file {against} is not valid JSON ({exc.msg} at line {exc.lineno}): "
                          f"JSON expected, {what}") from None
    if isinstance(other, list):
        other = {r.get("case"): r.get("expected", r) for r in other if isinstance(r, dict)}
    if not isinstance(other, dict):
        raise GoldenError(f"outputs file {against}: JSON expected, {what}; got a JSON {type(other).__name__}")
    return {str(k): v for k, v in other.items()}
