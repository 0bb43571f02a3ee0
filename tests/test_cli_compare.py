"""``refmtp generate --draft-ckpt`` and ``refmtp speculate --draft-ckpt / --compare`` on random
tiny checkpoints: the draft model's greedy text equals plain decoding, the comparison table has
every row (plain, MTP K = 1..Kmax with reuse, blockwise, draft model, parallel heads), the JSON,
markdown and plot files are written, and bad pairs / options are refused in one line, exit 2."""
from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner

from refmtp.checkpoint import save_checkpoint
from refmtp.cli.main import cli
from refmtp.config import preset
from refmtp.model import init_params


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    base = tmp_path_factory.mktemp("compare")
    target = preset("tiny").replace(vocab_size=256)  # causal MTP, D = 2
    draft = target.replace(num_hidden_layers=1, num_nextn_predict_layers=0, n_routed_experts=0,
                           first_k_dense_replace=1)
    heads = target.replace(refmtp={"mtp_kind": "parallel"})
    made = {"target": target, "draft": draft, "heads": heads,
            "small_vocab": draft.replace(vocab_size=128),
            "other_eos": draft.replace(extra={"eos_token_id": 5}),
            "causal_heads": target}
    for i, (name, cfg) in enumerate(made.items()):
        save_checkpoint(base / name, cfg, init_params(cfg, seed=i, dtype="float64", std=0.3))
    (base / "tokenized").mkdir()
    save_checkpoint(base / "tokenized", draft, init_params(draft, seed=9, dtype="float64", std=0.3))
    (base / "tokenized" / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    (base / "data.txt").write_text("spam and eggs, " * 200)
    return base


def _run(args):
    result = CliRunner().invoke(cli, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def _one_line_exit_2(result, message):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output, result.output


def test_generate_with_draft_model_equals_plain(ckpts):
    base = ["generate", "--ckpt", str(ckpts / "target"), "--prompt", "spam ", "--max-new-tokens", "20"]
    plain = _run(base)
    spec = _run(base + ["--speculative", "3", "--draft-ckpt", str(ckpts / "draft")])
    assert plain.exit_code == 0 and spec.exit_code == 0, spec.output
    assert spec.stdout.splitlines()[0] == plain.stdout.splitlines()[0]
    assert "speculative K=3 (draft model)" in spec.output


@pytest.mark.parametrize("draft, extra, message", [
    ("small_vocab", ["--speculative", "2"], "vocab_size is 128 in the draft model and 256 in the target"),
    ("other_eos", ["--speculative", "2"], "eos_token_id is 5 in the draft model and 1 in the target"),
    ("tokenized", ["--speculative", "2"], "tokenizer is"),
    ("draft", [], "give --speculative K >= 1"),
])
def test_generate_bad_pairs_exit_2(ckpts, draft, extra, message):
    result = _run(["generate", "--ckpt", str(ckpts / "target"), "--prompt", "x", "--draft-ckpt",
                   str(ckpts / draft)] + extra)
    _one_line_exit_2(result, message)


COMPARE = ["--samples", "2", "--prompt-len", "8", "--max-new-tokens", "10", "--compare"]


def test_speculate_compare_table_json_markdown(ckpts, tmp_path):
    out = {s: tmp_path / f"cmp.{s}" for s in ("json", "md")}
    result = _run(["speculate", "--ckpt", str(ckpts / "target"), "--data", str(ckpts / "data.txt"), *COMPARE,
                   "--draft-ckpt", str(ckpts / "draft"), "--heads-ckpt", str(ckpts / "heads"),
                   "--json", str(out["json"]), "--markdown", str(out["md"])])
    assert result.exit_code == 0, result.output
    rep = json.loads(out["json"].read_text())
    rows = [(m["name"], m["model"], m["k"], m["rule"]) for m in rep["methods"]]
    assert rows == [("mtp", "target", 1, "lossless"), ("mtp", "target", 2, "lossless"),
                    ("mtp", "target", 3, "lossless"), ("blockwise", "target", 3, "blockwise"),
                    ("draft", "target", 1, "lossless"), ("draft", "target", 2, "lossless"),
                    ("draft", "target", 3, "lossless"), ("heads", "heads", 1, "lossless"),
                    ("heads", "heads", 2, "lossless"), ("blockwise", "heads", 2, "blockwise")]
    assert rep["k"] == 3 and rep["reuse_last_module"] and "heads_plain" in rep
    for m in rep["methods"]:  # greedy: every row lossless, measured
        assert m["identical_to_plain"] == 2 and m["lossless"] == "yes"
        assert len(m["acceptance_per_position"]) == m["k"] and m["speedup"] > 0
    text = result.output
    assert "P(A>=1) P(A>=2) P(A>=3)" in text and "lossless" in text and "draft" in text
    md = out["md"].read_text().splitlines()
    assert md[0].startswith("| method | target | K | rule | P(A>=1)") and len(md) == 2 + 2 + 10


def test_speculate_compare_plot(ckpts, tmp_path):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (the plot extra)")
    png = tmp_path / "acc.png"
    result = _run(["speculate", "--ckpt", str(ckpts / "target"), "--data", str(ckpts / "data.txt"), "--compare",
                   "--samples", "1", "--prompt-len", "8", "--max-new-tokens", "4", "--k", "2",
                   "--draft-ckpt", str(ckpts / "draft"), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert f"wrote {png}" in result.output and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_speculate_draft_without_compare(ckpts, tmp_path):
    out = tmp_path / "r.json"
    result = _run(["speculate", "--ckpt", str(ckpts / "target"), "--data", str(ckpts / "data.txt"),
                   "--samples", "2", "--prompt-len", "8", "--max-new-tokens", "10", "--k", "2",
                   "--draft-ckpt", str(ckpts / "draft"), "--temperature", "0.7", "--json", str(out)])
    assert result.exit_code == 0, result.output
    names = [(m["name"], m["lossless"]) for m in json.loads(out.read_text())["methods"]]
    assert names == [("mtp", "rule"), ("draft", "rule")]


@pytest.mark.parametrize("args, message", [
    (["--draft-ckpt", "small_vocab"], "vocab_size is 128 in the draft model"),
    (["--draft-ckpt", "other_eos"], "eos_token_id is 5"),
    (["--compare", "--heads-ckpt", "small_vocab"], "vocab_size is 128"),
    (["--heads-ckpt", "heads"], "--heads-ckpt is read by --compare only"),
    (["--compare", "--heads-ckpt", "causal_heads"], "has no parallel heads"),
    (["--compare", "--plot", "out.txt"], "must end in .png or .pdf or .svg"),
    (["--compare", "--k", "0"], "must be >= 1"),
])
def test_speculate_bad_input_exit_2(ckpts, args, message):
    args = [str(ckpts / a) if (ckpts / a).is_dir() else a for a in args]
    result = _run(["speculate", "--ckpt", str(ckpts / "target"), "--data", str(ckpts / "data.txt")] + args)
    _one_line_exit_2(result, message)


def test_speculate_plot_without_matplotlib_exit_2(ckpts, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    result = _run(["speculate", "--ckpt", str(ckpts / "target"), "--data", str(ckpts / "data.txt"),
                   "--compare", "--plot", str(tmp_path / "a.png")])
    _one_line_exit_2(result, "--plot needs matplotlib")
