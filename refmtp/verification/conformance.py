"""Conformance: the bug catalog run against the shipped golden cases, and verify's diagnosis.

    result = run_catalog(root)                  # every mutant (refmtp.mutation.CATALOG) x every case
    write_fingerprints(result, path)            # golden/conformance.json (generated, never typed)
    markdown = coverage_markdown(result)        # docs/conformance.md
    lines = diagnose(report, fingerprints)      # "first failing tensor" + "likely causes"

A mutant *covers* a case when refmtp, with that mutant switched on, fails the case's
verification (exit 1): some expected tensor or record no longer matches. Its *fingerprint* on the
case is the set of failing names with the order of magnitude of each one's error
(``round(log10(max relative error), 1)``). Diagnosis compares the fingerprint of an
implementation's failure with every mutant's on the same case (Jaccard overlap of the failing
names, then closeness of the error magnitudes) and ranks the catalog. docs/conformance.md
explains the method.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from refmtp.verification.golden.acceptance import read_records
from refmtp.verification.golden.files import ACCEPTANCE_FILE, GoldenError, read_json, read_tensors
from refmtp.verification.golden.manifest import read_manifest
from refmtp.verification.golden.recipe import case_dirs, shipped_dir
from refmtp.verification.golden.verify import recompute, verify_case
from refmtp.mutation import CATALOG, mutation

FINGERPRINTS = "conformance.json"
FORMAT = "refmtp-conformance"
TOP = 3  # likely causes printed by verify


# -------------------------------------------------------------------------------------------
# dataflow order of the golden tensor names
# -------------------------------------------------------------------------------------------
def _layer_of(name: str, n_layers: int) -> int:
    """Layer index in a parameter-like name (embedding first, final norm and lm_head last)."""
    m = re.search(r"model\.layers\.(\d+)\.", name)
    if m:
        return int(m.group(1))
    if "embed_tokens" in name:
        return -1
    return n_layers + 1_000  # model.norm, lm_head: after every layer


def dataflow_key(name: str, n_layers: int = 0) -> tuple:
    """Sort key: main forward, then MTP depths, routing, bias update, then gradients (lowest
    layer first); decode steps in order, each step's cache rows before its logits, then MTP
    module k's inputs, cache rows and logits (k = 1..D); trajectory
    losses before the final parameters."""
    parts = name.split(".")
    head = parts[0]
    if head == "spec":  # spec.{step}.{field}: steps in order, each in the order the loop computes
        if not parts[1].isdigit():
            return (0, 1 << 30, 0, 0, name)  # spec.final_tokens last
        order = ("draft_logits", "q", "drafts", "logits", "p", "num_accepted", "tokens", "cache_length")
        return (0, int(parts[1]), order.index(parts[2]) if parts[2] in order else len(order), 0, name)
    if head == "decode":  # decode.{step}.latent.{layer} / decode.{step}.logits
        step = int(parts[1])
        if parts[2] == "mtp":  # decode.{step}.mtp.{k}.{what}: module k after the main model, inputs first
            what = {"token_ids": 0, "positions": 1, "hidden": 2, "latent": 3, "logits": 4}.get(parts[4], 5)
            return (0, step, 1 + int(parts[3]), what, name)
        return (0, step, 0 if parts[2] == "latent" else 1, int(parts[3]) if len(parts) > 3 else 0, name)
    if head == "logits":
        return (1, 0, 0, 0, name)
    if name == "loss.main":
        return (1, 0, 1, 0, name)
    if head == "mtp_logits":
        return (2, int(parts[1]), 0, 0, name)
    if name.startswith("loss.mtp."):
        return (2, int(parts[2]), 1, 0, name)
    if head == "routing":
        return (3, int(parts[1]), {"topk_idx": 0, "topk_weight": 1, "load": 2}.get(parts[2], 3), 0, name)
    if name.startswith("loss."):
        return (4, 0, 0 if name == "loss.balance" else 1, 0, name)
    if head == "bias_after_update":
        return (5, int(parts[1]), 0, 0, name)
    if head == "trajectory":
        return (6, 0, 0, 0, name)
    if head in ("grad", "final"):
        return (7 if head == "grad" else 8, _layer_of(name, n_layers), 0, 0, name)
    return (9, 0, 0, 0, name)


# -------------------------------------------------------------------------------------------
# fingerprints
# -------------------------------------------------------------------------------------------
def _magnitude(row) -> float:
    """round(log10(max relative error), 1) of a failing row; a status word for missing/shape."""
    if row.status in ("missing", "shape"):
        return row.status
    rel = row.max_rel
    if not isinstance(rel, float) or math.isnan(rel):
        return 0.0
    if math.isinf(rel):
        return 99.0
    return round(math.log10(max(rel, 1e-300)), 1)


def fingerprint(report) -> dict:
    """{failing name: magnitude} of a verification report (empty when it passes)."""
    return {r.name: _magnitude(r) for r in report.rows if r.failed}


@dataclass
class CatalogResult:
    cases: dict  # case name -> {"kind", "sha256" of expected/records, "n": tensors or records}
    prints: dict  # mutant id -> {case name: fingerprint}; only cases the mutant fails
    errors: dict = field(default_factory=dict)  # mutant id -> {case: error line} (must stay empty)
    first: dict = field(default_factory=dict)  # mutant id -> (case, first failing name)


def _case_digest(case_dir: Path, m: dict) -> str:
    main = ACCEPTANCE_FILE if m["kind"] == "acceptance" else "expected.safetensors"
    return m["files"][main]["sha256"]


def n_layers(case_dir: Path) -> int:
    try:
        cfg = read_json(case_dir / "config.json", "config")
        return int(cfg.get("num_hidden_layers", 0))
    except GoldenError:
        return 0


def run_catalog(root=None, mutants=None, cases=None, log=None) -> CatalogResult:
    """Verify every case under ``root`` (default: the shipped cases) with each mutant on."""
    root = Path(root) if root else shipped_dir()
    dirs = case_dirs(root)
    if cases:
        dirs = [d for d in dirs if d.name in set(cases)]
    info = {}
    for d in dirs:
        m = read_manifest(d)
        base = verify_case(d)
        if base.status != "pass":
            raise GoldenError(f"case {d.name} fails without any mutant: fix refmtp or the case first")
        info[d.name] = {"kind": m["kind"], "sha256": _case_digest(d, m), "n": len(base.rows),
                        "layers": n_layers(d)}
    result = CatalogResult(cases={k: {x: v[x] for x in ("kind", "sha256", "n")} for k, v in info.items()},
                           prints={})
    chosen = [mu for mu in CATALOG if not mutants or mu.id in set(mutants)]
    for mu in chosen:
        prints, errors = {}, {}
        for d in dirs:
            try:
                with mutation(mu.id):
                    report = verify_case(d)
            except Exception as exc:  # a mutant must produce outputs, never crash
                errors[d.name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                continue
            fp = fingerprint(report)
            if fp:
                prints[d.name] = fp
        result.prints[mu.id] = prints
        if errors:
            result.errors[mu.id] = errors
        if prints:
            case = next(c for c in info if c in prints)  # the first catching case, case order
            first = min(prints[case], key=lambda n: dataflow_key(n, info[case]["layers"]))
            result.first[mu.id] = (case, first)
        if log:
            log(f"  {mu.id}: fails {len(prints)} of {len(dirs)} cases"
                + (f", ERRORS in {', '.join(errors)}" if errors else ""))
    return result


def catalog_digest() -> str:
    """sha256 of the catalog's ids, in order (fingerprints are stale when it changes)."""
    return hashlib.sha256("\n".join(m.id for m in CATALOG).encode()).hexdigest()


def _names(case_dir: Path, kind: str) -> list[str]:
    """The names a case compares, sorted: expected tensors, or record names."""
    if kind == "acceptance":
        return sorted(str(r.get("case")) for r in read_records(case_dir))
    return sorted(read_tensors(case_dir / "expected.safetensors", "golden file"))


def fingerprints_dict(result: CatalogResult, root=None) -> dict:
    """The stored form: per case its sorted names; per mutant and case ``"i:m i:m ..."`` with i
    the index of a failing name and m its magnitude (compact: the file ships with the cases)."""
    root = Path(root) if root else shipped_dir()
    names = {c: _names(root / c, info["kind"]) for c, info in result.cases.items()}
    index = {c: {n: i for i, n in enumerate(ns)} for c, ns in names.items()}
    mutants = {}
    for mid, per_case in result.prints.items():
        mutants[mid] = {c: " ".join(f"{index[c][n]}:{mag}" for n, mag in sorted(
            fp.items(), key=lambda kv: index[c][kv[0]])) for c, fp in per_case.items()}
    return {"format": FORMAT, "format_version": 1, "catalog_sha256": catalog_digest(),
            "note": "generated by `refmtp golden conformance --write`; never edit by hand",
            "cases": {c: {**info, "names": names[c]} for c, info in result.cases.items()},
            "mutants": mutants}


def write_fingerprints(result: CatalogResult, path, root=None) -> None:
    import json

    data = fingerprints_dict(result, root)
    Path(path).write_text(json.dumps(data, sort_keys=True, separators=(",", ":")) + "\n",
                          encoding="ascii")


def load_fingerprints(path=None) -> dict | None:
    """The stored fingerprints (default: the shipped golden/conformance.json) decoded to
    ``{"cases": ..., "mutants": {id: {case: {name: magnitude}}}}``, or None if absent."""
    path = Path(path) if path else shipped_dir() / FINGERPRINTS
    if not path.is_file():
        return None
    data = read_json(path, "conformance fingerprints")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise GoldenError(f"{path} is not a {FORMAT} file")
    try:
        mutants = {}
        for mid, per_case in data["mutants"].items():
            mutants[mid] = {}
            for case, text in per_case.items():
                names = data["cases"][case]["names"]
                fp = {}
                for item in text.split():
                    i, mag = item.split(":", 1)
                    fp[names[int(i)]] = mag if mag in ("missing", "shape") else float(mag)
                mutants[mid][case] = fp
    except (KeyError, ValueError, IndexError, AttributeError, TypeError) as exc:
        raise GoldenError(f"{path} is malformed ({type(exc).__name__}): regenerate it with "
                             "`refmtp golden conformance --write`") from None
    return {"cases": data["cases"], "mutants": mutants, "catalog_sha256": data.get("catalog_sha256")}


# -------------------------------------------------------------------------------------------
# diagnosis
# -------------------------------------------------------------------------------------------
def _similarity(observed: dict, candidate: dict) -> float:
    """Jaccard overlap of the failing names, weighted by how close the error magnitudes are."""
    union = observed.keys() | candidate.keys()
    if not union:
        return 0.0
    both = observed.keys() & candidate.keys()
    if not both:
        return 0.0
    close = []
    for name in both:
        a, b = observed[name], candidate[name]
        if isinstance(a, str) or isinstance(b, str):
            close.append(1.0 if a == b else 0.0)
        else:
            close.append(math.exp(-abs(a - b)))  # 1 for the same magnitude, 0.37 a decade apart
    return (len(both) / len(union)) * (0.8 + 0.2 * sum(close) / len(close))


def likely_causes(case: str, observed: dict, fingerprints: dict, top: int = TOP) -> list[tuple]:
    """[(score, mutant id), ...] best first: the catalog mutants whose failure on ``case`` looks
    most like ``observed`` ({failing name: magnitude}); ties keep catalog order."""
    order = {m.id: i for i, m in enumerate(CATALOG)}
    scored = []
    for mid, per_case in fingerprints.get("mutants", {}).items():
        fp = per_case.get(case)
        if fp:
            s = _similarity(observed, fp)
            if s > 0:
                scored.append((round(s, 6), mid))
    scored.sort(key=lambda t: (-t[0], order.get(t[1], len(order))))
    return scored[:top] if top else scored


def diagnose(report, fingerprints: dict | None, n_layers: int = 0, top: int = TOP) -> list[str]:
    """Lines for a failing report: the earliest failing tensor in dataflow order, then the
    likely causes from the catalog (best first). Empty for a passing report."""
    failing = [r for r in report.rows if r.failed]
    if not failing:
        return []
    first = min(failing, key=lambda r: dataflow_key(r.name, n_layers))
    what = {"missing": "missing from the outputs", "shape": f"wrong shape ({first.note})"}.get(
        first.status, first.note or "outside tolerance")
    lines = [f"  first failing {'record' if report.kind == 'acceptance' else 'tensor'} "
             f"(dataflow order): {first.name}: {what}"]
    if any("float32 but this case is float64" in h for h in getattr(report, "hints", [])):
        lines.append("  likely cause: the outputs' precision (float32 for a float64 case; see the "
                     "HINT above). The bug catalog is matched only at the case's own dtype.")
        return lines
    if not fingerprints:
        lines.append("  likely causes: no conformance fingerprints found (`refmtp golden conformance --write`)")
        return lines
    causes = likely_causes(report.case, fingerprint(report), fingerprints, top)
    if not causes:
        lines.append("  likely causes: none of the catalog's mutants fails this case this way "
                     "(docs/conformance.md lists them)")
        return lines
    by_id = {m.id: m for m in CATALOG}
    lines.append("  likely causes (bug catalog, best match first; docs/conformance.md):")
    for score, mid in causes:
        m = by_id.get(mid)
        text = m.what if m else "(not in this refmtp's catalog)"
        src = f" [{m.source}]" if m and m.source else ""
        lines.append(f"    {mid} (match {score:.2f}): {text}{src}")
    return lines


# -------------------------------------------------------------------------------------------
# the coverage page
# -------------------------------------------------------------------------------------------
def coverage_markdown(result: CatalogResult) -> str:
    """docs/conformance.md's generated part: coverage summary and the mutant table."""
    cases = list(result.cases)
    covered = [m for m in CATALOG if result.prints.get(m.id)]
    sourced = [m for m in CATALOG if m.source]
    pct = 100.0 * len(covered) / len(CATALOG)
    out = [
        "<!-- generated by `refmtp golden conformance --write`: do not edit below this line -->",
        "",
        f"**Coverage: {len(covered)} of {len(CATALOG)} mutants ({pct:.0f}%) fail at least one "
        f"shipped case; the unmutated model passes all {len(cases)} cases.** "
        f"{len(sourced)} mutants cite a public bug report.",
        "",
        "Cases caught per mutant (a case *catches* a mutant when verify exits 1 on it):",
        "",
        "| mutant | component | what is wrong | source | catching cases | first failing tensor |",
        "|---|---|---|---|---|---|",
    ]
    for m in CATALOG:
        prints = result.prints.get(m.id, {})
        catching = ", ".join(c for c in cases if c in prints) or "**none**"
        case, first = result.first.get(m.id, ("", ""))
        first_txt = f"`{first}` ({case})" if first else "-"
        what = m.what.replace("|", "\\|")
        out.append(f"| `{m.id}` | {m.component} | {what} | {_links(m.source)} | {catching} | {first_txt} |")
    out += ["", "Mutants caught per case:", "", "| case | kind | mutants caught | only this case catches |",
            "|---|---|---|---|"]
    for c in cases:
        caught = [m.id for m in CATALOG if c in result.prints.get(m.id, {})]
        only = [mid for mid in caught if len(result.prints[mid]) == 1]
        out.append(f"| {c} | {result.cases[c]['kind']} | {len(caught)} | "
                   f"{', '.join(f'`{x}`' for x in only) or '-'} |")
    if result.errors:
        out += ["", "Mutants that crashed instead of producing outputs:", ""]
        out += [f"- `{mid}`: {errs}" for mid, errs in result.errors.items()]
    return "\n".join(out) + "\n"


def _links(source: str) -> str:
    if not source:
        return "-"
    parts = []
    for ref in (s.strip() for s in source.split(",")):
        m = re.fullmatch(r"([\w.-]+/[\w.-]+)#(\d+)", ref)
        parts.append(f"[{ref}](https://github.com/{m.group(1)}/issues/{m.group(2)})" if m else ref)
    return ", ".join(parts)


MARKER = "<!-- generated by `refmtp golden conformance --write`"


def render_page(existing: str, result: CatalogResult) -> str:
    """The page with its generated part (from the marker on) replaced by fresh tables."""
    head = existing.split(MARKER)[0] if MARKER in existing else existing
    return head.rstrip("\n") + "\n\n" + coverage_markdown(result)


def mutant_outputs(case_dir, mutant_id: str, backend: str = "numpy") -> dict:
    """What refmtp computes for a tensor case with one mutant on: the outputs file an
    implementation carrying that bug would hand to ``verify --against`` (tests, examples)."""
    case_dir = Path(case_dir)
    m = read_manifest(case_dir)
    if m["kind"] == "acceptance":
        raise ValueError("mutant_outputs: acceptance cases compare JSON records, not tensors")
    with mutation(mutant_id):
        return recompute(case_dir, m, backend)
