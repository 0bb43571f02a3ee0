"""`refmtp golden list` / `verify` as a new user meets them: case names, summary counts that add
up, --allow-missing, dtype hints, integer formatting, strict JSON for acceptance records.

The expected numbers come from the shipped golden files, never from this file.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

from refmtp.verification.golden.acceptance import read_records
from refmtp.verification.golden.compare import NOT_CHECKED, json_equal
from refmtp.verification.golden.files import RECIPE as RECIPE_FILE, read_tensors, save_tensors
from refmtp.verification.golden.manifest import read_manifest
from refmtp.verification.golden.recipe import load_recipe, shipped_cases, shipped_dir
from refmtp.verification.golden.report import format_report
from refmtp.verification.golden.verify import verify_case
from refmtp.cli.main import cli

ROOT = shipped_dir()
RECIPE = load_recipe(ROOT / RECIPE_FILE)
CASES = list(shipped_cases(RECIPE))  # on demand: listed too, as "(on demand)" lines
ACC = next(n for n, e in RECIPE["cases"].items() if e.get("kind") == "acceptance")
F32 = next(n for n, e in RECIPE["cases"].items() if e.get("kind", "model") == "model" and e["dtype"] == "float32")


def run(*args):
    res = CliRunner().invoke(cli, ["golden", *map(str, args)])
    return res.exit_code, res.output


def one_error_line(out: str) -> str:
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert "Traceback" not in out
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    return lines[0]


def summary(text: str) -> dict:
    """The summary line's numbers: {passed, failed, missing, not checked, of}."""
    m = re.search(r"(PASS|MISMATCH): (\d+) passed, (\d+) failed, (\d+) missing(?:, (\d+) not checked)? "
                  r"\(of (\d+) expected (tensors|records)\)", text)
    assert m, text
    return {"status": m[1], "passed": int(m[2]), "failed": int(m[3]), "missing": int(m[4]),
            "not checked": int(m[5] or 0), "of": int(m[6])}


def expected(name):
    return read_tensors(ROOT / name / "expected.safetensors")


def save(tmp_path, tensors, fname="out.safetensors"):
    save_tensors(tmp_path / fname, tensors)
    return tmp_path / fname


# -------------------------------------------------------------------------------------------
# case names and `golden list`
# -------------------------------------------------------------------------------------------
def test_list_one_line_per_shipped_case():
    code, out = run("list")
    assert code == 0, out
    lines = out.strip().splitlines()
    assert len(lines) == len(RECIPE["cases"])  # the shipped cases and one line per on-demand case
    for name in CASES:
        m = read_manifest(ROOT / name)
        line = next(ln for ln in lines if ln.split()[0] == name)
        n = m["records"] if m["kind"] == "acceptance" else len(m["tensors"])
        assert line.split()[1:5] == [m["kind"], m["dtype"], str(n),
                                     "records" if m["kind"] == "acceptance" else "tensors"], line
        assert m["description"][:40] in line


def test_verify_accepts_a_shipped_case_by_name(tmp_path, monkeypatch):
    exp = expected("tiny_d1")
    out = save(tmp_path, exp)
    monkeypatch.chdir(tmp_path)  # no directory called tiny_d1 here: the name is the shipped case
    code, text = run("verify", "tiny_d1", "--against", out)
    assert code == 0, text
    assert str(ROOT / "tiny_d1") in text.splitlines()[0]
    assert summary(text) == {"status": "PASS", "passed": len(exp), "failed": 0, "missing": 0,
                             "not checked": 0, "of": len(exp)}


def test_verify_unknown_name_is_one_line_exit_2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out = run("verify", "tiny_d9", "--against", tmp_path / "x.safetensors")
    assert code == 2
    line = one_error_line(out)
    assert "tiny_d9" in line and "no such case or directory" in line and "refmtp golden list" in line


def test_existing_path_wins_over_a_case_name(tmp_path, monkeypatch):
    import shutil

    shutil.copytree(ROOT / "tiny_d1", tmp_path / "tiny_d2")  # a local dir named like another case
    monkeypatch.chdir(tmp_path)
    code, out = run("verify", "tiny_d2", "--against", save(tmp_path, expected("tiny_d1")))
    assert code == 0, out
    assert out.splitlines()[0].endswith(": tiny_d2") and "case tiny_d1" in out


# -------------------------------------------------------------------------------------------
# the summary: counts that add up, missing / not checked / extra
# -------------------------------------------------------------------------------------------
def test_summary_counts_add_up_with_failures_missing_and_extras(tmp_path):
    exp = expected("tiny_d2")
    out = dict(exp)
    out["logits"] = exp["logits"] * (1 + 1e-6)
    out["loss.main"] = exp["loss.main"] + 1.0
    del out["grad.lm_head.weight"], out["loss.total"]
    out["extra.a"], out["extra.b"] = np.zeros(2), np.ones(3)
    code, text = run("verify", "tiny_d2", "--against", save(tmp_path, out))
    assert code == 1
    assert summary(text) == {"status": "MISMATCH", "passed": len(exp) - 4, "failed": 2, "missing": 2,
                             "not checked": 0, "of": len(exp)}
    assert "missing (2): grad.lm_head.weight, loss.total" in text
    assert "ignored, not in the golden (2): extra.a, extra.b" in text


def test_allow_missing_says_not_checked(tmp_path):
    exp = expected("tiny_d1")
    keep = {k: v for k, v in exp.items() if not k.startswith("grad.")}
    code, text = run("verify", "tiny_d1", "--against", save(tmp_path, keep), "--allow-missing")
    assert code == 0, text
    n_grad = len(exp) - len(keep)
    assert summary(text) == {"status": "PASS", "passed": len(keep), "failed": 0, "missing": 0,
                             "not checked": n_grad, "of": len(exp)}
    row = next(ln for ln in text.splitlines() if ln.split()[:1] == ["grad.lm_head.weight"])
    assert "not checked" in row and "skipped" not in text
    report = verify_case(ROOT / "tiny_d1", against=tmp_path / "out.safetensors", allow_missing=True)
    assert sum(r.status == NOT_CHECKED for r in report.rows) == n_grad
    c = report.counts()
    assert c["passed"] + c["failed"] + c["missing"] + c["not checked"] == len(exp) and c["extra"] == 0


def test_recompute_summary_counts_every_tensor():
    report = verify_case(ROOT / "tiny_d1")
    s = summary(format_report(report))
    n = len(read_manifest(ROOT / "tiny_d1")["tensors"])
    assert s == {"status": "PASS", "passed": n, "failed": 0, "missing": 0, "not checked": 0, "of": n}


# -------------------------------------------------------------------------------------------
# dtype hint and integer formatting
# -------------------------------------------------------------------------------------------
def test_float32_outputs_for_a_float64_case_get_a_hint(tmp_path):
    exp = expected("tiny_d1")
    low = {k: (v.astype(np.float32) if v.dtype == np.float64 else v) for k, v in exp.items()}
    code, text = run("verify", "tiny_d1", "--against", save(tmp_path, low))
    assert code == 1
    hint = next(ln for ln in text.splitlines() if "HINT" in ln)
    assert "your outputs are float32 but this case is float64" in hint
    assert "compute in float64" in hint and F32 in hint
    code, text = run("verify", "tiny_d1", "--against", save(tmp_path, exp, "ok.safetensors"))
    assert code == 0 and "HINT" not in text
    # a float32 case with float32 outputs: no hint
    code, text = run("verify", F32, "--against", save(tmp_path, expected(F32), "f32.safetensors"))
    assert code == 0 and "HINT" not in text, text


def test_integer_tensors_print_as_integers(tmp_path):
    exp = expected("tiny_d1")
    out = dict(exp)
    load = next(k for k in exp if k.endswith(".load"))
    idx = next(k for k in exp if k.endswith(".topk_idx"))
    out[load] = exp[load].copy()
    out[load][0] += 3
    code, text = run("verify", "tiny_d1", "--against", save(tmp_path, out))
    assert code == 1
    row = next(ln for ln in text.splitlines() if ln.split()[:1] == [load])
    cols = row.split()
    assert cols[2] == "3" and cols[4:6] == ["0", "0"] and cols[6] == "FAIL", row  # max abs, atol, rtol
    assert f"got {int(out[load][0])}, expected {int(exp[load][0])}" in row
    assert "e+00" not in row.split("FAIL")[1]
    okrow = next(ln for ln in text.splitlines() if ln.split()[:1] == [idx])
    assert okrow.split()[2] == "0" and okrow.split()[-1] == "pass", okrow
    floatrow = next(ln for ln in text.splitlines() if ln.split()[:1] == ["logits"])
    assert re.search(r"\de[-+]\d\d", floatrow.split()[2])  # floats keep the exponent format


# -------------------------------------------------------------------------------------------
# acceptance --against: strict JSON types, extra records, JSON expected
# -------------------------------------------------------------------------------------------
def _decisions():
    return {r["case"]: dict(r["expected"]) for r in read_records(ROOT / ACC)}


def test_json_equal_distinguishes_types():
    eq = json_equal
    assert eq(True, True) and eq(3, 3) and eq(3.0, 3.0) and eq([1, [2]], [1, [2]]) and eq(None, None)
    assert not eq(True, 1) and not eq(1, True) and not eq(False, 0)
    assert not eq(3.0, 3) and not eq(3, 3.0)
    assert not eq([0, 2], [0.0, 2]) and not eq([1], [True]) and not eq([1], [1, 1])
    assert eq({"a": [1, False]}, {"a": [1, False]}) and not eq({"a": [1, 0]}, {"a": [1, False]})
    assert not eq({"a": 1}, {"a": 1, "b": 2}) and not eq("1", 1) and not eq(None, False)


def test_acceptance_against_compares_json_types(tmp_path):
    other = _decisions()
    names = list(other)
    (tmp_path / "ok.json").write_text(json.dumps(other))
    code, out = run("verify", ACC, "--against", tmp_path / "ok.json")
    assert code == 0, out
    assert summary(out)["passed"] == len(names)
    bonus = next(n for n in names if other[n]["is_bonus"] is True)
    other[bonus]["is_bonus"] = 1                                          # true is not 1
    acc = next(n for n in names if n != bonus and other[n]["num_accepted"] > 0)
    other[acc]["num_accepted"] = float(other[acc]["num_accepted"])        # 3.0 is not 3
    tok = next(n for n in names if n not in (bonus, acc) and other[n]["tokens"])
    other[tok]["tokens"] = [float(t) for t in other[tok]["tokens"]]
    other["not-a-golden-record"] = {"num_accepted": 0, "tokens": [], "residual_fallback": False,
                                    "is_bonus": False}
    (tmp_path / "bad.json").write_text(json.dumps(other))
    code, out = run("verify", ACC, "--against", tmp_path / "bad.json")
    assert code == 1
    rows = {ln.split()[0]: ln for ln in out.splitlines()[2:] if ln.startswith("  ") and len(ln.split()) > 1}
    assert "FAIL" in rows[bonus] and "is_bonus: got 1, expected true" in rows[bonus]
    n = other[acc]["num_accepted"]
    assert f"num_accepted: got {n!r}, expected {int(n)}" in rows[acc]
    assert "FAIL" in rows[tok] and "tokens: got [" in rows[tok]
    assert summary(out) == {"status": "MISMATCH", "passed": len(names) - 3, "failed": 3, "missing": 0,
                            "not checked": 0, "of": len(names)}
    assert "ignored, not in the golden (1): not-a-golden-record" in out


def test_acceptance_missing_records_and_allow_missing(tmp_path):
    other = _decisions()
    first = next(iter(other))
    del other[first]
    (tmp_path / "part.json").write_text(json.dumps(other))
    code, out = run("verify", ACC, "--against", tmp_path / "part.json")
    assert code == 1 and summary(out)["missing"] == 1 and f"missing (1): {first}" in out
    code, out = run("verify", ACC, "--against", tmp_path / "part.json", "--allow-missing")
    assert code == 0, out
    assert summary(out)["not checked"] == 1 and summary(out)["of"] == len(other) + 1


def test_acceptance_against_safetensors_or_garbage_says_json_expected(tmp_path):
    path = save(tmp_path, expected("tiny_d1"))
    code, out = run("verify", ACC, "--against", path)
    assert code == 2 and "JSON expected" in one_error_line(out)
    (tmp_path / "junk.bin").write_bytes(bytes(range(256)))
    code, out = run("verify", ACC, "--against", tmp_path / "junk.bin")
    assert code == 2 and "JSON expected" in one_error_line(out)
    (tmp_path / "list.json").write_text("3")
    code, out = run("verify", ACC, "--against", tmp_path / "list.json")
    assert code == 2 and "JSON expected" in one_error_line(out)


def test_model_case_against_json_is_refused(tmp_path):
    (tmp_path / "out.json").write_text(json.dumps({"logits": [1.0]}))
    code, out = run("verify", "tiny_d1", "--against", tmp_path / "out.json")
    assert code == 2 and "safetensors expected" in one_error_line(out)


@pytest.mark.parametrize("args", [("verify", "no_such_case"), ("verify", "../x", "--against", "y.safetensors")])
def test_bad_input_never_tracebacks(tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    code, out = run(*args)
    assert code == 2
    one_error_line(out)
