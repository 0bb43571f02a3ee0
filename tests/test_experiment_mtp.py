"""`refmtp experiment mtp` (refmtp/verification/experiment_mtp.py): the plumbing at a budget of
a few steps (what the numbers say is for the full run, docs/experiments.md), the statistics, the
same-seed trunk, bad input, and the generated tables of docs/experiments.md."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from refmtp.cli.main import cli
from refmtp.config import preset
from refmtp.model import init_params
from refmtp.verification.experiment_mtp import (BEGIN, END, PLANS, VARIANTS, check_plan,
                                                generated_block, matched_steps, mean_std,
                                                page_block, read_results, variant_config)

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "experiments.md"
COMMITTED = "docs/experiments/mtp.json"  # the full run's results, once committed


def _invoke(args):
    return CliRunner().invoke(cli, args)


@pytest.mark.parametrize("name", ["tiny", "mini"])
def test_same_seed_same_initial_trunk(name):
    """Every variant of a seed starts from the same trunk (init draws in sorted name order;
    the MTP modules / heads sort after the trunk's layers)."""
    base = init_params(variant_config(preset(name), VARIANTS[0]), seed=5, dtype="float32")
    for v in VARIANTS[1:]:
        p = init_params(variant_config(preset(name), v), seed=5, dtype="float32")
        assert set(base) < set(p)
        for k, a in base.items():
            assert (p[k] == a).all(), (v.name, k)


def test_mean_std_and_matched_steps():
    s = mean_std([1.0, 2.0, None, 3.0])
    assert s["mean"] == 2.0 and s["std"] == 1.0 and s["n"] == 3
    assert mean_std([4.0])["std"] is None and mean_std([None])["mean"] is None
    assert matched_steps(600, 0.10, 0.15) == 400
    assert matched_steps(3, 0.01, 1.0) == 1  # never zero steps


def test_quick_plumbing(tmp_path, monkeypatch):
    out = tmp_path / "exp"
    res = _invoke(["experiment", "mtp", "--quick", "--steps", "2", "--seeds", "2",
                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = read_results(out / "results.json")
    assert data["complete"] and data["plan"]["steps"] == 2 and data["seeds"] == [0, 1]
    names = [v.name for v in VARIANTS]
    same = [(r["variant"], r["seed"]) for r in data["runs"] if r["budget"] == "tokens"]
    assert same == [(n, s) for s in (0, 1) for n in names]  # variants alternate per seed
    wall = [r for r in data["runs"] if r["budget"] == "wall"]
    assert [(r["variant"], r["seed"]) for r in wall] == [(n, s) for s in (0, 1) for n in names[1:]]
    times = {n: data["summary"][n]["step_time_s"]["median"] for n in names}
    for r in wall:
        assert r["steps"] == matched_steps(2, times["D=0"], times[r["variant"]])
    for r in data["runs"]:
        v = next(v for v in VARIANTS if v.name == r["variant"])
        assert set(r["acc"]) == {"main"} | {f"mtp.{k}" for k in range(1, v.D + 1)}
        assert (run := out / r["run_dir"]).is_dir() and (run / "metrics.jsonl").is_file()
        assert r["curve"][-1]["step"] == r["steps"]
        spec = r["speculative"]
        if v.D == 0:
            assert spec is None
            continue
        assert spec["K"] == v.D and 0 <= spec["p_a1"] <= 1 and spec["tau"] >= 1
        assert (spec["p_a2"] is None) == (v.D < 2)
        assert spec["tokens"] == data["plan"]["samples"] * data["plan"]["max_new_tokens"]
    s = data["summary"]["causal D=2"]
    assert s["main_loss"]["n"] == 2 and s["main_loss"]["std"] is not None
    assert set(s["depth_acc"]) == {"mtp.1", "mtp.2"}
    assert set(data["matched"]["variants"]) == set(names[1:])
    assert data["machine"]["cpu_count"] and data["load_average"]["end"] is not None
    table = (out / "table.md").read_text()
    assert "| causal D=1 |" in table and table in res.output
    try:
        import matplotlib  # noqa: F401
        assert (out / "plot.png").stat().st_size > 0
    except ImportError:
        assert "plot skipped: matplotlib is not installed" in res.output
    # the table command renders the same tables from the file alone
    again = _invoke(["experiment", "table", str(out / "results.json")])
    assert again.exit_code == 0 and again.output == table
    # --write replaces only a page's generated block, idempotently
    monkeypatch.chdir(tmp_path)
    page = tmp_path / "page.md"
    page.write_text(f"# head\n\n{BEGIN}\nold\n{END}\n\ntail\n")
    for _ in range(2):
        res = _invoke(["experiment", "table", "exp/results.json", "--write", "page.md"])
        assert res.exit_code == 0, res.output
    text = page.read_text()
    assert text.startswith("# head\n\n") and text.endswith("\n\ntail\n") and "old" not in text
    assert generated_block(text) == page_block(data, "exp/results.json")
    res = _invoke(["experiment", "table", str(out / "results.json"), "--write", "page.md"])
    assert res.exit_code == 2 and "relative to the repository" in res.output


@pytest.mark.parametrize("args,match", [
    (["--seeds", "0"], "--seeds 0 must be between 1 and 10"),
    (["--steps", "0"], "--steps 0 must be >= 1"),
])
def test_bad_options_one_line_exit_2(args, match, tmp_path):
    res = _invoke(["experiment", "mtp", "--quick", "--out", str(tmp_path / "x"), *args])
    assert res.exit_code == 2 and match in res.output
    assert not (tmp_path / "x").exists()


def test_non_empty_out_refused_before_work(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    res = _invoke(["experiment", "mtp", "--quick", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "is not an empty directory" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_table_refuses_other_files(tmp_path):
    bad = tmp_path / "r.json"
    bad.write_text(json.dumps({"format": "something else"}))
    res = _invoke(["experiment", "table", str(bad)])
    assert res.exit_code == 2 and "is not a results file of refmtp experiment mtp" in res.output
    bad.write_text(json.dumps({"format": "refmtp-experiment-mtp", "format_version": 1,
                               "complete": False}))
    res = _invoke(["experiment", "table", str(bad)])
    assert res.exit_code == 2 and "unfinished experiment" in res.output


def test_plan_checks():
    check_plan(PLANS["full"], [0, 1, 2])
    with pytest.raises(ValueError, match="must stay below seq_len"):
        check_plan(dataclasses.replace(PLANS["quick"], max_new_tokens=60), [0])
    with pytest.raises(ValueError, match="distinct integers"):
        check_plan(PLANS["quick"], [0, 0])


def test_docs_page_table_is_generated_from_the_committed_results():
    text = PAGE.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    if not (ROOT / COMMITTED).is_file():
        pytest.skip(f"the full run's results are not committed yet ({COMMITTED}); the page's "
                    "block is a placeholder until `refmtp experiment table ... --write`")
    assert generated_block(text) == page_block(read_results(ROOT / COMMITTED), COMMITTED)


def test_interrupted_run_stops_the_experiment(tmp_path, monkeypatch):
    """Ctrl-C / SIGTERM during a run: the trainer saves, then the experiment stops (no further
    runs, no decoding) with the signal's Aborted."""
    from refmtp.training.trainer import Aborted, Trainer
    from refmtp.verification import experiment_mtp

    original = Trainer.run

    def run_with_signal(self, on_step=None, on_log=None):
        self.stop_requested, self.stop_signal = True, 15  # as the SIGTERM handler does
        return original(self, on_step=on_step, on_log=on_log)

    monkeypatch.setattr(Trainer, "run", run_with_signal)
    plan = dataclasses.replace(PLANS["quick"], steps=2)
    with pytest.raises(Aborted) as info:
        experiment_mtp.run_experiment(plan, tmp_path / "exp", [0], log=lambda line: None)
    assert info.value.signum == 15
    runs = sorted(p.name for p in (tmp_path / "exp" / "runs").iterdir())
    assert runs == ["D0-seed0"]  # the first run only, and it saved its step-0 checkpoint
    assert any(p.name.startswith("checkpoint-") for p in (tmp_path / "exp" / "runs" / runs[0]).iterdir())
