"""Golden files: the shipped cases verify, tampering is caught, generation is byte-stable.

The expected numbers live in golden/ (made by `refmtp golden generate`), never in this file.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from refmtp.verification.golden.acceptance import (dyadic_str, parse_dyadic, read_records,
                                                   record_inputs, result_dict)
from refmtp.verification.golden.cases import MIN_ROUTING_MARGIN, compute_case, export_model_case
from refmtp.verification.golden.compare import (TOLERANCES, compare_tensor, compare_tensors,
                                                tolerance_for, tolerance_table)
from refmtp.verification.golden.files import (ACCEPTANCE_FILE, FORMAT_VERSION, MANIFEST,
                                              RECIPE as RECIPE_FILE, GoldenError, read_tensors,
                                              save_tensors, write_json)
from refmtp.verification.golden.manifest import file_entries, read_manifest
from refmtp.verification.golden.recipe import config_from_recipe, generate, load_recipe, shipped_cases, shipped_dir
from refmtp.verification.golden.report import format_report
from refmtp.verification.golden.verify import verify_case
from refmtp.cli.main import cli

ROOT = shipped_dir()
RECIPE = load_recipe(ROOT / RECIPE_FILE)
SHIPPED = shipped_cases(RECIPE)  # the on-demand cases: tests/test_golden_v3_geometry.py
CASES = list(SHIPPED)
MODEL_CASES = [n for n, e in SHIPPED.items() if e.get("kind", "model") == "model"]
DOCS = Path(__file__).resolve().parents[1] / "docs" / "golden-format.md"


def run(*args):
    """Invoke the CLI; returns (exit code, stdout + stderr)."""
    res = CliRunner().invoke(cli, ["golden", *map(str, args)])
    return res.exit_code, res.output


def copy_case(tmp_path, name="tiny_d1") -> Path:
    dst = tmp_path / name
    shutil.copytree(ROOT / name, dst)
    return dst


def rehash(case_dir: Path) -> None:
    """Rewrite the manifest's sha256s (to test what the hash check alone would not catch)."""
    m = json.loads((case_dir / MANIFEST).read_text())
    m["files"] = file_entries(case_dir, m["files"])
    write_json(case_dir / MANIFEST, m)


def one_error_line(out: str) -> str:
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert "Traceback" not in out
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    return lines[0]


# -------------------------------------------------------------------------------------------
# the shipped cases
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_shipped_case_verifies(name, backend):
    report = verify_case(ROOT / name, backend=backend.name)
    assert report.status == "pass", format_report(report, verbose=False)
    n = len(read_manifest(ROOT / name).get("tensors", {})) or read_manifest(ROOT / name)["records"]
    assert sum(r.status == "pass" for r in report.rows) == n


@pytest.mark.parametrize("name", [c for c in CASES if read_manifest(ROOT / c)["kind"] != "acceptance"])
def test_shipped_case_verifies_with_kernels_on(name, monkeypatch):
    """verify recomputes on the plain array path (as generate does); the Numba kernels, which round
    differently within their parity bounds, also stay inside every shipped case's tolerance."""
    import refmtp.verification.golden.verify as V
    from refmtp.backends import kernels_enabled

    if not kernels_enabled():
        pytest.skip("kernels are switched off (REFMTP_KERNELS=0)")
    seen = []
    monkeypatch.setattr(V, "set_kernels_enabled", lambda flag: seen.append(flag) or True)
    report = verify_case(ROOT / name, backend="numpy")
    assert seen == [False, True] and kernels_enabled()
    assert report.status == "pass", format_report(report, verbose=False)


def test_cli_verify_all_shipped():
    code, out = run("verify")
    assert code == 0, out
    assert f"{len(CASES)} cases: all pass" in out
    code2, out2 = run("verify", "--all")
    assert code2 == 0 and out2 == out


def test_shipped_set_covers_the_required_variants():
    cfgs = {n: config_from_recipe(e) for n, e in SHIPPED.items() if e.get("kind", "model") != "acceptance"}
    dtypes = {n: SHIPPED[n]["dtype"] for n in cfgs}
    f64 = [n for n in cfgs if dtypes[n] == "float64"]
    assert any(cfgs[n].D == 1 and cfgs[n].refmtp.mtp_kind == "causal" for n in f64)
    assert any(cfgs[n].D == 2 and cfgs[n].refmtp.mtp_kind == "causal" for n in f64)
    assert any(1 < cfgs[n].topk_group < cfgs[n].n_group for n in f64)
    assert any(cfgs[n].rope_scaling is not None for n in f64)
    assert any(cfgs[n].q_lora_rank is None for n in f64)
    assert any(cfgs[n].refmtp.mtp_kind == "parallel" for n in f64)
    assert any(d == "float32" for d in dtypes.values())
    acc = [n for n, e in SHIPPED.items() if e.get("kind") == "acceptance"]
    assert len(acc) == 1 and len(read_records(ROOT / acc[0])) >= 40
    total = sum(p.stat().st_size for p in ROOT.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert total < 8_000_000, f"golden/ holds {total} bytes (the project keeps it under 10 MB; 8 MB leaves room)"


def test_every_parameter_has_a_gradient_and_routing_is_recorded():
    from refmtp.checkpoint import load_checkpoint
    from refmtp.params import is_bias

    for name in MODEL_CASES:
        cfg, params = load_checkpoint(ROOT / name, backend="numpy")
        exp = read_tensors(ROOT / name / "expected.safetensors")
        grads = {k[5:] for k in exp if k.startswith("grad.")}
        assert grads == {k for k in params if not is_bias(k)}, name
        moe = [layer for layer in range(cfg.num_hidden_layers + cfg.D) if cfg.is_moe_layer(layer)]
        for layer in moe:
            assert f"routing.{layer}.topk_idx" in exp and f"bias_after_update.{layer}" in exp
        assert sorted(k for k in exp if k.startswith("mtp_logits.")) == [f"mtp_logits.{k}" for k in range(1, cfg.D + 1)]
        biases = [v for k, v in params.items() if is_bias(k)]
        assert biases and all(np.any(b != 0) and b.dtype == np.float32 for b in biases)


def _recompute(name, **changes):
    from refmtp.checkpoint import load_checkpoint

    cfg, params = load_checkpoint(ROOT / name, backend="numpy")
    tokens = read_tensors(ROOT / name / "inputs.safetensors")["tokens"]
    zero_bias = changes.pop("zero_bias", False)
    if zero_bias:
        params = {k: (np.zeros_like(v) if k.endswith("e_score_correction_bias") else v) for k, v in params.items()}
    if changes:
        cfg = cfg.replace(**changes)
    return compute_case(cfg, params, tokens)


def _routing_differs(a, b):
    return sum(int(np.any(np.sort(a[k], -1) != np.sort(b[k], -1))) for k in a if k.endswith("topk_idx"))


def test_cases_pin_what_they_claim():
    """The bias, the group limit and YaRN each change the numbers of their case."""
    for name in MODEL_CASES:
        exp = read_tensors(ROOT / name / "expected.safetensors")
        assert _routing_differs(exp, _recompute(name, zero_bias=True)) > 0, f"{name}: bias changes no routing"
    gl = next(n for n in MODEL_CASES if 1 < config_from_recipe(SHIPPED[n]).topk_group
              < config_from_recipe(SHIPPED[n]).n_group)
    cfg = config_from_recipe(SHIPPED[gl])
    exp = read_tensors(ROOT / gl / "expected.safetensors")
    assert _routing_differs(exp, _recompute(gl, topk_group=cfg.n_group)) > 0
    yarn = next(n for n in MODEL_CASES if config_from_recipe(SHIPPED[n]).rope_scaling)
    exp = read_tensors(ROOT / yarn / "expected.safetensors")
    assert np.max(np.abs(exp["logits"] - _recompute(yarn, rope_scaling=None)["logits"])) > 1e-3


def test_float32_tolerance_admits_an_exact_implementation():
    """The float64 result for the float32 case's weights passes the float32 tolerances."""
    from refmtp.checkpoint import load_checkpoint

    name = next(n for n in MODEL_CASES if SHIPPED[n]["dtype"] == "float32")
    cfg, params = load_checkpoint(ROOT / name, backend="numpy", dtype="float64")
    tokens = read_tensors(ROOT / name / "inputs.safetensors")["tokens"]
    exact = compute_case(cfg, params, tokens)
    exp = read_tensors(ROOT / name / "expected.safetensors")
    rows = compare_tensors(exp, exact, read_manifest(ROOT / name)["tolerances"])
    assert all(r.status == "pass" for r in rows), [r for r in rows if r.status != "pass"][:3]


# -------------------------------------------------------------------------------------------
# tampering and foreign files: exit 2 with one line
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fname", ["expected.safetensors", "model.safetensors", "config.json", "inputs.safetensors"])
def test_flipped_byte_exits_2(tmp_path, fname):
    d = copy_case(tmp_path)
    data = bytearray((d / fname).read_bytes())
    data[len(data) // 2] ^= 0x01
    (d / fname).write_bytes(bytes(data))
    code, out = run("verify", d)
    assert code == 2
    assert "sha256" in one_error_line(out) and fname in out


def test_truncated_file_exits_2(tmp_path):
    d = copy_case(tmp_path)
    f = d / "expected.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    code, out = run("verify", d)
    assert code == 2 and "bytes, the manifest says" in one_error_line(out)


def test_pickle_exits_2(tmp_path):
    import pickle

    d = copy_case(tmp_path)
    (d / "model.safetensors").write_bytes(pickle.dumps({"x": [1, 2, 3]}))
    code, out = run("verify", d)
    assert code == 2 and "is a Python pickle" in one_error_line(out)
    rehash(d)  # even with matching hashes the pickle is refused before any parser sees it
    code, out = run("verify", d)
    assert code == 2 and "is a Python pickle" in one_error_line(out)
    (tmp_path / "out.pt").write_bytes(pickle.dumps({"logits": 1}))
    code, out = run("verify", ROOT / "tiny_d1", "--against", tmp_path / "out.pt")
    assert code == 2 and "is a Python pickle" in one_error_line(out)
    import zipfile

    with zipfile.ZipFile(tmp_path / "out.zip", "w") as z:  # what torch.save writes
        z.writestr("archive/data.pkl", pickle.dumps({"logits": 1}))
    code, out = run("verify", ROOT / "tiny_d1", "--against", tmp_path / "out.zip")
    assert code == 2 and "zip archive" in one_error_line(out)


def test_missing_and_unlisted_files_exit_2(tmp_path):
    d = copy_case(tmp_path)
    (d / "inputs.safetensors").unlink()
    code, out = run("verify", d)
    assert code == 2 and "inputs.safetensors" in one_error_line(out) and "not there" in out
    d2 = copy_case(tmp_path / "b")
    (d2 / "weights.bin").write_bytes(b"\x00" * 16)
    code, out = run("verify", d2)
    assert code == 2 and "not listed" in one_error_line(out)


def test_bad_manifest_exits_2(tmp_path):
    d = copy_case(tmp_path)
    (d / MANIFEST).write_text("{not json")
    code, out = run("verify", d)
    assert code == 2 and "JSON" in one_error_line(out)
    m = json.loads((ROOT / "tiny_d1" / MANIFEST).read_text())
    m["format_version"] = FORMAT_VERSION + 1
    write_json(d / MANIFEST, m)
    code, out = run("verify", d)
    assert code == 2 and "HINT" in one_error_line(out)
    code, out = run("verify", tmp_path / "nowhere")
    assert code == 2
    one_error_line(out)


def test_consistent_but_wrong_case_is_a_mismatch(tmp_path):
    """A re-hashed case whose expected value was edited fails the recomputation (exit 1)."""
    d = copy_case(tmp_path)
    exp = read_tensors(d / "expected.safetensors")
    exp["grad.model.norm.weight"] = exp["grad.model.norm.weight"] * (1 + 1e-6)
    save_tensors(d / "expected.safetensors", exp)
    rehash(d)
    code, out = run("verify", d)
    assert code == 1
    assert re.search(r"grad\.model\.norm\.weight .* FAIL", out)
    assert "MISMATCH: " in out


# -------------------------------------------------------------------------------------------
# --against: another implementation's outputs
# -------------------------------------------------------------------------------------------
def test_against_identical_outputs_pass(tmp_path):
    exp = read_tensors(ROOT / "tiny_d2" / "expected.safetensors")
    # another implementation: float64 values, top-K in a different order per token
    out = dict(exp)
    for k in [k for k in exp if k.endswith("topk_idx")]:
        w = k.replace("topk_idx", "topk_weight")
        out[k], out[w] = exp[k][..., ::-1].copy(), exp[w][..., ::-1].copy()
    save_tensors(tmp_path / "out.safetensors", out)
    code, text = run("verify", ROOT / "tiny_d2", "--against", tmp_path / "out.safetensors")
    assert code == 0, text
    assert "max abs err" in text and "PASS" in text


def test_against_perturbed_output_exits_1_with_table(tmp_path):
    exp = read_tensors(ROOT / "tiny_d2" / "expected.safetensors")
    out = dict(exp)
    out["logits"] = exp["logits"] + 1e-6 * np.abs(exp["logits"]).max()
    out["extra.thing"] = np.zeros(3)
    save_tensors(tmp_path / "out.safetensors", out)
    code, text = run("verify", ROOT / "tiny_d2", "--against", tmp_path / "out.safetensors")
    assert code == 1
    row = next(ln for ln in text.splitlines() if ln.split()[:1] == ["logits"])
    assert " FAIL " in row and "worst at" in row
    assert re.search(r"mtp_logits\.1 .* pass", text)
    assert "extra.thing" in text and "ignored" in text


def test_against_missing_keys_listed(tmp_path):
    exp = read_tensors(ROOT / "tiny_d1" / "expected.safetensors")
    keep = {k: v for k, v in exp.items() if k.startswith(("logits", "mtp_logits", "loss."))}
    save_tensors(tmp_path / "out.safetensors", keep)
    code, text = run("verify", ROOT / "tiny_d1", "--against", tmp_path / "out.safetensors")
    assert code == 1 and "missing (" in text and "grad.lm_head.weight" in text
    code, text = run("verify", ROOT / "tiny_d1", "--against", tmp_path / "out.safetensors", "--allow-missing")
    assert code == 0 and "not checked" in text
    save_tensors(tmp_path / "none.safetensors", {"my_logits": exp["logits"]})
    code, text = run("verify", ROOT / "tiny_d1", "--against", tmp_path / "none.safetensors", "--allow-missing")
    assert code == 1 and "share no name" in text  # nothing compared is never a pass
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes((tmp_path / "out.safetensors").read_bytes()[:100])
    code, text = run("verify", ROOT / "tiny_d1", "--against", bad)
    assert code == 2
    one_error_line(text)


def test_against_shape_and_nan_fail():
    e = np.ones((2, 3))
    assert compare_tensor("x", e, np.ones((3, 2)), 0.0, 0.0).status == "shape"
    a = e.copy()
    a[1, 2] = np.nan
    row = compare_tensor("x", e, a, 1.0, 1.0)
    assert row.status == "FAIL" and "(1, 2)" in row.note


# -------------------------------------------------------------------------------------------
# acceptance records
# -------------------------------------------------------------------------------------------
def _acceptance_dir():
    return ROOT / next(n for n, e in SHIPPED.items() if e.get("kind") == "acceptance")


def test_acceptance_records_replay_exactly(backend):
    from refmtp.inference.acceptance import verify_drafts

    records = read_records(_acceptance_dir())
    assert len(records) >= 40
    for rec in records:
        x = record_inputs(rec, rec["case"])

        def arr(rows):
            return None if rows is None else backend.asarray(np.asarray(rows, dtype=np.float64), dtype="float64")

        got = verify_drafts(arr(x["p"]), arr(x["q"]), x["drafts"], x["u_accept"], x["u_sample"],
                            greedy=x["greedy"], logits=arr(x["logits"]))
        assert result_dict(got) == rec["expected"], rec["case"]


def test_acceptance_records_are_exact_dyadic_strings():
    records = read_records(_acceptance_dir())
    names = [r["case"] for r in records]
    assert len(set(names)) == len(names)
    assert {"A", "B", "C", "C'", "D", "E1", "E2", "F", "G"} <= set(names)  # docs/speculative-decoding.md §2.4 worked cases
    assert {r["expected"]["residual_fallback"] for r in records} == {True, False}
    assert {r["expected"]["is_bonus"] for r in records} == {True, False}
    assert {r["greedy"] for r in records} == {True, False}
    assert any(r["q"] is None and not r["greedy"] for r in records)
    assert any(r["K"] == 0 for r in records)
    for r in records:
        for key in ("p", "q", "logits"):
            for row in r[key] or []:
                for s in row:
                    if s not in ("inf", "-inf"):
                        assert s == dyadic_str(parse_dyadic(s, key)), (r["case"], s)


def test_acceptance_wrong_expectation_is_a_mismatch(tmp_path):
    d = tmp_path / "acc"
    shutil.copytree(_acceptance_dir(), d)
    body = json.loads((d / ACCEPTANCE_FILE).read_text())
    body["records"][0]["expected"]["tokens"] = [t + 1 for t in body["records"][0]["expected"]["tokens"]]
    write_json(d / ACCEPTANCE_FILE, body)
    code, out = run("verify", d)
    assert code == 2 and "sha256" in one_error_line(out)
    rehash(d)
    code, out = run("verify", d)
    assert code == 1 and f"{body['records'][0]['case']}" in out and "FAIL" in out
    # --against: another implementation's decisions as JSON
    other = {r["case"]: r["expected"] for r in read_records(_acceptance_dir())}
    (tmp_path / "other.json").write_text(json.dumps(other))
    code, out = run("verify", _acceptance_dir(), "--against", tmp_path / "other.json")
    assert code == 0, out


def test_dyadic_strings():
    assert dyadic_str(0.125) == "0.125" and dyadic_str(-3) == "-3" and dyadic_str(0.0) == "0"
    assert dyadic_str(1 - 2.0 ** -21) == "0.999999523162841796875"
    assert dyadic_str(float("-inf")) == "-inf"
    with pytest.raises(ValueError, match="float32"):
        dyadic_str(0.1)
    assert parse_dyadic(dyadic_str(0.1, float32=False), "u") == 0.1
    with pytest.raises(GoldenError, match="not exactly"):
        parse_dyadic("0.1", "u")


# -------------------------------------------------------------------------------------------
# generation and export
# -------------------------------------------------------------------------------------------
def test_generate_is_byte_identical(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    code, out = run("generate", "--out", a)
    assert code == 0, out
    generate(b)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) >= 5 * len(MODEL_CASES)
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    # the shipped files are what the recipe makes (within tolerance: BLAS may differ by machine)
    code, out = run("verify", a)
    assert code == 0, out
    for name in CASES:
        shipped = json.loads((ROOT / name / MANIFEST).read_text())
        fresh = json.loads((a / name / MANIFEST).read_text())
        assert shipped["recipe"] == fresh["recipe"] and shipped["command"] == fresh["command"]


def test_export_cli_preset_and_config(tmp_path):
    code, out = run("export", "--preset", "tiny", "--seed", 11, "--batch", 1, "--seq-len", 4,
                    "--dtype", "float32", "--out", tmp_path / "p")
    assert code == 0, out
    m = read_manifest(tmp_path / "p")
    assert m["dtype"] == "float32" and m["command"].startswith("refmtp golden export --preset tiny")
    assert verify_case(tmp_path / "p").status == "pass"
    from refmtp.config import preset

    cfg = preset("tiny").replace(num_nextn_predict_layers=1, q_lora_rank=None)
    cfg.save(tmp_path / "cfg.json")
    code, out = run("export", "--config", tmp_path / "cfg.json", "--seed", 12, "--out", tmp_path / "c")
    assert code == 0, out
    assert json.loads((tmp_path / "c" / "config.json").read_text())["q_lora_rank"] is None
    assert verify_case(tmp_path / "c").status == "pass"


def test_export_cli_errors(tmp_path):
    code, out = run("export", "--preset", "tiny", "--config", "x.json", "--seed", 1, "--out", tmp_path / "x")
    assert code == 2 and "exactly one" in out
    code, out = run("export", "--preset", "huge", "--seed", 1, "--out", tmp_path / "x")
    assert code == 2 and "unknown preset" in out and "Traceback" not in out
    code, out = run("export", "--preset", "tiny", "--seed", 1, "--seq-len", 2, "--out", tmp_path / "x")
    assert code == 2 and "seq_len" in out


def test_export_never_replaces_a_foreign_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    code, out = run("export", "--preset", "tiny", "--seed", 1, "--out", tmp_path / "mine")
    assert code == 2 and "refusing to replace" in out
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_export_refuses_routing_near_ties(tmp_path, monkeypatch):
    from refmtp.config import preset

    monkeypatch.setitem(MIN_ROUTING_MARGIN, "float64", 10.0)
    with pytest.raises(ValueError, match="near-tie"):
        export_model_case(tmp_path / "x", preset("tiny"), seed=0, batch=1, seq_len=4)
    assert not (tmp_path / "x").exists()


def test_export_margins_are_the_models_per_layer_margins():
    """The margins an export checks are refmtp.model's (router plus the eq. 18 top-K), one per
    MoE layer under its layer index (MTP modules and parallel heads at L + k - 1)."""
    from refmtp.checkpoint import load_checkpoint
    from refmtp.model import forward, routing_margin
    from refmtp.model.model import routing_margins

    for name in ("tiny_d2", "parallel_heads"):
        m = read_manifest(ROOT / name)
        cfg, params = load_checkpoint(ROOT / name, backend="numpy", dtype=m["dtype"])
        out, cache = forward(params, cfg, read_tensors(ROOT / name / "inputs.safetensors")["tokens"])
        margins = routing_margins(cache)
        assert sorted(margins) == sorted(out.routing)
        assert min(margins.values()) == routing_margin(cache)
        assert min(margins.values()) == pytest.approx(m["min_routing_margin"], rel=1e-6)


def test_tolerances_derive_from_dtype():
    exp = {"logits": np.zeros(2), "routing.3.topk_idx": np.zeros(2, np.int64),
           "bias_after_update.3": np.zeros(2, np.float32), "bias_after_update.4": np.zeros(2, np.float32)}
    table = tolerance_table(exp, "float64")
    assert [t["pattern"] for t in table] == ["bias_after_update.*", "routing.*.topk_idx", "*"]
    assert table[-1]["dtype"] == "float64"
    assert [t["pattern"] for t in tolerance_table(exp, "float32")] == ["logits", "routing.*.topk_idx", "*"]
    assert tolerance_for("logits", table) == (TOLERANCES["float64"]["atol"], TOLERANCES["float64"]["rtol"])
    assert tolerance_for("routing.7.topk_idx", table) == (0.0, 0.0)
    assert tolerance_for("bias_after_update.3", table)[1] == TOLERANCES["float32"]["rtol"]


def test_docs_example_runs(tmp_path, monkeypatch):
    text = DOCS.read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "safetensors.numpy" in b)
    assert 'case = "golden/tiny_d2"' in block
    monkeypatch.chdir(tmp_path)
    exec(compile(block.replace('"golden/tiny_d2"', repr(str(ROOT / "tiny_d2"))), "docs-example", "exec"), {})
    code, out = run("verify", ROOT / "tiny_d2", "--against", tmp_path / "mine.safetensors", "--allow-missing")
    assert code == 0, out
