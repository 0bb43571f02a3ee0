"""The PyTorch example of docs/golden-format.md section 6 passes every shipped model case.

The example code is taken from the docs page itself (never copied here) and run with a plain
PyTorch ``MyDeepseekV3`` (tests/torch_deepseek_v3.py, autograd gradients); its outputs must then
pass ``refmtp golden verify CASE --against OUT`` with exit 0. The cases are every kind "model"
entry of golden/recipe.json. Needs torch and transformers (skipped with the reason otherwise).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from refmtp.verification.golden.files import RECIPE as RECIPE_FILE, read_tensors
from refmtp.verification.golden.manifest import read_manifest
from refmtp.verification.golden.recipe import load_recipe, shipped_cases, shipped_dir
from refmtp.cli.main import cli

torch = pytest.importorskip("torch", reason="needs torch (optional extra: pip install 'refmtp[torch]')")
pytest.importorskip("transformers", reason="needs transformers (optional extra: pip install 'refmtp[torch]')")

from tests import torch_deepseek_v3  # noqa: E402
from tests.torch_deepseek_v3 import MyDeepseekV3  # noqa: E402

pytestmark = pytest.mark.torch

ROOT = shipped_dir()
RECIPE = load_recipe(ROOT / RECIPE_FILE)
MODEL_CASES = [n for n, e in shipped_cases(RECIPE).items() if e.get("kind", "model") == "model"]
DOCS = Path(__file__).resolve().parents[1] / "docs" / "golden-format.md"
DOC_CASE = 'case = "golden/tiny_d2"'


def docs_torch_example() -> str:
    blocks = [b for b in re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S)
              if "safetensors.torch" in b and DOC_CASE in b]  # the model-case example (not the decode one)
    assert len(blocks) == 1, "docs/golden-format.md should hold one PyTorch example for the model cases"
    assert DOC_CASE in blocks[0] and "MyDeepseekV3" in blocks[0]
    return blocks[0]


def run_example(block: str, case_dir: Path, workdir: Path, monkeypatch) -> Path:
    monkeypatch.chdir(workdir)
    code = block.replace(DOC_CASE, f"case = {str(case_dir)!r}")
    exec(compile(code, f"docs/golden-format.md (PyTorch example, {case_dir.name})", "exec"),
         {"MyDeepseekV3": MyDeepseekV3})
    return workdir / "torch_out.safetensors"


def verify(name, out):
    res = CliRunner().invoke(cli, ["golden", "verify", name, "--against", str(out)])
    return res.exit_code, res.output


def test_recipe_has_model_cases():
    assert len(MODEL_CASES) >= 7 and "tiny_d2_f32" in MODEL_CASES


@pytest.mark.parametrize("name", MODEL_CASES)
def test_docs_torch_example_passes(name, tmp_path, monkeypatch):
    out = run_example(docs_torch_example(), ROOT / name, tmp_path, monkeypatch)
    code, text = verify(name, out)
    assert code == 0, text
    n = len(read_manifest(ROOT / name)["tensors"])
    assert f"PASS: {n} passed, 0 failed, 0 missing (of {n} expected tensors)" in text, text


def test_dropping_unrouted_expert_gradients_fails(tmp_path, monkeypatch):
    """What the example guards against: without the zeros the unrouted experts are missing."""
    name = next(n for n in MODEL_CASES
                if any((v == 0).any() for k, v in read_tensors(ROOT / n / "expected.safetensors").items()
                       if k.endswith(".load")))
    block = docs_torch_example()
    old = "p.grad if p.grad is not None else torch.zeros_like(p)\n             for n, p in model.named_parameters()}"
    assert old in block
    block = block.replace(old, "p.grad\n             for n, p in model.named_parameters() if p.grad is not None}")
    code, text = verify(name, run_example(block, ROOT / name, tmp_path, monkeypatch))
    assert code == 1 and re.search(r"missing \(\d+\): grad\.model\.layers\.\d+\.mlp\.experts\.", text), text


@pytest.mark.parametrize("bug", ["router.mask_zero", "router.no_scaling", "router.bias_in_gate_values",
                                 "mtp.eh_concat_swapped", "mla.kv_b_split_swapped", "rope.neox_pairs"])
def test_independent_implementation_with_a_catalog_bug_gets_it_as_first_cause(bug, tmp_path, monkeypatch):
    """Conformance from outside: the PyTorch implementation (autograd, its own rounding) carrying
    one catalog bug fails verify --against, and the diagnosis names that bug (or one
    indistinguishable from it on the case) first."""
    from refmtp.verification import conformance as conf

    prints = conf.load_fingerprints()
    name = next(c for c in MODEL_CASES if c in prints["mutants"][bug])  # first model case it fails
    monkeypatch.setattr(torch_deepseek_v3, "BUGS", {bug})
    code, text = verify(name, run_example(docs_torch_example(), ROOT / name, tmp_path, monkeypatch))
    assert code == 1, text
    lines = text.splitlines()
    i = next(k for k, line in enumerate(lines) if "likely causes (bug catalog" in line)
    first = lines[i + 1].split()[0]
    same = set(prints["mutants"][bug][name]) == set(prints["mutants"].get(first, {}).get(name, {"?": 0}))
    assert first == bug or same, text


@pytest.mark.slow
def test_docs_torch_example_passes_the_v3_geometry_cases(tmp_path, monkeypatch):
    """The same documented example on DeepSeek-V3's geometry (kv_lora_rank 512, 256 experts in
    8 groups, YaRN factor 40), generated on demand into a temporary directory."""
    from refmtp.verification.golden.recipe import generate

    names = [n for n, e in RECIPE["cases"].items() if e.get("on_demand") and e.get("kind", "model") == "model"]
    generate(tmp_path / "golden", only=names)
    for name in names:
        work = tmp_path / f"work-{name}"
        work.mkdir()
        out = run_example(docs_torch_example(), tmp_path / "golden" / name, work, monkeypatch)
        res = CliRunner().invoke(cli, ["golden", "verify", str(tmp_path / "golden" / name), "--against", str(out)])
        assert res.exit_code == 0, res.output
