"""A verification report as text: the per-tensor (or per-record) table, the summary, hints."""
from __future__ import annotations

import math

from refmtp.verification.golden.compare import NOT_CHECKED, Report


def _fmt(x: float, integer: bool = False) -> str:
    if isinstance(x, float) and math.isnan(x):
        return "-"
    if integer and math.isfinite(x) and float(x).is_integer():
        return str(int(x))  # int64 tensors (routing indices, loads): errors are whole numbers
    return f"{x:.2e}"


def format_report(report: Report, *, verbose: bool = True) -> str:
    """A per-tensor (or per-record) table plus a summary line.

    The text is a plain list of lines joined at the end (header, notes, table, summary, name
    lists, hints); the summary counts (:meth:`Report.counts`) add up to the expected tensors
    or records.
    """
    lines = [f"case {report.case} [{report.kind}] {report.mode}: {report.path}"]
    lines += [f"  note: {n}" for n in report.notes]
    rows = [r for r in report.rows if r.status != "extra" and (verbose or r.failed)]
    if report.kind != "acceptance" and rows:
        w = max(28, *(len(r.name) for r in rows))
        lines.append(f"  {'tensor':<{w}} {'shape':<16} {'max abs err':>11} {'max rel err':>11} "
                     f"{'atol':>8} {'rtol':>8}  result")
        for r in rows:
            shape = "x".join(str(s) for s in r.shape) or "()"
            i = r.dtype.startswith(("int", "uint"))
            lines.append(f"  {r.name:<{w}} {shape:<16} {_fmt(r.max_abs, i):>11} {_fmt(r.max_rel):>11} "
                         f"{_fmt(r.atol, i):>8} {_fmt(r.rtol, i):>8}  {r.status}"
                         + (f"  {r.note}" if r.note and r.status != "pass" else ""))
    elif rows:
        w = max(12, *(len(r.name) for r in rows))
        lines.append(f"  {'record':<{w}}  result")
        for r in rows:
            lines.append(f"  {r.name:<{w}}  {r.status}" + (f"  {r.note}" if r.note else ""))
    c = report.counts()
    missing = [r.name for r in report.rows if r.status == "missing"]
    extra = [r.name for r in report.rows if r.status == "extra"]
    skipped = [r.name for r in report.rows if r.status in (NOT_CHECKED, "skipped")]
    checked = c["passed"] + c["failed"]
    expected_n = checked + c["missing"] + c[NOT_CHECKED]
    what = "expected tensors" if report.kind != "acceptance" else "expected records"
    summary = (f"  {report.status.upper()}: {c['passed']} passed, {c['failed']} failed, "
               f"{c['missing']} missing")
    if c[NOT_CHECKED]:
        summary += f", {c[NOT_CHECKED]} not checked"
    summary += f" (of {expected_n} {what})"
    lines.append(summary)
    if missing:
        lines.append(f"  missing ({len(missing)}): {_names(missing)}")
    if skipped:
        lines.append(f"  not checked, absent from the outputs ({len(skipped)}): {_names(skipped)}")
    if extra:
        lines.append(f"  ignored, not in the golden ({len(extra)}): {_names(extra)}")
    if report.rows and checked == 0 and (missing or skipped):
        lines.append("  the outputs share no name with the golden: use its key names ("
                     + ("the record names of records.json" if report.kind == "acceptance" else
                        "logits, mtp_logits.1, loss.total, grad.<checkpoint name>, ...")
                     + "; docs/golden-format.md)")
    lines += [f"  {h}" for h in report.hints]
    return "\n".join(lines)


def _names(names: list, limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" ... (+{len(names) - limit} more)" if len(names) > limit else "")
