"""The PyTorch decode-step example of docs/golden-format.md section 6 passes the shipped decode case.

The example is taken from the docs page itself (never copied here) and run with the plain PyTorch
``MyDeepseekV3`` of tests/torch_deepseek_v3.py (a full forward, no cache) for every append step of
the shipped ``decode`` case; its outputs must pass ``refmtp golden verify decode --against OUT``
(every step merged: every expected tensor, none missing). Needs torch and transformers.
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

CASE = shipped_dir() / "decode"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "golden-format.md"
DOC_LINE = 'case, step = "golden/decode", 5'
OUT = "torch_decode_out.safetensors"
APPENDS = [i for i, op in enumerate(read_manifest(CASE)["schedule"]) if op["op"] == "append"]


def docs_decode_example() -> str:
    blocks = [b for b in re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S) if DOC_LINE in b]
    assert len(blocks) == 1, "docs/golden-format.md should hold one PyTorch decode-step example"
    assert "MyDeepseekV3" in blocks[0] and OUT in blocks[0]
    return blocks[0]


def run_example(step: int, workdir: Path, monkeypatch) -> Path:
    monkeypatch.chdir(workdir)
    code = docs_decode_example().replace(DOC_LINE, f"case, step = {str(CASE)!r}, {step}")
    exec(compile(code, f"docs/golden-format.md (PyTorch decode example, step {step})", "exec"),
         {"MyDeepseekV3": MyDeepseekV3})
    return workdir / OUT


def verify(out, *extra):
    res = CliRunner().invoke(cli, ["golden", "verify", str(CASE), "--against", str(out), *extra])
    return res.exit_code, res.output


def test_schedule_covers_the_documented_step():
    assert 5 in APPENDS and len(APPENDS) >= 5  # prefill, single steps, multi-token append, after rollback


def test_docs_decode_example_passes_the_documented_step(tmp_path, monkeypatch):
    out = run_example(5, tmp_path, monkeypatch)
    code, text = verify(out, "--allow-missing")
    assert code == 0, text
    n = len(load_file(out))
    assert n >= 3 + 2 * 5 and re.search(rf"PASS: {n} passed, 0 failed, 0 missing, \d+ not checked", text), text


def test_docs_decode_example_every_step_gives_the_whole_case(tmp_path, monkeypatch):
    merged = {}
    for step in APPENDS:
        d = tmp_path / str(step)
        d.mkdir()
        merged |= load_file(run_example(step, d, monkeypatch))
    save_file(merged, str(tmp_path / "all.safetensors"))
    code, text = verify(tmp_path / "all.safetensors")
    assert code == 0, text
    n = len(read_manifest(CASE)["tensors"])
    assert f"PASS: {n} passed, 0 failed, 0 missing (of {n} expected tensors)" in text, text
    assert any(".mtp.2." in k for k in merged)  # the chained module is checked too


def test_example_catches_the_wrong_mtp_convention(tmp_path, monkeypatch):
    """The convention matters: module k reading t_{j+k-1} (its own row's token) instead of
    t_{j+k} fails the example's own check."""
    block = docs_decode_example()
    old = 'f"{name}.token_ids": seq[:, j + k]'
    assert old in block
    monkeypatch.chdir(tmp_path)
    code = block.replace(DOC_LINE, f"case, step = {str(CASE)!r}, 5").replace(old, 'f"{name}.token_ids": seq[:, j + k - 1]')
    with pytest.raises(AssertionError, match="token_ids"):
        exec(compile(code, "docs example (wrong token)", "exec"), {"MyDeepseekV3": MyDeepseekV3})
