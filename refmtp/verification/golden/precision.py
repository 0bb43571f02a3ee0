"""The reduced-precision verdict: ``refmtp golden verify CASE --against OUT --precision bf16``.

An implementation that computes in bf16, fp16 or fp32 cannot meet the float64 tolerances, so
this verdict judges it with the statistics engine developers use, each against a threshold
that refmtp derives from its own emulated runs (:mod:`refmtp.precision`; docs/precision.md):

    statistics(expected, actual)          # ({group: {statistic: value}}, missing, bad)
    emulated_outputs(case_dir, "bf16")    # refmtp's own bf16 run of a case, golden key names
    derive_thresholds()                   # every shipped model/decode/speculative case x precision, worst x margin
    report = verify_precision(case_dir, "out.safetensors", "bf16")
    print(format_precision_report(report)); report.exit_code     # 0 pass, 1 fail

Statistics per tensor group (:func:`group_of`), each tensor compared with its float64 expected
value ``e``, scale ``s`` = RMS of ``e`` (a scalar: ``|e|``; an all-zero tensor: the RMS of its
whole group):

    max_rel_err      max over the group's tensors of max |a - e| / s
    mean_rel_err     max over the group's tensors of mean |a - e| / s
    top1_agreement   fraction of logit rows whose argmax agrees (logit groups)
    kl_mean, kl_max  KL(softmax(e) || softmax(a)) per logit row, nats: mean and max
    routing_agreement fraction of (layer, token) rows with the same SET of experts (routing);
                     gate values are compared only on those rows, routing.*.load not at all
                     (it follows from the sets)

Thresholds (:func:`derive_thresholds`): per precision, group and statistic the worst value over
the shipped cases' emulated runs times ``ERROR_MARGIN`` (at least the precision's unit roundoff,
its square for KL); agreement rates allow ``AGREEMENT_MARGIN`` times the worst emulated
disagreement, and at least ``MIN_DISAGREEMENT[precision]``. They live in
``golden/precision_thresholds.json`` (``refmtp golden precision --write``).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np  # host-side only: statistics of host arrays

from refmtp.precision import PRECISIONS, UNIT_ROUNDOFF, check_precision, emulate, round_weights
from refmtp.verification.golden.compare import _canonical_routing
from refmtp.verification.golden.files import (GoldenError, read_json, read_tensors, sniff,
                                              write_json)
from refmtp.verification.golden.manifest import check_files, read_manifest
from refmtp.verification.golden.recipe import case_dirs, shipped_dir
from refmtp.verification.golden.verify import _refuse_json_outputs, recompute

THRESHOLDS = "precision_thresholds.json"  # in golden/, beside recipe.json
THRESHOLDS_FORMAT = "refmtp-precision-thresholds"
COMMAND = "refmtp golden precision --write"
ERROR_MARGIN = 2.0  # threshold = 2 x the worst emulated error
AGREEMENT_MARGIN = 2.0  # allowed disagreement = 2 x the worst emulated disagreement ...
MIN_DISAGREEMENT = {"bf16": 0.05, "fp16": 0.05, "fp32": 0.02}  # ... and at least this
TENSOR_KINDS = ("model", "decode", "speculative")

# (group, which tensors) in report order
GROUPS = (
    ("logits", "logits, decode.*.logits"),
    ("mtp_logits", "mtp_logits.*"),
    ("losses", "loss.*"),
    ("gradients", "grad.*"),
    ("routing", "routing.*.topk_idx, routing.*.topk_weight"),
    ("latent", "decode.*.latent.*"),
    ("bias_update", "bias_after_update.*"),
    ("spec_greedy", "spec.*.num_accepted, spec.*.tokens, spec.final_tokens (temperature 0)"),
    ("spec_sampled", "spec.*.num_accepted, spec.*.tokens, spec.final_tokens (temperature > 0)"),
    ("spec_p", "spec.*.p (the rows the rule read)"),
    ("spec_q", "spec.*.q (the rows the rule read)"),
)
ERRORS = ("max_rel_err", "mean_rel_err")
LOGIT_STATS = ("top1_agreement", "kl_mean", "kl_max")
SPEC_STATS = ("step_agreement", "final_prefix")
AGREEMENTS = ("top1_agreement", "routing_agreement") + SPEC_STATS  # rates: higher is better


def group_of(name: str) -> str | None:
    """The tensor group a golden key belongs to (None: not judged, e.g. routing.*.load)."""
    if name == "logits" or re.fullmatch(r"decode\.\d+\.logits", name):
        return "logits"
    if name.startswith("mtp_logits."):
        return "mtp_logits"
    if name.startswith("loss."):
        return "losses"
    if name.startswith("grad."):
        return "gradients"
    if re.fullmatch(r"routing\.\d+\.(topk_idx|topk_weight)", name):
        return "routing"
    if re.fullmatch(r"decode\.\d+\.latent\.\d+", name):
        return "latent"
    if name.startswith("bias_after_update."):
        return "bias_update"
    return None


def stat_names(group: str) -> tuple:
    if group in ("logits", "mtp_logits"):
        return ERRORS + LOGIT_STATS
    if group == "routing":
        return ERRORS + ("routing_agreement",)
    if group in ("spec_greedy", "spec_sampled"):
        return SPEC_STATS
    if group in ("spec_p", "spec_q"):
        return ERRORS + ("kl_mean", "kl_max")
    return ERRORS


def higher_is_better(stat: str) -> bool:
    return stat in AGREEMENTS


# -------------------------------------------------------------------------------------------
# statistics
# -------------------------------------------------------------------------------------------
def _rms(x) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if x.size else 0.0


def _log_softmax(z):
    z = z - np.max(z, axis=-1, keepdims=True)
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def _errors(e, a, scale):
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.abs(a - e)
    err = np.where(np.isfinite(a), err, np.inf)
    if err.size == 0:
        return 0.0, 0.0
    return float(err.max()) / scale, float(err.mean()) / scale


def statistics(expected: dict, actual: dict, temperature: float = 0.0) -> tuple[dict, list, list]:
    """``({group: {statistic: value}}, missing names, shape mismatches)`` of ``actual`` against
    ``expected`` (golden key names; routing rows compared as sets; a speculative case, one
    holding ``spec.final_tokens``, by :func:`accepted_token_agreement` at ``temperature``)."""
    expected = _canonical_routing(expected)
    actual = _canonical_routing(actual)
    names = {g: [] for g, _ in GROUPS}
    for n in sorted(expected):
        g = group_of(n)
        if g is not None and not n.endswith(".topk_weight"):
            names[g].append(n)
    missing, bad, out = [], [], {}
    if "spec.final_tokens" in expected:  # a speculative case
        out, missing, bad = accepted_token_agreement(expected, actual, temperature)
    for g, members in names.items():
        if not members:
            continue
        present = []
        for n in members:
            w = n.replace(".topk_idx", ".topk_weight") if g == "routing" else None
            need = [n] + ([w] if w in expected else [])
            lost = [k for k in need if k not in actual]
            missing += lost
            if lost:
                continue
            shapes = [k for k in need if np.shape(actual[k]) != np.shape(expected[k])]
            if shapes:
                bad += [f"{k}: shape {tuple(np.shape(actual[k]))}, expected {tuple(np.shape(expected[k]))}"
                        for k in shapes]
                continue
            present.append(n)
        if present:
            out[g] = _group_stats(g, present, expected, actual)
    return out, missing, bad


def _group_stats(g: str, names: list, expected: dict, actual: dict) -> dict:
    f64 = lambda t, n: np.asarray(t[n], dtype=np.float64)  # noqa: E731
    st = {"max_rel_err": 0.0, "mean_rel_err": 0.0}
    if g == "routing":
        same_rows, rows = 0, 0
        pairs = []
        for n in names:
            ei, ai = np.asarray(expected[n]), np.asarray(actual[n])
            K = ei.shape[-1] if ei.ndim else 1
            same = np.all(np.reshape(ei, (-1, K)) == np.reshape(ai, (-1, K)), axis=-1)
            same_rows += int(same.sum())
            rows += same.size
            w = n.replace(".topk_idx", ".topk_weight")
            if w in expected:
                pairs.append((np.reshape(f64(expected, w), (-1, K))[same],
                              np.reshape(f64(actual, w), (-1, K))[same]))
        st["routing_agreement"] = same_rows / rows if rows else 1.0
    else:
        pairs = [(f64(expected, n), f64(actual, n)) for n in names]
    if pairs:
        whole = np.concatenate([e.reshape(-1) for e, _ in pairs])
        fallback = _rms(whole) or 1.0
        for e, a in pairs:
            scale = (abs(float(e)) if e.ndim == 0 else _rms(e)) or fallback
            mx, mean = _errors(e, a, scale)
            st["max_rel_err"] = max(st["max_rel_err"], mx)
            st["mean_rel_err"] = max(st["mean_rel_err"], mean)
    if g in ("logits", "mtp_logits"):
        agree, rows, kls = 0, 0, []
        for e, a in pairs:
            e2, a2 = e.reshape(-1, e.shape[-1]), a.reshape(-1, a.shape[-1])
            agree += int(np.sum(np.argmax(e2, -1) == np.argmax(a2, -1)))
            rows += e2.shape[0]
            if not np.all(np.isfinite(a2)):
                kls.append(np.full(e2.shape[0], np.inf))
                continue
            le, la = _log_softmax(e2), _log_softmax(a2)
            kls.append(np.maximum(np.sum(np.exp(le) * (le - la), axis=-1), 0.0))
        kl = np.concatenate(kls) if kls else np.zeros(0)
        st["top1_agreement"] = agree / rows if rows else 1.0
        st["kl_mean"] = float(kl.mean()) if kl.size else 0.0
        st["kl_max"] = float(kl.max()) if kl.size else 0.0
    return st


def _step_ints(t: dict, name: str):
    return None if name not in t else [int(v) for v in np.asarray(t[name]).reshape(-1)]


def _prob_kl(e, a):
    """Per row KL(e || a) of probability rows (nats): inf where a has no mass on e's support."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(e > 0, e * (np.log(np.where(e > 0, e, 1.0)) - np.log(np.maximum(a, 0.0))), 0.0)
    kl = np.sum(terms, axis=-1)
    kl = np.where(np.all(np.isfinite(a), axis=-1), kl, np.inf)
    return np.maximum(np.nan_to_num(kl, nan=np.inf), 0.0)


def _steps_of(t: dict) -> list:
    """The step indices s = 0, 1, ... for which ``t`` holds spec.{s}.tokens (in order, no gaps)."""
    s = 0
    while f"spec.{s}.tokens" in t:
        s += 1
    return list(range(s))


def accepted_token_agreement(expected: dict, actual: dict, temperature: float = 0.0) -> tuple[dict, list, list]:
    """Speculative cases (kind "speculative"): ``({group: {statistic: value}}, missing, bad)``.

    The emitted sequence diverges at the first position where ``spec.final_tokens`` differ (the
    common prefix, length c of N). Each golden step s starts at offset o_s of that sequence
    (the tokens emitted before it); the steps with o_s <= c are compared, each with the
    outputs' step that starts at the same offset (none: it disagrees). Statistics of group
    ``spec_greedy`` (temperature 0) or ``spec_sampled`` (temperature > 0):

        step_agreement   compared steps whose num_accepted and emitted tokens agree / compared steps
        final_prefix     c / N

    Sampled cases add groups ``spec_p`` and ``spec_q``: on the compared steps whose drafts
    agree too (their verifier reads the same tokens after the same prefix), the rows the rule
    read, p rows 0..A and q rows 0..min(A, K-1) (A, K the golden's): ``max_rel_err`` /
    ``mean_rel_err`` (worst step, scale = RMS of the step's rows) and ``kl_mean`` / ``kl_max``
    of ``KL(e || a)`` per row (nats, the probabilities compared directly). At temperature 0 p
    and q are one-hot and say no more than the tokens. The logits and the cache lengths are not
    judged here (float64 ``verify`` checks them)."""
    ints = _step_ints
    e_steps, a_steps = _steps_of(expected), _steps_of(actual)
    missing, bad = [], []
    e_fin = ints(expected, "spec.final_tokens") or []
    a_fin = ints(actual, "spec.final_tokens")
    if a_fin is None:
        missing.append("spec.final_tokens")
        a_fin = [t for s in a_steps for t in ints(actual, f"spec.{s}.tokens")]
    common = next((i for i, (x, y) in enumerate(zip(e_fin, a_fin)) if x != y), min(len(e_fin), len(a_fin)))
    a_at, off = {}, 0  # offset -> the outputs' step starting there
    for s in a_steps:
        a_at[off] = s
        off += len(ints(actual, f"spec.{s}.tokens"))
    compared, agree, same_drafts, off = 0, 0, [], 0
    for s in e_steps:
        o, off = off, off + len(ints(expected, f"spec.{s}.tokens"))
        if o > common:
            break
        compared += 1
        t = a_at.get(o)
        if t is None:
            continue
        if f"spec.{t}.num_accepted" not in actual:
            missing.append(f"spec.{t}.num_accepted")
            continue
        agree += all(ints(expected, f"spec.{s}.{f}") == ints(actual, f"spec.{t}.{f}")
                     for f in ("num_accepted", "tokens"))
        if ints(expected, f"spec.{s}.drafts") == ints(actual, f"spec.{t}.drafts"):
            same_drafts.append((s, t))
    group = "spec_greedy" if float(temperature) == 0 else "spec_sampled"
    stats = {group: {"step_agreement": agree / compared if compared else 1.0,
                     "final_prefix": common / len(e_fin) if e_fin else 1.0}}
    if group == "spec_greedy":
        return stats, missing, bad
    for g, field_ in (("spec_p", "p"), ("spec_q", "q")):
        st, kls = {"max_rel_err": 0.0, "mean_rel_err": 0.0}, []
        for s, t in same_drafts:
            n, m = f"spec.{s}.{field_}", f"spec.{t}.{field_}"
            if n not in expected:
                continue
            if m not in actual:
                missing.append(m)
                continue
            e, a = np.asarray(expected[n], dtype=np.float64), np.asarray(actual[m], dtype=np.float64)
            if a.shape != e.shape:
                bad.append(f"{m}: shape {tuple(a.shape)}, expected {tuple(e.shape)}")
                continue
            A = int(np.asarray(expected[f"spec.{s}.num_accepted"]))
            e, a = e[:A + 1], a[:A + 1]  # p: rows 0..A; q (K rows): rows 0..min(A, K-1)
            if not e.size:
                continue
            mx, mean = _errors(e, a, _rms(e) or 1.0)
            st["max_rel_err"], st["mean_rel_err"] = max(st["max_rel_err"], mx), max(st["mean_rel_err"], mean)
            kls.append(_prob_kl(e, a))
        kl = np.concatenate(kls) if kls else np.zeros(0)
        st["kl_mean"] = float(kl.mean()) if kl.size else 0.0
        st["kl_max"] = float(kl.max()) if kl.size else 0.0
        stats[g] = st
    return stats, missing, bad


# -------------------------------------------------------------------------------------------
# the outputs file (bf16 tensors allowed)
# -------------------------------------------------------------------------------------------
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_outputs(path) -> dict:
    """A safetensors outputs file as host arrays; BF16 tensors (which numpy cannot hold) are
    widened exactly to float32. Anything unreadable raises GoldenError (one line)."""
    path = Path(path)
    if not path.is_file():
        raise GoldenError(f"outputs file {path} does not exist")
    sniff(path, "outputs file")
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8:8 + n])
    except (ValueError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict) or not any(isinstance(v, dict) and v.get("dtype") == "BF16"
                                               for v in header.values()):
        return read_tensors(path, "outputs file")
    body, out = data[8 + n:], {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            lo, hi = info["data_offsets"]
            raw, shape, dt = body[lo:hi], tuple(info["shape"]), info["dtype"]
            if dt == "BF16":
                bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
                out[name] = bits.view(np.float32).reshape(shape)
            else:
                out[name] = np.frombuffer(raw, dtype=np.dtype(_ST_DTYPES[dt]).newbyteorder("<")).reshape(shape)
        except (KeyError, TypeError, ValueError) as exc:
            raise GoldenError(f"outputs file {path}: tensor {name!r} is not readable ({exc})") from None
    return out


# -------------------------------------------------------------------------------------------
# emulated runs and thresholds
# -------------------------------------------------------------------------------------------
def _tensor_manifest(case_dir: Path) -> dict:
    m = read_manifest(case_dir)
    check_files(case_dir, m)
    if m["kind"] not in TENSOR_KINDS:
        raise GoldenError(f"{m['case']} is a {m['kind']} case: --precision judges "
                          f"model, decode and speculative cases")
    return m


def _temperature(m: dict) -> float:
    """A speculative case's temperature (0 for the other kinds)."""
    return float((m.get("speculative") or {}).get("temperature", 0.0))


def emulated_outputs(case_dir, precision: str) -> dict:
    """refmtp's own reduced-precision run of a model, decode or speculative case: float32 math, weights and
    activations rounded to ``precision`` (:mod:`refmtp.precision`), golden key names."""
    case_dir = Path(case_dir)
    m = _tensor_manifest(case_dir)
    check_precision(precision)
    with emulate(precision):
        return recompute(case_dir, m, "numpy", dtype="float32",
                         prepare=lambda p: round_weights(p, precision))


def _threshold(stat: str, worst: float, precision: str) -> float:
    if higher_is_better(stat):
        allowed = max(AGREEMENT_MARGIN * (1.0 - worst), MIN_DISAGREEMENT[precision])
        return max(0.0, 1.0 - allowed)
    floor = UNIT_ROUNDOFF[precision] ** (2 if stat.startswith("kl") else 1)
    return max(ERROR_MARGIN * worst, floor)


def derive_thresholds(root=None, precisions=PRECISIONS, log=None) -> dict:
    """Emulate every model, decode and speculative case under ``root`` (default: the shipped golden/) in each
    precision, take the worst statistic per group over the cases, apply the margins."""
    root = Path(root) if root is not None else shipped_dir()
    cases = [d for d in case_dirs(root) if read_manifest(d)["kind"] in TENSOR_KINDS]
    if not cases:
        raise GoldenError(f"{root} holds no model, decode or speculative case to derive thresholds from")
    table = {}
    for p in precisions:
        worst: dict = {}
        for d in cases:
            expected = read_tensors(d / "expected.safetensors", "golden file")
            stats, missing, bad = statistics(expected, emulated_outputs(d, p), _temperature(read_manifest(d)))
            if missing or bad:
                raise AssertionError(f"emulated run of {d.name} lacks {missing[:3]} {bad[:3]}")
            for g, st in stats.items():
                for s, v in st.items():
                    cur = worst.setdefault(g, {}).get(s)
                    if cur is None or (v < cur[0] if higher_is_better(s) else v > cur[0]):
                        worst[g][s] = (v, d.name)
            if log:
                log(f"{p} {d.name}: emulated")
        table[p] = {g: {s: {"threshold": _threshold(s, v, p), "emulated_worst": v, "worst_case": c}
                        for s, (v, c) in sorted(st.items())}
                    for g, st in worst.items()}
    return {"format": THRESHOLDS_FORMAT, "format_version": 1, "command": COMMAND,
            "margins": {"error": ERROR_MARGIN, "error_floor": "unit roundoff (KL: its square)",
                        "disagreement": AGREEMENT_MARGIN, "min_disagreement": MIN_DISAGREEMENT},
            "cases": [d.name for d in cases], "precisions": table}


def load_thresholds(path=None) -> dict:
    path = Path(path) if path is not None else shipped_dir() / THRESHOLDS
    data = read_json(path, "thresholds file")
    if not isinstance(data, dict) or data.get("format") != THRESHOLDS_FORMAT \
            or data.get("format_version") != 1 or not isinstance(data.get("precisions"), dict):
        raise GoldenError(f"{path} is not a {THRESHOLDS_FORMAT} file (version 1): regenerate it "
                          f"with `{COMMAND}`")
    return data


def write_thresholds(data: dict, path=None) -> Path:
    path = Path(path) if path is not None else shipped_dir() / THRESHOLDS
    write_json(path, data)
    return path


DOC_BEGIN = "<!-- precision-thresholds: generated by `refmtp golden precision --write` -->"
DOC_END = "<!-- end of precision-thresholds -->"


def render_table(data: dict) -> str:
    """The thresholds as a markdown table (one row per group and statistic)."""
    ps = [p for p in PRECISIONS if p in data["precisions"]]
    lines = ["| group | statistic | " + " | ".join(f"{p} threshold (emulated worst)" for p in ps) + " |",
             "|---|---|" + "---|" * len(ps)]
    for g, _ in GROUPS:
        for s in stat_names(g):
            cells = []
            for p in ps:
                e = data["precisions"][p].get(g, {}).get(s)
                sense = ">=" if higher_is_better(s) else "<="
                cells.append("-" if e is None else
                             f"{sense} {e['threshold']:.3g} ({e['emulated_worst']:.3g}, {e['worst_case']})")
            if any(c != "-" for c in cells):
                lines.append(f"| {g} | {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_doc(old: str, data: dict) -> str:
    """``old`` with the part between the markers replaced by :func:`render_table`."""
    block = f"{DOC_BEGIN}\n{render_table(data)}\n{DOC_END}"
    if DOC_BEGIN in old and DOC_END in old:
        head, rest = old.split(DOC_BEGIN, 1)
        return head + block + rest.split(DOC_END, 1)[1]
    return old.rstrip("\n") + "\n\n" + block + "\n"


# -------------------------------------------------------------------------------------------
# the verdict
# -------------------------------------------------------------------------------------------
@dataclass
class PrecisionRow:
    group: str
    statistic: str
    value: float
    threshold: float | None  # None: the thresholds file has none for it (fails)
    status: str  # "pass" | "FAIL"


@dataclass
class PrecisionReport:
    case: str
    path: str
    kind: str
    precision: str
    against: str
    rows: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    bad: list = field(default_factory=list)
    allow_missing: bool = False

    @property
    def status(self) -> str:
        failed = any(r.status != "pass" for r in self.rows) or self.bad
        return "mismatch" if failed or (self.missing and not self.allow_missing) else "pass"

    @property
    def exit_code(self) -> int:
        return 0 if self.status == "pass" else 1


def verify_precision(case_dir, against, precision: str, *, allow_missing: bool = False,
                     thresholds=None) -> PrecisionReport:
    """Judge ``against`` (another implementation's outputs, golden key names, any float dtype
    including BF16) against the float64 goldens of a model, decode or speculative case with the derived
    thresholds of ``precision``. GoldenError (exit 2) for unreadable input or a bad precision."""
    if precision not in PRECISIONS:
        raise GoldenError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    case_dir = Path(case_dir)
    m = _tensor_manifest(case_dir)
    table = load_thresholds(thresholds)["precisions"].get(precision)
    if table is None:
        raise GoldenError(f"the thresholds file has no {precision} entry: regenerate it with `{COMMAND}`")
    expected = read_tensors(case_dir / "expected.safetensors", "golden file")
    _refuse_json_outputs(against, m)
    stats, missing, bad = statistics(expected, read_outputs(against), _temperature(m))
    report = PrecisionReport(m["case"], str(case_dir), m["kind"], precision, str(against),
                             missing=missing, bad=bad, allow_missing=allow_missing)
    for g, _ in GROUPS:
        for s in stat_names(g):
            if g not in stats:
                continue
            v = stats[g][s]
            t = table.get(g, {}).get(s, {}).get("threshold")
            ok = t is not None and (v >= t if higher_is_better(s) else v <= t)
            report.rows.append(PrecisionRow(g, s, v, t, "pass" if ok else "FAIL"))
    return report


def format_precision_report(r: PrecisionReport) -> str:
    lines = [f"case {r.case} [{r.kind}] {r.precision} verdict against {r.against}: {r.path}",
             f"  {'group':<12} {'statistic':<18} {'value':>10}    {'threshold':>10}  result"]
    for row in r.rows:
        sense = ">=" if higher_is_better(row.statistic) else "<="
        t = "none" if row.threshold is None else f"{row.threshold:.3g}"
        note = "" if row.threshold is not None else f"  (no threshold: regenerate with `{COMMAND}`)"
        lines.append(f"  {row.group:<12} {row.statistic:<18} {row.value:>10.3g} {sense} {t:>10}  "
                     f"{row.status}{note}")
    failed = sum(row.status != "pass" for row in r.rows)
    lines.append(f"  {r.status.upper()}: {len(r.rows) - failed} of {len(r.rows)} statistics within "
                 f"the {r.precision} thresholds (docs/precision.md)")
    if r.missing:
        lines.append(f"  {'not checked' if r.allow_missing else 'missing'} ({len(r.missing)}): "
                     + ", ".join(r.missing[:8]) + (" ..." if len(r.missing) > 8 else ""))
    for b in r.bad:
        lines.append(f"  FAIL {b}")
    return "\n".join(lines)
