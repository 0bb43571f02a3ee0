"""The PyTorch speculative-step example of docs/golden-format.md section 6 passes the shipped
speculative cases it covers (K <= D): a greedy one and the temperature-1 one.

The example is taken from the docs page itself (never copied here) and run with the plain PyTorch
``MyDeepseekV3`` of tests/torch_deepseek_v3.py (full forwards, no cache) for every step of
``spec_greedy_k1`` and ``spec_t1_k2``; its outputs must pass ``refmtp golden verify CASE --against
OUT --allow-missing`` (only the MTP cache lengths left out). Needs torch and transformers.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from refmtp.cli.main import cli
from refmtp.verification.golden.manifest import read_manifest
from refmtp.verification.golden.recipe import shipped_dir

torch = pytest.importorskip("torch", reason="needs torch (optional extra: pip install 'refmtp[torch]')")
pytest.importorskip("transformers", reason="needs transformers (optional extra: pip install 'refmtp[torch]')")

from safetensors.torch import load_file, save_file  # noqa: E402

from tests.torch_deepseek_v3 import MyDeepseekV3  # noqa: E402

pytestmark = pytest.mark.torch

ROOT = shipped_dir()
DOCS = Path(__file__).resolve().parents[1] / "docs" / "golden-format.md"
DOC_LINE = 'case, step = "golden/spec_t1_k2", 2'
OUT = "torch_spec_out.safetensors"
CASES = ["spec_greedy_k1", "spec_t1_k2"]


def docs_spec_example() -> str:
    blocks = [b for b in re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S) if DOC_LINE in b]
    assert len(blocks) == 1, "docs/golden-format.md should hold one PyTorch speculative-step example"
    assert "MyDeepseekV3" in blocks[0] and OUT in blocks[0]
    return blocks[0]


def run_example(case: str, step: int, workdir: Path, monkeypatch, block: str | None = None) -> Path:
    monkeypatch.chdir(workdir)
    code = (block or docs_spec_example()).replace(DOC_LINE, f"case, step = {str(ROOT / case)!r}, {step}")
    exec(compile(code, f"docs/golden-format.md (PyTorch speculative example, {case} step {step})", "exec"),
         {"MyDeepseekV3": MyDeepseekV3})
    return workdir / OUT


def verify(case, out, *extra):
    res = CliRunner().invoke(cli, ["golden", "verify", str(ROOT / case), "--against", str(out), *extra])
    return res.exit_code, res.output


def test_the_covered_cases_are_one_greedy_and_the_sampled_one():
    temps = {read_manifest(ROOT / c)["speculative"]["temperature"] for c in CASES}
    assert temps == {0, 1}
    assert all(read_manifest(ROOT / c)["speculative"]["k"] <= 2 for c in CASES)


def test_docs_spec_example_passes_the_documented_step(tmp_path, monkeypatch):
    out = run_example("spec_t1_k2", 2, tmp_path, monkeypatch)
    code, text = verify("spec_t1_k2", out, "--allow-missing")
    assert code == 0, text
    n = len(load_file(out))
    assert n == 8 and re.search(rf"PASS: {n} passed, 0 failed, 0 missing, \d+ not checked", text), text


@pytest.mark.parametrize("case", CASES)
def test_docs_spec_example_every_step_gives_the_generation(tmp_path, monkeypatch, case):
    steps = read_manifest(ROOT / case)["speculative"]["steps"]
    merged = {}
    for step in range(steps):
        d = tmp_path / str(step)
        d.mkdir()
        merged |= load_file(run_example(case, step, d, monkeypatch))
    merged["spec.final_tokens"] = torch.cat([merged[f"spec.{s}.tokens"] for s in range(steps)])
    save_file(merged, str(tmp_path / "all.safetensors"))
    code, text = verify(case, tmp_path / "all.safetensors", "--allow-missing")
    assert code == 0, text
    n = len(read_manifest(ROOT / case)["tensors"])
    left = sum(".cache_length.mtp." in k for k in read_manifest(ROOT / case)["tensors"])
    assert f"PASS: {n - left} passed, 0 failed, 0 missing, {left} not checked (of {n} expected tensors)" in text, text
    kinds = {bool(merged[f"spec.{s}.num_accepted"] == len(merged[f"spec.{s}.drafts"])) for s in range(steps)
             if len(merged[f"spec.{s}.drafts"])}
    assert kinds == {True, False}  # bonus and correction tokens both checked


def test_example_catches_an_accept_test_without_q(tmp_path, monkeypatch):
    """The rule matters: accepting d_i iff u_accept[i] <= p_i(d_i) (q ignored, a bug of the
    catalog: acceptance.ignores_q) fails the example's own check at some step of the sampled case."""
    block = docs_spec_example()
    old = 'coin("u_accept")[A] * q[A][drafts[A]] <= p[A, drafts[A]]'
    assert old in block
    bad = block.replace(old, 'coin("u_accept")[A] <= p[A, drafts[A]]')
    failed = []
    for s in range(read_manifest(ROOT / "spec_t1_k2")["speculative"]["steps"]):
        d = tmp_path / str(s)
        d.mkdir()
        try:
            run_example("spec_t1_k2", s, d, monkeypatch, bad)
        except AssertionError as exc:
            failed.append((s, str(exc)))
    assert failed and all("num_accepted" in m or "tokens" in m for _, m in failed), failed
