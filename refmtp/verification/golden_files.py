"""Golden files: a framework-neutral record of what refmtp computes, and its verifier.

Specification: ``docs/golden-format.md``. A *model case* is one directory::

    config.json            the model config, exactly as save_checkpoint writes it
    model.safetensors      the parameters under the checkpoint names (save_checkpoint's writer)
    inputs.safetensors     tokens int64 (B, T+1)
    expected.safetensors   logits, mtp_logits.{k}, loss.*, grad.{name}, routing.{layer}.*,
                           bias_after_update.{layer}
    manifest.json          format, case, description, versions, command, tolerances, sha256s

An *acceptance case* is a directory with ``records.json`` (speculative-decoding acceptance
records, dyadic numbers written as exact decimal strings, RNG-v1 rules of the speculative
decoding spec section 2.2) and ``manifest.json``.

    export_model_case(out_dir, cfg, seed=0, batch=2, seq_len=8, dtype="float64")
    export_acceptance_case(out_dir, records)
    generate(out_dir, recipe)                 # every case of golden/recipe.json
    report = verify_case(case_dir, backend="numpy", against=None)
    print(format_report(report)); report.status   # "pass" | "mismatch"

Everything here is host-side bookkeeping (reading and writing files, comparing finished
arrays), so it uses numpy directly; the model math runs on the chosen backend through
``refmtp.model`` and comes back through ``bk.to_numpy``. Unreadable, tampered or foreign files
raise :class:`GoldenError` with one line (the CLI exits 2 on it); numerical disagreement is a
report with status "mismatch" (exit 1).
"""
from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np  # host-side only: file I/O and comparison of finished arrays

FORMAT = "refmtp-golden"
FORMAT_VERSION = 1
MODEL_FILES = ("config.json", "model.safetensors", "inputs.safetensors", "expected.safetensors")
ACCEPTANCE_FILE = "records.json"
ACCEPTANCE_FORMAT = "refmtp-golden-acceptance"
MANIFEST = "manifest.json"
RECIPE = "recipe.json"
KINDS = ("model", "trajectory", "acceptance", "decode")
DECODE_OPS = ("append", "truncate")

# Golden weights are drawn larger than the training init (std 0.02) so that attention patterns,
# routing and logits are far from uniform and a wrong scale, sign or order shows up.
DEFAULT_INIT_STD = 0.2
DEFAULT_BIAS_STD = 0.05  # non-zero e_score_correction_bias: it must change some routing

# Tolerances derived from the dtype only (docs/golden-format.md "Tolerances"): pass iff
# |actual - expected| <= atol + rtol * |expected| elementwise (numpy.isclose with expected as b).
TOLERANCES = {
    "float64": {"rtol": 1e-9, "atol": 1e-12},
    "float32": {"rtol": 1e-4, "atol": 1e-6},
    "int64": {"rtol": 0.0, "atol": 0.0},
}
# Smallest routing score gap (K-th vs (K+1)-th selection score, kept vs dropped group) accepted
# when exporting: below it another implementation's rounding could pick other experts.
MIN_ROUTING_MARGIN = {"float64": 1e-6, "float32": 1e-4}


class GoldenError(Exception):
    """A golden file is unreadable, tampered, foreign or inconsistent (one-line message; exit 2)."""


# ===========================================================================================
# bytes on disk: JSON, sha256, safetensors
# ===========================================================================================
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
    from safetensors.numpy import save

    arrays = {}
    for name in sorted(tensors):
        a = np.asarray(tensors[name])
        if not a.flags.c_contiguous:  # (np.ascontiguousarray would turn a 0-d scalar into 1-d)
            a = a.copy(order="C")
        if a.dtype not in (np.float64, np.float32, np.int64):
            raise ValueError(f"golden tensor {name} has dtype {a.dtype}: use float64, float32 or int64")
        arrays[name] = a
    Path(path).write_bytes(save(arrays, metadata={"format": FORMAT}))


def _sniff(path: Path, what: str) -> None:
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
    from safetensors.numpy import load

    path = Path(path)
    if not path.is_file():
        raise GoldenError(f"{what} {path} does not exist")
    _sniff(path, what)
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


# ===========================================================================================
# tolerances
# ===========================================================================================
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


# ===========================================================================================
# comparison
# ===========================================================================================
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
    kind: str  # "model" | "trajectory" | "acceptance"
    mode: str  # "recompute (numpy)" | "against FILE" | "replay (numpy)"
    rows: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    hints: list = field(default_factory=list)  # "HINT: ..." lines: what the user probably has to change

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


# ===========================================================================================
# manifest
# ===========================================================================================
def _refmtp_version() -> str:
    from refmtp import __version__

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
            _sniff(path, "golden file")
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


# ===========================================================================================
# model cases: compute and export
# ===========================================================================================
def make_tokens(seed: int, batch: int, seq_len: int, vocab_size: int):
    """Random tokens (B, T+1) int64: numpy PCG64 seeded with SeedSequence([seed, 1])."""
    gen = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), 1])))
    return gen.integers(0, vocab_size, size=(batch, seq_len + 1), dtype=np.int64)


def _moe_block_caches(cache) -> dict:
    """{layer index: block cache} of every MoE block (main and MTP) in a ModelCache."""
    from refmtp.params import mtp_layer

    cfg = cache.cfg
    blocks = {layer: bc for layer, bc in enumerate(cache.blocks)}
    for k, c in enumerate(cache.mtp, start=1):
        blocks[mtp_layer(cfg, k)] = c.block if cfg.refmtp.mtp_kind == "causal" else c
    return {layer: bc for layer, bc in blocks.items() if getattr(bc, "moe", False)}


def routing_margins(cache) -> dict:
    """{MoE layer: smallest score gap behind its routing decisions} (refmtp.model.router.router_margin)."""
    from refmtp.model.router import router_margin

    from refmtp.backends import backend_of

    out = {}
    for layer, bc in _moe_block_caches(cache).items():
        rc = bc.ffn.router
        margin = router_margin(rc)
        if cache.cfg.refmtp.balance_loss == "seq":  # eq. 18 counts the top-K of the unbiased s
            xp = backend_of(rc.s).xp
            K = rc.topk_idx.shape[1]
            if rc.s.shape[1] > K:
                v = -xp.sort(-rc.s, axis=-1)  # (N, E) descending
                margin = min(margin, float(xp.min(v[:, K - 1] - v[:, K])))
        out[layer] = margin
    return out


def compute_case(cfg, params: dict, tokens, *, gamma: float | None = None, with_margins=False):
    """Everything ``expected.safetensors`` holds, as host arrays keyed by golden names.

    ``params`` and ``tokens`` live on one backend; ``params`` is not modified. Returns the dict
    (and the routing margins when ``with_margins``).
    """
    from refmtp.backends import backend_of
    from refmtp.params import is_bias, layer_prefix
    from refmtp.model import backward, forward, update_expert_bias

    bk = backend_of(tokens, params["model.embed_tokens.weight"])
    gamma = cfg.refmtp.bias_update_gamma if gamma is None else float(gamma)
    out, cache = forward(params, cfg, tokens)
    grads = backward(cache)
    h = bk.to_numpy
    exp = {"logits": h(out.logits)}
    for k, lk in enumerate(out.mtp_logits, start=1):
        exp[f"mtp_logits.{k}"] = h(lk)
    for key, val in out.losses.items():
        exp[f"loss.{key}"] = np.asarray(h(val)).reshape(())
    trainable = sorted(n for n in params if not is_bias(n))
    if sorted(grads) != trainable:
        raise AssertionError(f"backward returned gradients for {len(grads)} names, the model has "
                             f"{len(trainable)} trainable parameters")
    for name in trainable:
        exp[f"grad.{name}"] = h(grads[name])
    for layer, (idx, weight) in out.routing.items():
        exp[f"routing.{layer}.topk_idx"] = h(idx).astype(np.int64)
        exp[f"routing.{layer}.topk_weight"] = h(weight)
        exp[f"routing.{layer}.load"] = h(out.load[layer]).astype(np.int64)
    biases = {n: v for n, v in params.items() if is_bias(n)}
    if biases:
        updated = dict(biases)
        update_expert_bias(updated, out.load, gamma)  # in place on the copy of the dict
        for layer in sorted(out.load):
            exp[f"bias_after_update.{layer}"] = h(updated[layer_prefix(layer) + "mlp.gate.e_score_correction_bias"])
    bad = [n for n, a in exp.items() if not np.all(np.isfinite(a))]
    if bad:
        raise ValueError(f"the case produces non-finite values in {', '.join(bad[:4])}: "
                         "choose another seed or smaller weights")
    if with_margins:
        return exp, routing_margins(cache)
    return exp


def config_from_recipe(entry: dict):
    """A validated ModelConfig from a recipe entry: ``preset`` + ``overrides`` or ``config``."""
    from refmtp.config import ConfigError, ModelConfig, preset

    if "config" in entry:
        data = copy.deepcopy(entry["config"])
    elif "preset" in entry:
        data = preset(entry["preset"]).to_dict()
    else:
        raise ConfigError("a recipe case needs 'preset' (with optional 'overrides') or 'config'")
    for key, value in (entry.get("overrides") or {}).items():
        if key == "refmtp" and isinstance(value, dict):
            data["refmtp"] = {**data.get("refmtp", {}), **value}
        else:
            data[key] = copy.deepcopy(value)
    return ModelConfig.from_dict(data)


def _check_dims(batch, seq_len, dtype, cfg):
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch={batch!r} must be an integer >= 1")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= cfg.D:
        raise ValueError(f"seq_len={seq_len!r} must be an integer > num_nextn_predict_layers={cfg.D} "
                         "(depth k trains on T-k positions)")
    if dtype not in ("float64", "float32"):
        raise ValueError(f"dtype={dtype!r}: choose float64 or float32")


def _check_margins(name: str, margins: dict, dtype: str) -> float | None:
    floor = MIN_ROUTING_MARGIN[dtype]
    for layer, margin in sorted(margins.items()):
        if not margin >= floor:
            raise ValueError(f"case {name}: layer {layer} routing has a near-tie (score gap "
                             f"{margin:.3g} < {floor:g}), so another implementation's rounding could "
                             "pick other experts: choose another seed")
    return min(margins.values()) if margins else None


def _golden_params(cfg, seed, dtype, init_std, bias_std, norm_std=0.0, bias_mean=0.0):
    """init_params(seed, std=init_std, bias_std), then two optional recipe perturbations drawn
    from their own stream PCG64(SeedSequence([seed, 2])) so the default cases are unchanged:
    every RMSNorm weight times (1 + normal(0, norm_std)) (so swapped or shared norms show in
    the forward), and ``bias_mean`` added to every e_score_correction_bias (negative biased
    scores, where masking dropped groups with 0 instead of -inf re-routes tokens)."""
    from refmtp.params import is_bias
    from refmtp.model import init_params

    params = init_params(cfg, seed=int(seed), backend="numpy", dtype=dtype, std=init_std,
                         bias_std=bias_std if cfg.topk_method == "noaux_tc" else 0.0)
    if norm_std or bias_mean:
        gen = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), 2])))
        for name in sorted(params):
            if norm_std and name.endswith("norm.weight"):
                noise = gen.normal(0.0, float(norm_std), size=params[name].shape)
                params[name] = (params[name] * (1.0 + noise)).astype(params[name].dtype)
            elif bias_mean and is_bias(name):
                params[name] = (params[name] + np.float32(bias_mean)).astype(np.float32)
    return params


def _perturbations(entry: dict) -> dict:
    """The optional parameter perturbations of a recipe entry (see _golden_params)."""
    return {k: float(entry[k]) for k in ("norm_std", "bias_mean") if entry.get(k)}


def export_model_case(out_dir, cfg, *, seed: int, batch: int = 2, seq_len: int = 8,
                      dtype: str = "float64", name: str | None = None, description: str = "",
                      command: str = "", init_std: float = DEFAULT_INIT_STD,
                      bias_std: float = DEFAULT_BIAS_STD, perturb: dict | None = None,
                      extra: dict | None = None) -> dict:
    """Write one model case into ``out_dir`` (created; its previous content replaced).

    Random weights from ``seed`` (every matrix normal(0, init_std), norms ones, a NON-ZERO
    float32 e_score_correction_bias normal(0, bias_std)), random tokens, then everything the
    format lists, computed by refmtp on numpy. Returns the manifest.
    """
    _check_dims(batch, seq_len, dtype, cfg)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    name = name or out_dir.name
    params = _golden_params(cfg, seed, dtype, init_std, bias_std, **(perturb or {}))
    tokens = make_tokens(seed, batch, seq_len, cfg.vocab_size)
    expected, margins = compute_case(cfg, params, tokens, with_margins=True)
    fields = {"kind": "model", "min_routing_margin": _check_margins(name, margins, dtype),
              "bias_update_gamma": float(cfg.refmtp.bias_update_gamma), **(perturb or {})}
    return _write_case(out_dir, cfg, params, {"tokens": tokens}, expected, name=name, description=description,
                       command=command, dtype=dtype, seed=seed, batch=batch, seq_len=seq_len,
                       init_std=init_std, bias_std=bias_std, fields={**fields, **(extra or {})})


def _write_case(out_dir: Path, cfg, params, inputs: dict, expected, *, name, description, command, dtype,
                seed, batch, seq_len, init_std, bias_std, fields) -> dict:
    from refmtp.checkpoint import save_checkpoint

    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_checkpoint(tmp, cfg, params)  # config.json + model.safetensors under checkpoint names
    leftover = sorted(p.name for p in tmp.iterdir() if p.name not in ("config.json", "model.safetensors"))
    if leftover:
        raise AssertionError(f"save_checkpoint wrote unexpected files {leftover}")
    save_tensors(tmp / "inputs.safetensors", inputs)
    save_tensors(tmp / "expected.safetensors", expected)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "case": name,
        "description": description,
        "refmtp_version": _refmtp_version(),
        "dtype": dtype,
        "command": command,
        "seed": int(seed),
        "batch": int(batch),
        "seq_len": int(seq_len),
        "init_std": float(init_std),
        "bias_std": float(bias_std) if cfg.topk_method == "noaux_tc" else 0.0,
        "tolerances": tolerance_table(expected, dtype),
        "tensors": {n: {"dtype": str(a.dtype), "shape": list(a.shape)} for n, a in sorted(expected.items())},
        "files": file_entries(tmp, MODEL_FILES),
        **fields,
    }
    write_json(tmp / MANIFEST, manifest)
    _replace_dir(tmp, out_dir)
    return manifest


# -------------------------------------------------------------------------------------------
# training trajectories: S steps of forward, backward, clip, AdamW, bias update (refmtp/training/trainer.py)
# -------------------------------------------------------------------------------------------
TRAIN_KEYS = ("lr", "warmup_steps", "decay_steps", "min_lr_ratio", "weight_decay", "beta1",
              "beta2", "eps", "grad_clip")


def compute_trajectory(cfg, params: dict, tokens, train: dict, *, with_margins=False):
    """Run ``S = tokens.shape[0]`` training steps through :func:`refmtp.training.step.train_step`
    (the trainer's step: forward, backward, global-norm clip, AdamW at ``schedule(s)``, bias
    update) and return ``trajectory.loss.{term}`` (S,), ``trajectory.grad_norm`` (S,) (before
    clipping), ``trajectory.lr`` (S,) and ``final.{name}`` for every parameter after the last
    step. ``params`` is not modified.
    """
    from refmtp.backends import backend_of
    from refmtp.training.optim import AdamW, AdamWSettings, CosineSchedule
    from refmtp.training.step import train_step

    missing = [k for k in TRAIN_KEYS if k not in train]
    if missing:
        raise ValueError(f"trajectory settings lack {', '.join(missing)}")
    params = dict(params)  # the optimizer replaces entries; the caller's dict stays as it was
    opt = AdamW(AdamWSettings(train["beta1"], train["beta2"], train["eps"], train["weight_decay"]))
    schedule = CosineSchedule(lr=train["lr"], warmup_steps=train["warmup_steps"],
                              decay_steps=train["decay_steps"], min_lr_ratio=train["min_lr_ratio"])
    losses, norms, lrs, margins = {}, [], [], {}

    def record_margins(out, cache):
        for layer, m in routing_margins(cache).items():
            margins[layer] = min(m, margins.get(layer, float("inf")))

    for step in range(int(tokens.shape[0])):
        lr = schedule(step)
        r = train_step(params, cfg, tokens[step], opt, lr, train["grad_clip"],
                       on_forward=record_margins if with_margins else None)
        for key, val in r.losses.items():
            losses.setdefault(key, []).append(val)
        norms.append(r.grad_norm)
        lrs.append(lr)
    h = backend_of(params["model.embed_tokens.weight"]).to_numpy
    dt = np.float64 if str(params["model.embed_tokens.weight"].dtype) == "float64" else np.float32
    exp = {f"trajectory.loss.{k}": np.asarray(v, dtype=dt) for k, v in losses.items()}
    exp["trajectory.grad_norm"] = np.asarray(norms, dtype=np.float64).astype(dt)
    exp["trajectory.lr"] = np.asarray(lrs, dtype=np.float64).astype(dt)
    for name, value in params.items():
        exp[f"final.{name}"] = h(value)
    bad = [n for n, a in exp.items() if not np.all(np.isfinite(a))]
    if bad:
        raise ValueError(f"the trajectory produces non-finite values in {', '.join(bad[:4])}")
    return (exp, margins) if with_margins else exp


def export_trajectory_case(out_dir, cfg, *, seed: int, steps: int, train: dict, batch: int = 2,
                           seq_len: int = 8, dtype: str = "float64", name: str | None = None,
                           description: str = "", command: str = "",
                           init_std: float = DEFAULT_INIT_STD, bias_std: float = DEFAULT_BIAS_STD,
                           extra: dict | None = None) -> dict:
    """Write a training-trajectory case: tokens (S, B, T+1), the S loss terms and the final
    parameters (:func:`compute_trajectory`)."""
    _check_dims(batch, seq_len, dtype, cfg)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be an integer >= 1")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    name = name or out_dir.name
    params = _golden_params(cfg, seed, dtype, init_std, bias_std)
    tokens = np.stack([make_tokens(seed * 1000 + s, batch, seq_len, cfg.vocab_size) for s in range(steps)])
    train = {k: train[k] for k in TRAIN_KEYS if k in train}
    expected, margins = compute_trajectory(cfg, params, tokens, train, with_margins=True)
    fields = {"kind": "trajectory", "steps": int(steps), "train": train,
              "bias_update_gamma": float(cfg.refmtp.bias_update_gamma),
              "min_routing_margin": _check_margins(name, margins, dtype)}
    return _write_case(out_dir, cfg, params, {"tokens": tokens}, expected, name=name, description=description,
                       command=command, dtype=dtype, seed=seed, batch=batch, seq_len=seq_len,
                       init_std=init_std, bias_std=bias_std, fields={**fields, **(extra or {})})


# -------------------------------------------------------------------------------------------
# decode cases: a prefill, single-token steps, a multi-token append and a rollback through the
# absorbed latent cache (refmtp.inference.decode)
# -------------------------------------------------------------------------------------------
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


def compute_decode(cfg, params: dict, schedule: list[dict], inputs: dict) -> dict:
    """Run ``schedule`` through :class:`refmtp.inference.decode.Decoder` with the absorbed latent cache.

    Append step i feeds ``inputs["step.{i}.tokens"]`` (B, n) and records
    ``decode.{i}.logits`` (B, n, V) and, per main layer, ``decode.{i}.latent.{layer}``
    (B, n, kv_lora_rank + qk_rope_head_dim) = the cache rows it wrote, ``[c_KV | k_pe]`` (c_KV
    after kv_a_layernorm, k_pe after RoPE at the token's position). Truncate steps roll back.
    """
    from refmtp.backends import backend_of
    from refmtp.inference.decode import Decoder

    bk = backend_of(params["model.embed_tokens.weight"])
    h = bk.to_numpy
    dec = Decoder(params, cfg)
    first = inputs["step.0.tokens"]
    total = sum(op.get("n", 0) for op in schedule)
    cache = dec.new_cache("main", batch=int(first.shape[0]), capacity=total)
    exp = {}
    for i, op in enumerate(schedule):
        if op["op"] == "truncate":
            cache.truncate(op["length"])
            continue
        start = cache.length
        out = dec.main(bk.asarray(inputs[f"step.{i}.tokens"], dtype="int64"), cache)
        exp[f"decode.{i}.logits"] = h(out.logits)
        for layer in range(cfg.num_hidden_layers):
            (buf,) = cache.buffers[layer]
            exp[f"decode.{i}.latent.{layer}"] = h(buf[:, start:cache.length])
    bad = [n for n, a in exp.items() if not np.all(np.isfinite(a))]
    if bad:
        raise ValueError(f"the decode case produces non-finite values in {', '.join(bad[:4])}")
    return exp


def decode_inputs(seed: int, batch: int, schedule: list[dict], vocab_size: int) -> dict:
    """Random tokens for every append step i: PCG64(SeedSequence([seed, 3, i]))."""
    out = {}
    for i, op in enumerate(schedule):
        if op["op"] == "append":
            gen = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), 3, i])))
            out[f"step.{i}.tokens"] = gen.integers(0, vocab_size, size=(batch, op["n"]), dtype=np.int64)
    return out


def export_decode_case(out_dir, cfg, *, seed: int, schedule: list, batch: int = 2,
                       dtype: str = "float64", name: str | None = None, description: str = "",
                       command: str = "", init_std: float = DEFAULT_INIT_STD,
                       bias_std: float = DEFAULT_BIAS_STD, perturb: dict | None = None,
                       extra: dict | None = None) -> dict:
    """Write a decode case (:func:`compute_decode`) with random weights and tokens from ``seed``."""
    schedule = check_schedule(schedule, "decode case")
    total = sum(op.get("n", 0) for op in schedule)
    _check_dims(batch, max(total, cfg.D + 1), dtype, cfg)
    if total > cfg.max_position_embeddings:
        raise ValueError(f"the schedule appends {total} tokens, more than max_position_embeddings="
                         f"{cfg.max_position_embeddings}")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    name = name or out_dir.name
    params = _golden_params(cfg, seed, dtype, init_std, bias_std, **(perturb or {}))
    inputs = decode_inputs(seed, batch, schedule, cfg.vocab_size)
    expected = compute_decode(cfg, params, schedule, inputs)
    fields = {"kind": "decode", "schedule": schedule, "cache_layout": "absorbed", **(perturb or {})}
    return _write_case(out_dir, cfg, params, inputs, expected, name=name, description=description,
                       command=command, dtype=dtype, seed=seed, batch=batch, seq_len=total,
                       init_std=init_std, bias_std=bias_std, fields={**fields, **(extra or {})})


def _check_out_dir(out_dir: Path) -> None:
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


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    _check_out_dir(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


# ===========================================================================================
# acceptance-rule cases (speculative-decoding spec 2.2 RNG-v1, 2.4 R11)
# ===========================================================================================
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


def _result_dict(result) -> dict:
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
    from refmtp.backends import get_backend
    from refmtp.inference.acceptance import verify_drafts

    bk = get_backend(backend) if isinstance(backend, str) else backend

    def arr(rows):
        if rows is None:
            return None
        return bk.asarray(np.asarray(rows, dtype=np.float64), dtype="float64")  # (rows, V)

    result = verify_drafts(arr(inputs["p"]), arr(inputs["q"]), list(inputs["drafts"]),
                           inputs["u_accept"], inputs["u_sample"], greedy=inputs["greedy"],
                           logits=arr(inputs["logits"]))
    return _result_dict(result)


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
        # the coins need only be exact float64 (the spec's worked cases use 0.7 and 0.2)
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
    _check_out_dir(out_dir)
    name = name or out_dir.name
    names = [r["case"] for r in records]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"acceptance record names must be unique; repeated: {', '.join(dup[:5])}")
    body = {
        "format": ACCEPTANCE_FORMAT,
        "format_version": FORMAT_VERSION,
        "rule": "RNG-v1 (docs/golden-format.md; speculative-decoding spec section 2.2, R1-R7)",
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
        "refmtp_version": _refmtp_version(),
        "dtype": "float64",
        "command": command,
        "records": len(records),
        "tolerances": [{"pattern": "*", "atol": 0.0, "rtol": 0.0, "dtype": "exact"}],
        "files": file_entries(tmp, (ACCEPTANCE_FILE,)),
    }
    if extra:
        manifest.update(extra)
    write_json(tmp / MANIFEST, manifest)
    _replace_dir(tmp, out_dir)
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


# ===========================================================================================
# verification
# ===========================================================================================
def verify_case(case_dir, backend: str = "numpy", against=None, *, allow_missing: bool = False) -> Report:
    """Verify one case directory.

    Checks the manifest and every file's sha256 first (GoldenError, exit 2, on any problem).
    Model case: recompute with refmtp on ``backend`` and compare within the manifest's
    tolerances, or, with ``against`` (a safetensors file of another implementation's outputs
    under the same names), compare that file instead. Acceptance case: replay every record
    through verify_drafts (exact), or compare ``against`` (a JSON object case -> expected).
    """
    case_dir = Path(case_dir)
    m = read_manifest(case_dir)
    check_files(case_dir, m)
    if m["kind"] == "acceptance":
        return _verify_acceptance(case_dir, m, backend, against, allow_missing)
    expected = read_tensors(case_dir / "expected.safetensors", "golden file")
    table = m["tolerances"]
    if against is not None:
        _refuse_json_outputs(against, m)
        actual = read_tensors(against, "outputs file")
        rows = compare_tensors(expected, actual, table, allow_missing=allow_missing)
        report = Report(m["case"], str(case_dir), m["kind"], f"against {against}", rows)
        report.hints += dtype_hints(expected, actual, m)
    else:
        actual = _recompute(case_dir, m, backend)
        rows = compare_tensors(expected, actual, table)
        report = Report(m["case"], str(case_dir), m["kind"], f"recompute ({backend})", rows)
    if m.get("refmtp_version") != _refmtp_version():
        report.notes.append(f"made by refmtp {m.get('refmtp_version')}, verified with {_refmtp_version()}")
    return report


def _refuse_json_outputs(against, m: dict) -> None:
    """A model case compares safetensors: a JSON file (the acceptance format) is refused by name."""
    path = Path(against)
    try:
        with open(path, "rb") as f:
            head = f.read(64).lstrip()
    except OSError:
        return  # read_tensors says what is wrong with it
    if head[:1] in (b"{", b"["):
        raise GoldenError(f"outputs file {against} looks like JSON, but {m['case']} is a {m['kind']} "
                          "case: safetensors expected (golden key names; docs/golden-format.md section 5)")


def _float32_case_name() -> str | None:
    """A shipped float32 model case, for hints (None when there is none or no recipe)."""
    try:
        cases = load_recipe(shipped_dir() / RECIPE)["cases"]
    except GoldenError:
        return None
    return next((n for n, e in cases.items() if e.get("kind", "model") != "acceptance"
                 and e.get("dtype") == "float32"), None)


def dtype_hints(expected: dict, actual: dict, m: dict) -> list[str]:
    """HINT lines when the outputs' float dtype is not the case dtype (float32 outputs checked
    against a float64 case fail the float64 tolerances everywhere)."""
    lower = sorted(n for n in expected if n in actual and np.asarray(expected[n]).dtype == np.float64
                   and np.asarray(actual[n]).dtype == np.float32)
    if not lower or m.get("dtype") != "float64":
        return []
    f32 = _float32_case_name()
    return [f"HINT: your outputs are float32 but this case is float64 ({len(lower)} tensors, e.g. "
            f"{lower[0]}): compute in float64"
            + (f" (or verify a float32 case such as {f32})" if f32 else "")]


def _recompute(case_dir: Path, m: dict, backend: str) -> dict:
    from refmtp.backends import get_backend
    from refmtp.checkpoint import load_checkpoint

    dtype = m["dtype"]
    if dtype not in ("float64", "float32"):
        raise GoldenError(f"{case_dir / MANIFEST}: dtype {dtype!r} is not float64 or float32")
    bk = get_backend(backend)
    try:
        cfg, params = load_checkpoint(case_dir, backend=bk, dtype=dtype)
    except (ValueError, KeyError, OSError) as exc:
        raise GoldenError(f"{case_dir}: the checkpoint does not load: {str(exc).splitlines()[0]}") from None
    inputs = read_tensors(case_dir / "inputs.safetensors", "golden file")
    if m["kind"] == "decode":
        return _recompute_decode(case_dir, m, cfg, params, inputs)
    if "tokens" not in inputs:
        raise GoldenError(f"{case_dir / 'inputs.safetensors'} has no 'tokens' tensor")
    tokens = inputs["tokens"]
    ndim = 3 if m["kind"] == "trajectory" else 2
    if tokens.dtype != np.int64 or tokens.ndim != ndim:
        raise GoldenError(f"{case_dir / 'inputs.safetensors'}: tokens must be int64 "
                          f"{'(S, B, T+1)' if ndim == 3 else '(B, T+1)'}, got {tokens.dtype} {tokens.shape}")
    gamma = m.get("bias_update_gamma", cfg.refmtp.bias_update_gamma)
    try:
        if m["kind"] == "trajectory":
            return compute_trajectory(cfg, params, bk.asarray(tokens, dtype="int64"), m["train"])
        return compute_case(cfg, params, bk.asarray(tokens, dtype="int64"), gamma=gamma)
    except ValueError as exc:
        raise GoldenError(f"{case_dir}: refmtp refuses the case: {str(exc).splitlines()[0]}") from None


def _recompute_decode(case_dir: Path, m: dict, cfg, params, inputs) -> dict:
    schedule = check_schedule(m["schedule"], str(case_dir / MANIFEST))
    for i, op in enumerate(schedule):
        t = inputs.get(f"step.{i}.tokens")
        if op["op"] == "append" and (t is None or t.dtype != np.int64 or t.ndim != 2
                                     or t.shape[1] != op["n"]):
            raise GoldenError(f"{case_dir / 'inputs.safetensors'}: step.{i}.tokens must be int64 "
                              f"(B, {op['n']})")
    try:
        return compute_decode(cfg, params, schedule, inputs)
    except ValueError as exc:
        raise GoldenError(f"{case_dir}: refmtp refuses the case: {str(exc).splitlines()[0]}") from None


def _verify_acceptance(case_dir: Path, m: dict, backend: str, against, allow_missing: bool) -> Report:
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
            rows.append(Row(name, "FAIL", note=f"got {_json_str(got)}, expected an object "
                                               "{num_accepted, tokens, residual_fallback, is_bonus}"))
            continue
        absent = object()
        diff = [k for k in ACCEPTANCE_RESULT_KEYS
                if not json_equal(got.get(k, absent), want.get(k, absent))]
        if diff:
            rows.append(Row(name, "FAIL", note="; ".join(
                f"{k}: got {_json_str(got[k]) if k in got else '(absent)'}, expected {_json_str(want.get(k))}"
                for k in diff) + (f" ({got['error']})" if "error" in got else "")))
        else:
            rows.append(Row(name, "pass", max_abs=0.0, max_rel=0.0, atol=0.0, rtol=0.0))
    if against is not None:
        known = {str(rec.get("case", f"#{i}")) for i, rec in enumerate(records)}
        for name in sorted(set(other) - known):
            rows.append(Row(name, "extra", note="not in the golden (ignored)"))
    return Report(m["case"], str(case_dir), "acceptance", mode, rows)


ACCEPTANCE_RESULT_KEYS = ("num_accepted", "tokens", "residual_fallback", "is_bonus")


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


def _json_str(x) -> str:
    """A value as JSON writes it (true, 1, 1.0, [0, 2]), so type differences show in reports."""
    try:
        return json.dumps(x)
    except (TypeError, ValueError):
        return repr(x)


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


# ===========================================================================================
# reports
# ===========================================================================================
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


# ===========================================================================================
# shipped cases and the recipe
# ===========================================================================================
def shipped_dir() -> Path:
    """The directory of the installed package ``refmtp.golden`` (the repository's golden/)."""
    from importlib.resources import files

    root = files("refmtp.golden")
    path = Path(str(root))
    if not path.is_dir():
        raise GoldenError(f"the shipped golden cases are not a directory on disk ({root!s}): "
                          "install refmtp unzipped")
    return path


def case_dirs(root) -> list[Path]:
    """Every case directory under a golden root: the recipe's cases (which must exist) plus
    any other sub-directory holding a manifest."""
    root = Path(root)
    found = {p.parent for p in root.glob(f"*/{MANIFEST}")}
    recipe = root / RECIPE
    if recipe.is_file():
        for name in load_recipe(recipe)["cases"]:
            d = root / name
            if not (d / MANIFEST).is_file():
                raise GoldenError(f"{recipe} lists case {name} but {d / MANIFEST} is not there "
                                  "(HINT: `refmtp golden generate`)")
            found.add(d)
    if not found:
        raise GoldenError(f"{root} holds no golden case (no */{MANIFEST})")
    return sorted(found)


def shipped_case(name: str) -> Path | None:
    """The shipped case directory called ``name``, or None when no shipped case has that name."""
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", str(name)):
        return None
    d = shipped_dir() / str(name)
    return d if (d / MANIFEST).is_file() else None


def list_cases(root=None) -> list[dict]:
    """One entry per case under ``root`` (default: the shipped cases), from its manifest:
    ``{name, kind, dtype, count, unit, description, path}``; ``count`` is the number of expected
    tensors (model, trajectory) or records (acceptance)."""
    out = []
    for d in case_dirs(shipped_dir() if root is None else root):
        m = read_manifest(d)
        acc = m["kind"] == "acceptance"
        count = m.get("records") if acc else len(m.get("tensors", {}))
        out.append({"name": d.name, "kind": m["kind"], "dtype": m["dtype"], "count": count,
                    "unit": "records" if acc else "tensors", "description": m.get("description", ""),
                    "path": str(d)})
    return out


def load_recipe(path) -> dict:
    recipe = read_json(path, "recipe")
    if not isinstance(recipe, dict) or not isinstance(recipe.get("cases"), dict) or not recipe["cases"]:
        raise GoldenError(f"{path}: a recipe is an object with a non-empty 'cases' object")
    for name, entry in recipe["cases"].items():
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
            raise GoldenError(f"{path}: case name {name!r} must be letters, digits, _ or -")
        if not isinstance(entry, dict) or entry.get("kind", "model") not in KINDS:
            raise GoldenError(f"{path}: case {name} must be an object with kind {' or '.join(KINDS)}")
        if entry.get("kind", "model") != "acceptance":
            need = ("seed", "batch", "dtype", "description", "reason")
            if entry.get("kind") == "decode":
                need += ("schedule",)
            else:
                need += ("seq_len",)
            if entry.get("kind") == "trajectory":
                need += ("steps", "train")
            for key in need:
                if key not in entry:
                    raise GoldenError(f"{path}: case {name} lacks {key!r}")
        elif "builder" not in entry:
            raise GoldenError(f"{path}: acceptance case {name} lacks 'builder' (module:function)")
    return recipe


def _builder(spec: str):
    import importlib

    module, _, attr = spec.partition(":")
    if not module.startswith("refmtp.") or not attr:
        raise ValueError(f"builder {spec!r} must be 'refmtp.<module>:<function>'")
    return getattr(importlib.import_module(module), attr)


def generate_case(out_root, name: str, entry: dict) -> dict:
    """(Re)make one recipe case under ``out_root/name``; returns its manifest."""
    command = f"refmtp golden generate --case {name}"
    common = {"reason": entry.get("reason", ""), "recipe": entry}
    if entry.get("kind", "model") == "acceptance":
        records = [acceptance_record(c) for c in _builder(entry["builder"])()]
        return export_acceptance_case(Path(out_root) / name, records, name=name,
                                      description=entry.get("description", ""), command=command,
                                      extra=common)
    cfg = config_from_recipe(entry)
    if entry.get("kind") == "trajectory":
        return export_trajectory_case(
            Path(out_root) / name, cfg, seed=entry["seed"], steps=entry["steps"],
            train=entry["train"], batch=entry["batch"], seq_len=entry["seq_len"],
            dtype=entry["dtype"], name=name, description=entry["description"], command=command,
            init_std=entry.get("init_std", DEFAULT_INIT_STD),
            bias_std=entry.get("bias_std", DEFAULT_BIAS_STD), extra=common)
    if entry.get("kind") == "decode":
        return export_decode_case(
            Path(out_root) / name, cfg, seed=entry["seed"], schedule=entry["schedule"],
            batch=entry["batch"], dtype=entry["dtype"], name=name,
            description=entry["description"], command=command,
            init_std=entry.get("init_std", DEFAULT_INIT_STD),
            bias_std=entry.get("bias_std", DEFAULT_BIAS_STD), perturb=_perturbations(entry),
            extra=common)
    return export_model_case(
        Path(out_root) / name, cfg, seed=entry["seed"], batch=entry["batch"],
        seq_len=entry["seq_len"], dtype=entry["dtype"], name=name,
        description=entry["description"], command=command,
        init_std=entry.get("init_std", DEFAULT_INIT_STD),
        bias_std=entry.get("bias_std", DEFAULT_BIAS_STD), perturb=_perturbations(entry),
        extra=common)


def generate(out_root=None, recipe_path=None, only=None, log=None) -> list[str]:
    """Regenerate the recipe's cases (all, or the names in ``only``) under ``out_root``.

    Defaults: the shipped recipe and the shipped directory. A recipe copy is written next to
    the cases when ``out_root`` is elsewhere, so the tree is self-describing.
    """
    recipe_path = Path(recipe_path) if recipe_path else shipped_dir() / RECIPE
    out_root = Path(out_root) if out_root else recipe_path.parent
    recipe = load_recipe(recipe_path)
    names = list(recipe["cases"]) if not only else list(only)
    for name in names:
        if name not in recipe["cases"]:
            raise ValueError(f"case {name!r} is not in {recipe_path} (known: {', '.join(recipe['cases'])})")
    out_root.mkdir(parents=True, exist_ok=True)
    if (out_root / RECIPE).resolve() != recipe_path.resolve():
        (out_root / RECIPE).write_bytes(recipe_path.read_bytes())
    for name in names:
        generate_case(out_root, name, recipe["cases"][name])
        if log:
            log(f"  generated {name}")
    stale = sorted(p.parent.name for p in out_root.glob(f"*/{MANIFEST}") if p.parent.name not in recipe["cases"])
    if stale and log:
        log(f"  warning: {', '.join(stale)} not in the recipe (left as they are; delete them if obsolete)")
    return names
