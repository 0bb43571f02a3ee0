"""``refmtp generate`` and ``refmtp speculate`` on a checkpoint trained with the training API
(causal MTP) and on a random parallel-heads checkpoint: streamed byte-level text, speculative
output identical to plain at temperature 0, the report (table + JSON), and one-line exit-2
errors for a missing checkpoint and a bad K."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from refmtp.checkpoint import save_checkpoint
from refmtp.cli.main import cli
from refmtp.config import preset
from refmtp.model import init_params
from tests.test_specdecode import train_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return train_tiny_checkpoint(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def corpus(ckpt):
    return ckpt.parent.parent / "tiny-mtp-corpus.txt"


def _run(args):
    result = CliRunner().invoke(cli, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def _body(result):
    return result.stdout if hasattr(result, "stdout") else result.output


def test_generate_plain_and_speculative_agree(ckpt, backend):
    base = ["generate", "--ckpt", str(ckpt), "--prompt", "the cat ", "--max-new-tokens", "24",
            "--backend", backend.name]
    plain = _run(base)
    assert plain.exit_code == 0, plain.output
    assert _body(plain).startswith("the cat ")
    spec = _run(base + ["--speculative", "3", "--reuse"])
    assert spec.exit_code == 0, spec.output
    assert _body(spec).splitlines()[0] == _body(plain).splitlines()[0]
    assert "speculative K=3" in spec.output and "tokens/step" in spec.output
    # a run directory works too (its newest checkpoint), and sampling is seeded
    run_dir = ckpt.parent
    sampled = ["generate", "--ckpt", str(run_dir), "--prompt", "a", "--max-new-tokens", "16",
               "--temperature", "1.0", "--seed", "3", "--speculative", "2"]
    a = _run(sampled + ["--backend", backend.name])
    b = _run(sampled + ["--backend", backend.name])
    ref = _run(sampled)  # numpy: the same host coins give the same text on every backend
    assert a.exit_code == 0 and _body(a).splitlines()[0] == _body(b).splitlines()[0]
    assert _body(a).splitlines()[0] == _body(ref).splitlines()[0]


@pytest.mark.parametrize("args, message", [
    (["--ckpt", "/nonexistent/ckpt"], "does not exist"),
    (["--speculative", "3"], "exceed the D=2 MTP modules"),
    (["--speculative", "-1"], "must be >= 0"),
    (["--max-new-tokens", "5000"], "max_position_embeddings"),
])
def test_generate_errors_one_line_exit_2(ckpt, args, message):
    full = ["generate", "--ckpt", str(ckpt), "--prompt", "x"] + args
    result = _run(full)
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output


def test_speculate_report_and_json(ckpt, corpus, tmp_path, backend):
    out = tmp_path / "spec.json"
    result = _run(["speculate", "--ckpt", str(ckpt), "--data", str(corpus), "--k", "3", "--reuse",
                   "--samples", "2", "--prompt-len", "12", "--max-new-tokens", "16",
                   "--json", str(out), "--backend", backend.name])
    assert result.exit_code == 0, result.output
    assert "P(A>=1) P(A>=2) P(A>=3)" in result.output and "speedup" in result.output
    rep = json.loads(out.read_text())
    assert rep["k"] == 3 and rep["samples"] == 2 and rep["plain"]["tokens"] == 32
    (m,) = rep["methods"]
    assert m["name"] == "mtp" and m["identical_to_plain"] == 2  # greedy: lossless
    assert m["tokens"] == 32 and len(m["acceptance_per_position"]) == 3
    assert m["tau"] == m["tokens"] / m["steps"] and m["speedup"] > 0


def test_speculate_parallel_heads_baselines(tmp_path):
    cfg = preset("tiny").replace(vocab_size=256, refmtp={"mtp_kind": "parallel"})
    save_checkpoint(tmp_path / "ckpt", cfg, init_params(cfg, seed=0, dtype="float64", std=0.3))
    data = tmp_path / "data.txt"
    data.write_text("spam and eggs, " * 200)
    out = tmp_path / "rep.json"
    result = _run(["speculate", "--ckpt", str(tmp_path / "ckpt"), "--data", str(data), "--samples", "2",
                   "--prompt-len", "8", "--max-new-tokens", "10", "--temperature", "0.5",
                   "--json", str(out)])
    assert result.exit_code == 0, result.output
    names = [m["name"] for m in json.loads(out.read_text())["methods"]]
    assert names == ["heads", "blockwise", "typical"]
    assert "blockwise" in result.output and "typical" in result.output


@pytest.mark.parametrize("args, message", [
    (["--k", "0"], "must be >= 1"),
    (["--k", "5"], "exceed the D=2 MTP modules"),
    (["--samples", "0"], "--samples 0 must be >= 1"),
    (["--data", "/nonexistent/data"], "does not exist"),
])
def test_speculate_errors_one_line_exit_2(ckpt, corpus, args, message):
    full = ["speculate", "--ckpt", str(ckpt), "--data", str(corpus)] + args
    result = _run(full)
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output
