"""Verify one case directory: hashes first, then recompute with refmtp (or compare the
``--against`` file of another implementation) within the manifest's tolerances."""
from __future__ import annotations

from pathlib import Path

import numpy as np  # host-side only: dtype checks of the read tensors

from refmtp.backends import get_backend, set_kernels_enabled
from refmtp.checkpoint import load_checkpoint
from refmtp.verification.golden.acceptance import verify_acceptance
from refmtp.verification.golden.cases import compute_case, compute_decode, compute_trajectory
from refmtp.verification.golden.compare import Report, compare_tensors
from refmtp.verification.golden.files import MANIFEST, RECIPE, GoldenError, read_tensors
from refmtp.verification.golden.manifest import (check_files, check_schedule, read_manifest,
                                                 refmtp_version)
from refmtp.verification.golden.recipe import load_recipe, shipped_dir
from refmtp.verification.golden.speculative import first_divergence, recompute_speculative


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
        return verify_acceptance(case_dir, m, backend, against, allow_missing)
    expected = read_tensors(case_dir / "expected.safetensors", "golden file")
    table = m["tolerances"]
    if against is not None:
        _refuse_json_outputs(against, m)
        actual = read_tensors(against, "outputs file")
        rows = compare_tensors(expected, actual, table, allow_missing=allow_missing)
        report = Report(m["case"], str(case_dir), m["kind"], f"against {against}", rows)
        report.hints += dtype_hints(expected, actual, m)
    else:
        actual = recompute(case_dir, m, backend)
        rows = compare_tensors(expected, actual, table)
        report = Report(m["case"], str(case_dir), m["kind"], f"recompute ({backend})", rows)
    if m["kind"] == "speculative" and report.status != "pass":  # where the generation leaves the golden one, and why
        line = first_divergence(expected, actual, table)
        if line:
            report.hints.append(line)
    if m.get("refmtp_version") != refmtp_version():
        report.notes.append(f"made by refmtp {m.get('refmtp_version')}, verified with {refmtp_version()}")
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


def recompute(case_dir: Path, m: dict, backend: str, *, dtype: str | None = None, prepare=None) -> dict:
    """:func:`_recompute` on the plain array path, the path `golden generate` takes (kernels off):
    the fused kernels round differently, within their parity bounds but not always within a
    float64 case's tolerance (kernels are checked against their references by their parity tests;
    tests/test_golden.py also runs the shipped cases with kernels on)."""
    previous = set_kernels_enabled(False)
    try:
        return _recompute(case_dir, m, backend, dtype=dtype, prepare=prepare)
    finally:
        set_kernels_enabled(previous)


def _recompute(case_dir: Path, m: dict, backend: str, *, dtype: str | None = None, prepare=None) -> dict:
    """What refmtp computes on ``backend`` for a tensor case (model, trajectory, decode or speculative) whose
    manifest ``m`` is already read: the golden names -> host arrays.

    ``dtype`` loads the parameters in another float dtype than the case's, and ``prepare``
    (params -> params) transforms them first: the reduced-precision emulation uses both
    (float32, weights rounded; refmtp.verification.golden.precision)."""
    dtype = dtype or m["dtype"]
    if dtype not in ("float64", "float32"):
        raise GoldenError(f"{case_dir / MANIFEST}: dtype {dtype!r} is not float64 or float32")
    bk = get_backend(backend)
    try:
        cfg, params = load_checkpoint(case_dir, backend=bk, dtype=dtype)
    except (ValueError, KeyError, OSError) as exc:
        raise GoldenError(f"{case_dir}: the checkpoint does not load: {str(exc).splitlines()[0]}") from None
    if prepare is not None:
        params = prepare(params)
    inputs = read_tensors(case_dir / "inputs.safetensors", "golden file")
    if m["kind"] == "decode":
        return _recompute_decode(case_dir, m, cfg, params, inputs)
    if m["kind"] == "speculative":
        return recompute_speculative(case_dir, m, cfg, params, inputs)
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
