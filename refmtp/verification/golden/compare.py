"""Comparison of finished outputs with a golden: tolerances, rows, reports, strict JSON equality.

Tolerances derive from the dtype only (docs/golden-format.md "Tolerances"): a tensor passes
iff ``|actual - expected| <= atol + rtol * |expected|`` elementwise. Routing indices compare
in a canonical order (each token's experts sorted by index, weights following). Acceptance
decisions compare with :func:`json_equal` (``true`` is not ``1``, ``3.0`` is not ``3``).
"""
from __future__ import annotations

import fnmatch
import json
import math
import re
from dataclasses import dataclass, field

import numpy as np  # host-side only: comparison of finished arrays

from refmtp.verification.golden.files import GoldenError

# Tolerances derived from the dtype only (docs/golden-format.md "Tolerances"): pass iff
# |actual - expected| <= atol + rtol * |expected| elementwise (numpy.isclose with expected as b).
TOLERANCES = {
    "float64": {"rtol": 1e-9, "atol": 1e-12},
    "float32": {"rtol": 1e-4, "atol": 1e-6},
    "int64": {"rtol": 0.0, "atol": 0.0},
}


def _dtype_class(a) -> str:
    kind = np.asarray(a).dtype
    if kind == np.float64:
        return "float64"
    if kind == np.float32:
        return "float32"
    if np.issubdtype(kind, np.integer):
        return "int64"
    raise ValueError(f"no tolerance rule for dtype {kind}")


def _pattern(name: str) -> str:
    """Tensor name -> its pattern: every integer path component becomes ``*``."""
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def tolerance_table(expected: dict, dtype: str) -> list[dict]:
    """The manifest's tolerance list, derived from each tensor's dtype (never hand-tuned).

    One entry per name pattern whose dtype differs from the case dtype ``dtype``, then a final
    catch-all ``*`` with the case dtype's tolerance. First matching pattern wins.
    """
    classes = {name: _dtype_class(a) for name, a in expected.items()}
    main = dtype
    special = {}
    for name, cls in classes.items():
        if cls != main:
            special.setdefault(_pattern(name), set()).add(cls)
    table = []
    for pat in sorted(special):
        (cls,) = special[pat]  # one dtype per pattern by construction of the format
        table.append({"pattern": pat, "dtype": cls, **TOLERANCES[cls]})
    table.append({"pattern": "*", "dtype": main, **TOLERANCES[main]})
    return table


def tolerance_for(name: str, table: list[dict]) -> tuple[float, float]:
    """(atol, rtol) of the first pattern in ``table`` matching ``name`` (fnmatch rules)."""
    for entry in table:
        if fnmatch.fnmatchcase(name, entry["pattern"]):
            return float(entry["atol"]), float(entry["rtol"])
    raise GoldenError(f"manifest tolerances have no pattern matching {name!r}")


@dataclass
class Row:
    """One line of a verification table."""

    name: str
    status: str  # "pass" | "FAIL" | "missing" | "shape" | "not checked" | "extra"
    shape: tuple = ()
    max_abs: float = float("nan")
    max_rel: float = float("nan")
    atol: float = float("nan")
    rtol: float = float("nan")
    note: str = ""
    dtype: str = ""  # the expected tensor's dtype ("int64" rows print integers); "" for records

    @property
    def failed(self) -> bool:
        return self.status in ("FAIL", "missing", "shape")


# Row statuses and the summary word each counts under ("passed" + "failed" + "missing" +
# "not checked" = the number of expected tensors or records; "extra" rows are outside the golden).
NOT_CHECKED = "not checked"  # absent from the outputs under --allow-missing


@dataclass
class Report:
    """The verdict on one case directory."""

    case: str
    path: str
    kind: str  # "model" | "trajectory" | "decode" | "speculative" | "acceptance"
    mode: str  # "recompute (numpy)" | "against FILE" | "replay (numpy)"
    rows: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    # lines after the summary: "HINT: ..." (what the user probably has to change) and, for a
    # speculative case, "first divergence: step s (why): ..."
    hints: list = field(default_factory=list)

    def counts(self) -> dict:
        """{passed, failed, missing, not checked, extra}; the first four add up to the number of
        expected tensors (or records)."""
        c = {"passed": 0, "failed": 0, "missing": 0, NOT_CHECKED: 0, "extra": 0}
        for r in self.rows:
            key = {"pass": "passed", "FAIL": "failed", "shape": "failed", "missing": "missing",
                   NOT_CHECKED: NOT_CHECKED, "skipped": NOT_CHECKED, "extra": "extra"}.get(r.status, "failed")
            c[key] += 1
        return c

    @property
    def status(self) -> str:
        # nothing compared (every key missing, even if allowed) is never a pass
        compared = any(r.status in ("pass", "FAIL", "shape") for r in self.rows)
        return "mismatch" if not compared or any(r.failed for r in self.rows) else "pass"

    @property
    def exit_code(self) -> int:
        return 0 if self.status == "pass" else 1


def _canonical_routing(tensors: dict) -> dict:
    """Sort each token's selected experts by expert index (weights follow), so that an
    implementation returning top-K in another order compares equal."""
    out = dict(tensors)
    for name in tensors:
        m = re.fullmatch(r"routing\.(\d+)\.topk_idx", name)
        wname = f"routing.{m.group(1)}.topk_weight" if m else None
        if m and wname in tensors:
            idx = np.asarray(tensors[name])
            w = np.asarray(tensors[wname])
            if idx.shape == w.shape and idx.ndim >= 1:
                order = np.argsort(idx, axis=-1, kind="stable")
                out[name] = np.take_along_axis(idx, order, axis=-1)
                out[wname] = np.take_along_axis(w, order, axis=-1)
    return out


def _value_str(x: float, integer: bool) -> str:
    """One element for a report note: an integer when the tensor holds integers."""
    if integer and math.isfinite(x) and float(x).is_integer():
        return str(int(x))
    return repr(float(x))


def compare_tensor(name: str, expected, actual, atol: float, rtol: float) -> Row:
    e = np.asarray(expected)
    a = np.asarray(actual)
    dtype = str(e.dtype)
    if tuple(a.shape) != tuple(e.shape):
        return Row(name, "shape", tuple(e.shape), atol=atol, rtol=rtol,
                   note=f"shape {tuple(a.shape)}, expected {tuple(e.shape)}", dtype=dtype)
    e64 = e.astype(np.float64)
    a64 = a.astype(np.float64)
    if e64.size == 0:
        return Row(name, "pass", tuple(e.shape), 0.0, 0.0, atol, rtol, dtype=dtype)
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.abs(a64 - e64)
        finite = np.isfinite(a64)
        err = np.where(finite, err, np.inf)
        nz = e64 != 0
        rel = np.where(nz, err / np.where(nz, np.abs(e64), 1.0), 0.0)
        ok = bool(np.all(err <= atol + rtol * np.abs(e64)))
    max_abs = float(err.max())
    max_rel = float(rel.max()) if nz.any() else (0.0 if max_abs == 0 else float("inf"))
    note = ""
    if not ok:
        worst = np.unravel_index(int(np.argmax(err - rtol * np.abs(e64))), e.shape)
        integer = np.issubdtype(e.dtype, np.integer)
        note = (f"worst at {tuple(int(i) for i in worst)}: got "
                f"{_value_str(a64[worst], integer and np.issubdtype(a.dtype, np.integer))}, "
                f"expected {_value_str(e64[worst], integer)}")
    return Row(name, "pass" if ok else "FAIL", tuple(e.shape), max_abs, max_rel, atol, rtol, note,
               dtype=dtype)


def compare_tensors(expected: dict, actual: dict, table: list[dict], *,
                    allow_missing: bool = False) -> list[Row]:
    """One Row per expected tensor (missing ones listed), plus ``extra`` rows (not failures)."""
    expected = _canonical_routing(expected)
    actual = _canonical_routing(actual)
    rows = []
    for name in sorted(expected):
        atol, rtol = tolerance_for(name, table)
        if name not in actual:
            rows.append(Row(name, "missing" if not allow_missing else NOT_CHECKED,
                            tuple(np.shape(expected[name])), atol=atol, rtol=rtol,
                            note="not in the outputs", dtype=str(np.asarray(expected[name]).dtype)))
            continue
        rows.append(compare_tensor(name, expected[name], actual[name], atol, rtol))
    for name in sorted(set(actual) - set(expected)):
        rows.append(Row(name, "extra", tuple(np.shape(actual[name])), note="not in the golden (ignored)"))
    return rows


def json_equal(a, b) -> bool:
    """Equality of JSON values with their types: ``true`` is not ``1``, ``3.0`` is not ``3``.

    Python's ``==`` says ``True == 1`` and ``3.0 == 3``; here booleans, integers and floats are
    three different types, and lists and objects are compared element by element the same way.
    """
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int) or isinstance(b, int):
        return isinstance(a, int) and isinstance(b, int) and a == b
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, float) and isinstance(b, float) and a == b
    if isinstance(a, str) or isinstance(b, str):
        return isinstance(a, str) and isinstance(b, str) and a == b
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    return False  # different containers, or not JSON values at all


def json_str(x) -> str:
    """A value as JSON writes it (true, 1, 1.0, [0, 2]), so type differences show in reports."""
    try:
        return json.dumps(x)
    except (TypeError, ValueError):
        return repr(x)
