"""The reduced-precision verdict (`refmtp golden verify CASE --against OUT --precision P`) and the
emulation it is derived from (refmtp/precision.py; docs/precision.md).

refmtp's own emulated runs must pass the verdict of their precision on every case the
thresholds come from; the same runs with a bug-catalog mutant active must fail it; float64
exact outputs pass every precision; bad input exits 2 with one line.
"""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from refmtp.mutation import mutation
from refmtp.precision import emulate, round_to, round_weights, rounded
from refmtp.verification.golden import precision as P
from refmtp.verification.golden.files import read_tensors, save_tensors
from refmtp.verification.golden.manifest import read_manifest
from refmtp.verification.golden.recipe import case_dirs, shipped_dir
from tests.test_golden_cli import one_error_line, run

ml_dtypes = pytest.importorskip("ml_dtypes", reason="the bf16 emulation needs ml_dtypes (test extra)")

ROOT = shipped_dir()
TENSOR_CASES = [d.name for d in case_dirs(ROOT) if read_manifest(d)["kind"] in P.TENSOR_KINDS]
OTHER_CASES = [d.name for d in case_dirs(ROOT) if read_manifest(d)["kind"] not in P.TENSOR_KINDS]
MUTANTS = ["router.no_scaling", "mla.no_causal_mask", "rope.neox_pairs"]
SPEC_CASES = [c for c in TENSOR_CASES if read_manifest(ROOT / c)["kind"] == "speculative"]


def emulated_file(tmp_path, case, precision, *mutants):
    with mutation(*mutants):
        out = P.emulated_outputs(ROOT / case, precision)
    path = tmp_path / f"{case}.{precision}.safetensors"
    save_tensors(path, {k: np.asarray(v) for k, v in out.items()})
    return path


# --- the emulation ---------------------------------------------------------------------------
def test_rounded_is_the_identity_when_no_emulation_is_active():
    x = np.linspace(-3, 3, 7)
    assert rounded(x) is x


def test_emulation_rounds_to_nearest_even_in_the_input_dtype():
    x = np.array([1.0 + 2.0 ** -9, 1.0 + 3 * 2.0 ** -9, 1.0 + 2.0 ** -12, 300.5], dtype=np.float32)
    with emulate("bf16"):
        b = rounded(x)
    assert b.dtype == np.float32
    np.testing.assert_array_equal(b, x.astype(ml_dtypes.bfloat16).astype(np.float32))
    assert b[0] == 1.0 and b[1] == 1.0 + 2.0 ** -7  # ties to even
    with emulate("fp16"):
        np.testing.assert_array_equal(rounded(x), x.astype(np.float16).astype(np.float32))
    with emulate("fp32"):
        np.testing.assert_array_equal(rounded(x), x)
    assert rounded(x) is x  # off again


def test_emulation_refuses_unknown_precisions_and_nesting():
    with pytest.raises(ValueError, match="choose one of bf16, fp16, fp32"):
        with emulate("bf8"):
            pass
    with emulate("bf16"):
        with pytest.raises(ValueError, match="already active"):
            with emulate("fp16"):
                pass


def test_round_weights_keeps_the_float32_bias():
    params = {"model.layers.1.mlp.gate.e_score_correction_bias": np.array([0.1, 0.2], np.float32),
              "model.embed_tokens.weight": np.array([[0.1, 0.2]], np.float32)}
    r = round_weights(params, "bf16")
    assert r["model.layers.1.mlp.gate.e_score_correction_bias"] is params[
        "model.layers.1.mlp.gate.e_score_correction_bias"]
    np.testing.assert_array_equal(r["model.embed_tokens.weight"],
                                  round_to(params["model.embed_tokens.weight"], "bf16"))


# --- the verdict on refmtp's own emulated runs -----------------------------------------------------
@pytest.mark.parametrize("case", TENSOR_CASES)
def test_emulated_bf16_run_passes_bf16_and_fails_fp32(tmp_path, case):
    path = emulated_file(tmp_path, case, "bf16")
    r = P.verify_precision(ROOT / case, path, "bf16")
    assert r.status == "pass", P.format_precision_report(r)
    if case in SPEC_CASES:
        assert {row.group for row in r.rows} & {"spec_greedy", "spec_sampled"}
        if read_manifest(ROOT / case)["speculative"]["temperature"] == 0:
            return  # refmtp's bf16 reproduces the greedy generations exactly: fp32 passes too
    else:
        assert {row.group for row in r.rows} >= {"logits"}
    assert P.verify_precision(ROOT / case, path, "fp32").status == "mismatch"


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
@pytest.mark.parametrize("case", ["tiny_d2", "decode"])
def test_emulated_fp16_and_fp32_runs_pass_their_precision(tmp_path, case, precision):
    path = emulated_file(tmp_path, case, precision)
    r = P.verify_precision(ROOT / case, path, precision)
    assert r.status == "pass", P.format_precision_report(r)


@pytest.mark.parametrize("mutant", MUTANTS)
@pytest.mark.parametrize("case", ["tiny_d1", "decode"])
def test_emulated_bf16_run_with_a_mutant_fails_bf16(tmp_path, case, mutant):
    path = emulated_file(tmp_path, case, "bf16", mutant)
    r = P.verify_precision(ROOT / case, path, "bf16")
    assert r.status == "mismatch", P.format_precision_report(r)
    assert r.exit_code == 1


# --- speculative cases: accepted-token agreement ---------------------------------------------
def test_speculative_cases_are_judged_by_accepted_token_agreement(tmp_path):
    assert SPEC_CASES == ["spec_greedy_k1", "spec_greedy_k3_reuse", "spec_t1_k2"]
    for case in SPEC_CASES:
        r = P.verify_precision(ROOT / case, emulated_file(tmp_path, case, "bf16"), "bf16")
        groups = {row.group for row in r.rows}
        T = read_manifest(ROOT / case)["speculative"]["temperature"]
        assert groups == ({"spec_greedy"} if T == 0 else {"spec_sampled", "spec_p", "spec_q"}), groups
        stats = {(row.group, row.statistic) for row in r.rows}
        assert {(g, "step_agreement") for g in groups if g.startswith("spec_s") or g == "spec_greedy"} <= stats


@pytest.mark.parametrize("case, mutant", [
    ("spec_greedy_k1", "router.no_scaling"), ("spec_greedy_k1", "mla.no_causal_mask"),
    ("spec_greedy_k3_reuse", "acceptance.greedy_ties_last"),
    ("spec_t1_k2", "router.no_scaling"), ("spec_t1_k2", "mla.no_causal_mask"),
    ("spec_t1_k2", "acceptance.residual_softmax"),  # a greedy generation never samples a residual
])
def test_emulated_bf16_speculative_run_with_a_mutant_fails_bf16(tmp_path, case, mutant):
    r = P.verify_precision(ROOT / case, emulated_file(tmp_path, case, "bf16", mutant), "bf16")
    assert r.status == "mismatch", P.format_precision_report(r)
    assert any(row.group in ("spec_greedy", "spec_sampled") and row.status == "FAIL" for row in r.rows), \
        P.format_precision_report(r)


def test_accepted_token_agreement_aligns_steps_by_offset():
    """A generation that drafts differently but emits the same tokens lines up again; the
    statistics of the tampered steps, and of a diverged sequence, are what the doc says."""
    exp = read_tensors(ROOT / "spec_greedy_k1" / "expected.safetensors")
    same, _, _ = P.accepted_token_agreement(exp, exp, 0.0)
    assert same == {"spec_greedy": {"step_agreement": 1.0, "final_prefix": 1.0}}
    S = sum(1 for n in exp if n.endswith(".num_accepted"))
    out = dict(exp)
    s = next(s for s in range(S) if len(exp[f"spec.{s}.tokens"]) >= 2)  # an accepted draft
    t = exp[f"spec.{s}.tokens"].copy()
    t[-1] = (t[-1] + 1) % exp[f"spec.{s}.p"].shape[-1]  # the step's correction token differs
    out[f"spec.{s}.tokens"] = t
    fin = exp["spec.final_tokens"].copy()
    off = sum(len(exp[f"spec.{i}.tokens"]) for i in range(s))
    fin[off + len(t) - 1] = t[-1]
    out["spec.final_tokens"] = fin
    st, missing, bad = P.accepted_token_agreement(exp, out, 0.0)
    assert not missing and not bad
    assert st["spec_greedy"]["final_prefix"] == (off + len(t) - 1) / len(fin)
    assert st["spec_greedy"]["step_agreement"] == s / (s + 1)  # the steps after the divergence are not compared
    del out["spec.final_tokens"]
    assert P.accepted_token_agreement(exp, out, 0.0)[1] == ["spec.final_tokens"]


@pytest.mark.parametrize("precision", P.PRECISIONS)
def test_float64_exact_outputs_pass_every_precision(tmp_path, precision):
    for case in ("tiny_d2", "decode", "tiny_d2_f32", "spec_greedy_k3_reuse", "spec_t1_k2"):
        path = tmp_path / f"{case}.safetensors"
        save_tensors(path, read_tensors(ROOT / case / "expected.safetensors"))
        r = P.verify_precision(ROOT / case, path, precision)
        assert r.status == "pass", P.format_precision_report(r)
        assert all(row.value == (1.0 if P.higher_is_better(row.statistic) else 0.0) for row in r.rows)


# --- the CLI ---------------------------------------------------------------------------------
def test_cli_prints_the_table_and_exits_0_or_1(tmp_path):
    good = emulated_file(tmp_path, "tiny_d1", "bf16")
    code, out = run("verify", "tiny_d1", "--against", good, "--precision", "bf16")
    assert code == 0, out
    assert "logits       top1_agreement" in out and "PASS:" in out
    bad = emulated_file(tmp_path, "tiny_d1", "bf16", "router.no_scaling")
    code, out = run("verify", "tiny_d1", "--against", bad, "--precision", "bf16")
    assert code == 1, out
    assert "MISMATCH:" in out and "FAIL" in out


@pytest.mark.parametrize("args", [
    ["--precision", "bf8"],
    ["--precision", "BF16"],
])
def test_cli_bad_precision_is_one_line_exit_2(tmp_path, args):
    code, out = run("verify", "tiny_d1", "--against", tmp_path / "x.safetensors", *args)
    assert code == 2
    assert "choose one of bf16, fp16, fp32" in one_error_line(out)


def test_cli_precision_needs_against_and_a_tensor_case(tmp_path):
    code, out = run("verify", "tiny_d1", "--precision", "bf16")
    assert code == 2 and "--against" in one_error_line(out)
    out_file = tmp_path / "o.safetensors"
    save_tensors(out_file, {"logits": np.zeros(1)})
    for case in OTHER_CASES:
        code, out = run("verify", case, "--against", out_file, "--precision", "bf16")
        line = one_error_line(out)
        assert code == 2 and "--precision judges model, decode and speculative cases" in line, line
    assert {read_manifest(ROOT / c)["kind"] for c in OTHER_CASES} == {"trajectory", "acceptance"}


def test_missing_tensors_fail_unless_allowed(tmp_path):
    exp = read_tensors(ROOT / "tiny_d1" / "expected.safetensors")
    path = tmp_path / "part.safetensors"
    save_tensors(path, {"logits": exp["logits"]})
    code, out = run("verify", "tiny_d1", "--against", path, "--precision", "bf16")
    assert code == 1 and "missing (" in out
    code, out = run("verify", "tiny_d1", "--against", path, "--precision", "bf16", "--allow-missing")
    assert code == 0 and "not checked (" in out, out


def _save_bf16(path, tensors: dict):
    """A safetensors file with BF16 tensors written by hand (numpy has no bfloat16)."""
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        a = np.array(tensors[name], order="C")  # (ascontiguousarray would make scalars 1-d)
        raw = a.astype(ml_dtypes.bfloat16).view(np.uint16).astype("<u2").tobytes() \
            if a.dtype.kind == "f" else a.astype("<i8").tobytes()
        header[name] = {"dtype": "BF16" if a.dtype.kind == "f" else "I64", "shape": list(a.shape),
                        "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def test_bf16_tensors_in_the_outputs_are_read_exactly(tmp_path):
    out = {k: np.asarray(v) for k, v in P.emulated_outputs(ROOT / "tiny_d1", "bf16").items()}
    path = tmp_path / "bf16.safetensors"
    _save_bf16(path, out)
    back = P.read_outputs(path)
    assert back["logits"].dtype == np.float32
    np.testing.assert_array_equal(back["logits"], out["logits"])  # already bf16 values
    np.testing.assert_array_equal(back["routing.1.topk_idx"], out["routing.1.topk_idx"])
    code, text = run("verify", "tiny_d1", "--against", path, "--precision", "bf16")
    assert code == 0, text


# --- the thresholds file ---------------------------------------------------------------------
def test_thresholds_cover_the_shipped_cases_and_match_the_doc():
    data = P.load_thresholds()
    assert data["cases"] == TENSOR_CASES
    assert set(data["precisions"]) == set(P.PRECISIONS)
    for p, groups in data["precisions"].items():
        for g, stats in groups.items():
            for s, e in stats.items():
                worse = e["threshold"] <= e["emulated_worst"] if P.higher_is_better(s) \
                    else e["threshold"] >= e["emulated_worst"]
                assert worse, (p, g, s, e)
    page = (ROOT.parent / "docs" / "precision.md").read_text(encoding="utf-8")
    assert P.render_doc(page, data) == page, "regenerate: refmtp golden precision --write"


def test_the_thresholds_are_what_the_command_derives():
    """`refmtp golden precision` re-derives the stored file: bf16 and fp16 to 1 % (their
    rounding dominates; other BLAS libraries sum float32 in another order). The fp32 rows are
    float32 arithmetic itself, so they move with the BLAS kernels a machine gets (measured: 0.6x
    to 1.4x between OpenBLAS's Haswell and SkylakeX kernels): there this machine's own fp32 run
    must pass the stored threshold, and its worst case must be within 2x of the stored one."""
    code, out = run("precision")
    assert code == 0, out
    assert "| logits | top1_agreement |" in out
    fresh, stored = P.derive_thresholds(), P.load_thresholds()
    assert fresh["cases"] == stored["cases"] and fresh["margins"] == stored["margins"]
    for p, groups in stored["precisions"].items():
        assert set(fresh["precisions"][p]) == set(groups)
        for g, stats in groups.items():
            for s, e in stats.items():
                f = fresh["precisions"][p][g][s]
                if p != "fp32":
                    assert f["threshold"] == pytest.approx(e["threshold"], rel=1e-2, abs=1e-12), (p, g, s)
                    continue
                if P.higher_is_better(s):
                    assert f["emulated_worst"] >= e["threshold"], (p, g, s, f, e)
                else:
                    assert f["emulated_worst"] <= e["threshold"], (p, g, s, f, e)
                    if e["emulated_worst"] > 0:
                        assert 0.5 <= f["emulated_worst"] / e["emulated_worst"] <= 2.0, (p, g, s, f, e)
