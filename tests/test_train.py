"""The trainer and the train/plot commands: exact resume, Ctrl-C, non-finite stops, errors.

Everything runs the tiny preset for a handful of steps on a small generated text file.
"""
from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from refmtp.cli.main import cli
from refmtp.config import preset
from refmtp.training.rundir import latest_checkpoint
from refmtp.training.trainer import NonFiniteError, RunError, Trainer, TrainSettings

TIMING_KEYS = {"tokens_per_s", "elapsed_s"}


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "import", "for", "in", "if", "else:", "x", "y", "(", ")",
             "    ", "\n", "=", "+", "1", "None", "class", "print"]
    text = " ".join(words[i] for i in rng.integers(0, len(words), 6000))
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(text)
    return path


def settings(text_file, **kw) -> TrainSettings:
    base = dict(preset="tiny", data=str(text_file), steps=6, batch_size=2, seq_len=16, lr=1e-2,
                eval_every=3, eval_batches=1, log_every=1, checkpoint_every=0)
    base.update(kw)
    return TrainSettings(**base)


def ckpt_tensors(run_dir: Path) -> dict:
    ckpt = latest_checkpoint(run_dir)
    out = {f"model/{k}": v for k, v in load_file(str(ckpt / "model.safetensors")).items()}
    out.update({f"opt/{k}": v for k, v in load_file(str(ckpt / "optimizer.safetensors")).items()})
    return out


def assert_bit_identical(a: Path, b: Path):
    ta, tb = ckpt_tensors(a), ckpt_tensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].tobytes() == tb[k].tobytes(), k
    sa = json.loads((latest_checkpoint(a) / "trainer_state.json").read_text())
    sb = json.loads((latest_checkpoint(b) / "trainer_state.json").read_text())
    for key in ("step", "tokens_seen", "data"):
        assert sa[key] == sb[key], key


def metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING_KEYS} for x in lines]


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory, text_file):
    """reference_runs(backend_name): 6 steps in one go on that backend, run once per module:
    what every resumed run on the same backend must reproduce bit for bit."""
    runs: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in runs:
            out = tmp_path_factory.mktemp("runs") / f"ref-{name}"
            result = Trainer.new(settings(text_file, backend=name), preset("tiny"), out).run()
            assert result.status == "done" and result.step == 6
            runs[name] = out
        return runs[name]

    return get


@pytest.fixture(scope="module")
def reference_run(reference_runs):
    """The numpy reference run (the tests below that are not about backends use it)."""
    return reference_runs("numpy")


# -------------------------------------------------------------------------------------------
# the loop and its outputs
# -------------------------------------------------------------------------------------------
def test_run_writes_checkpoint_metrics_and_learns(backend, reference_runs):
    out = reference_runs(backend.name)
    ckpt = latest_checkpoint(out)
    assert ckpt.name == "checkpoint-0000006" and (out / "latest").read_text().strip() == ckpt.name
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json"]
    assert not (out / "ckpt.tmp").exists()
    assert json.loads((ckpt / "config.json").read_text())["vocab_size"] == 256  # byte level
    recs = metrics(out)
    assert [r["step"] for r in recs] == [0, 1, 2, 3, 4, 5, 6]
    first, last = recs[1], recs[-1]
    assert set(first["loss"]) == {"main", "mtp.1", "mtp.2", "balance", "total"}
    for key in ("lr", "grad_norm", "tokens", "imbalance", "imbalance_max"):
        assert key in first, key
    assert first["imbalance_max"] >= 1.0 and first["tokens"] == 2 * 16
    for r in (recs[0], recs[3], recs[6]):  # evaluations: step 0, every 3 steps, the end
        assert set(r["eval_acc"]) == {"main", "mtp.1", "mtp.2"}
        assert set(r["eval_loss"]) >= {"main", "mtp.1", "mtp.2"}
        assert all(0.0 <= a <= 1.0 for a in r["eval_acc"].values())
    assert "eval_loss" not in recs[1]
    assert last["loss"]["main"] < first["loss"]["main"] - 0.3  # lr 1e-2 learns bytes fast
    assert recs[6]["eval_loss"]["main"] < recs[0]["eval_loss"]["main"]
    assert math.isclose(recs[0]["eval_loss"]["main"], math.log(256), rel_tol=0.05)
    assert not any(p.suffix in (".pkl", ".pt", ".bin", ".npy") for p in out.rglob("*"))


def test_resume_after_stopping_is_bit_identical(tmp_path, text_file, backend, reference_runs):
    reference_run = reference_runs(backend.name)
    out = tmp_path / "split"
    # 3 steps with the 6-step schedule, then resume to 6: the schedule horizon stays fixed
    r = Trainer.new(settings(text_file, steps=3, decay_steps=6, backend=backend.name),
                    preset("tiny"), out).run()
    assert r.step == 3
    resumed = Trainer.resume(out, {"steps": 6})
    assert resumed.step == 3 and resumed.settings.backend == backend.name
    assert resumed.run().step == 6
    assert_bit_identical(out, reference_run)
    assert metrics(out) == metrics(reference_run)


def test_ctrl_c_mid_step_saves_and_resumes_exactly(tmp_path, text_file, backend, reference_runs,
                                                   monkeypatch):
    reference_run = reference_runs(backend.name)
    import refmtp.training.step as model  # the one training step calls forward through this name

    real_forward, calls = model.forward, {"n": 0}

    def interrupting_forward(*args, **kw):
        if kw.get("need_cache", True):
            calls["n"] += 1
            if calls["n"] == 4:  # Ctrl-C during the 4th update's forward
                raise KeyboardInterrupt
        return real_forward(*args, **kw)

    monkeypatch.setattr(model, "forward", interrupting_forward)
    out = tmp_path / "ctrlc"
    r = Trainer.new(settings(text_file, backend=backend.name), preset("tiny"), out).run()
    assert r.status == "interrupted" and r.step == 3
    assert r.checkpoint.name == "checkpoint-0000003"
    monkeypatch.setattr(model, "forward", real_forward)
    Trainer.resume(out, {}).run()
    assert_bit_identical(out, reference_run)


def test_sigint_stops_after_the_current_step(tmp_path, text_file, backend, reference_runs):
    reference_run = reference_runs(backend.name)
    out = tmp_path / "sigint"
    trainer = Trainer.new(settings(text_file, backend=backend.name), preset("tiny"), out)

    def on_step(step, record):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C; the handler defers it

    r = trainer.run(on_step=on_step)
    assert r.status == "interrupted" and r.step == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    assert Trainer.resume(out, {"steps": 6}).run().status == "done"
    assert_bit_identical(out, reference_run)


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, text_file, monkeypatch):
    import refmtp.training.trainer as train_mod

    out = tmp_path / "crash"
    trainer = Trainer.new(settings(text_file, steps=4, checkpoint_every=2), preset("tiny"), out)
    real = train_mod.save_optimizer

    def failing(path, opt):
        if opt.step_count == 4:
            raise OSError("disk full")
        real(path, opt)

    monkeypatch.setattr(train_mod, "save_optimizer", failing)
    with pytest.raises(OSError):
        trainer.run()
    assert latest_checkpoint(out).name == "checkpoint-0000002"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-0000002"]
    monkeypatch.setattr(train_mod, "save_optimizer", real)
    resumed = Trainer.resume(out, {})
    assert resumed.step == 2
    assert resumed.run().step == 4 and not (out / "ckpt.tmp").exists()


def test_nonfinite_loss_names_step_and_term(tmp_path, text_file, monkeypatch):
    import refmtp.training.step as model  # the one training step calls forward through this name

    real_forward = model.forward

    def nan_forward(params, cfg, tokens, **kw):
        out, cache = real_forward(params, cfg, tokens, **kw)
        if kw.get("need_cache", True) and calls.append(1) is None and len(calls) == 3:
            out.losses["mtp.1"] = out.losses["mtp.1"] * float("nan")
        return out, cache

    calls = []
    monkeypatch.setattr(model, "forward", nan_forward)
    out = tmp_path / "nan"
    trainer = Trainer.new(settings(text_file, checkpoint_every=1), preset("tiny"), out)
    with pytest.raises(NonFiniteError, match=r"step 3: loss term 'mtp.1' is nan") as e:
        trainer.run()
    assert "checkpoint-0000002" in str(e.value) and "\n" not in str(e.value)
    assert latest_checkpoint(out).name == "checkpoint-0000002"
    assert max(r["step"] for r in metrics(out)) == 2


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's overflow warnings
def test_huge_lr_stops_with_nonfinite_message(tmp_path, text_file):
    trainer = Trainer.new(settings(text_file, lr=1e30, warmup_steps=0, checkpoint_every=1),
                          preset("tiny"), tmp_path / "lr")
    with pytest.raises(NonFiniteError, match=r"^step \d+: .*(not finite|is nan|is inf)"):
        trainer.run()
    ckpt = latest_checkpoint(tmp_path / "lr")
    assert ckpt is not None and not (tmp_path / "lr" / "ckpt.tmp").exists()


def test_resume_refuses_a_different_run(tmp_path, text_file, reference_run):
    before = {p: p.read_bytes() for p in reference_run.rglob("*") if p.is_file()}
    with pytest.raises(RunError, match="--batch-size 4 differs"):
        Trainer.resume(reference_run, {"batch_size": 4})
    with pytest.raises(RunError, match="hidden_size"):
        Trainer.resume(reference_run, {}, preset("tiny").replace(hidden_size=32))
    with pytest.raises(RunError, match="not empty"):
        Trainer.new(settings(text_file), preset("tiny"), reference_run)
    after = {p: p.read_bytes() for p in reference_run.rglob("*") if p.is_file()}
    assert after == before  # nothing overwritten


# -------------------------------------------------------------------------------------------
# the command
# -------------------------------------------------------------------------------------------
def _cli(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_cli_trains_and_resumes(tmp_path, text_file):
    out = tmp_path / "cli"
    args = ["train", "--preset", "tiny", "--data", str(text_file), "--steps", "3",
            "--batch-size", "2", "--seq-len", "16", "--eval-every", "2", "--out", str(out)]
    r = _cli(args)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].startswith("model   tiny:")  # the resolved config comes first
    assert any("override: vocab_size 64 -> 256" in x for x in lines)
    assert "held-out: loss" in r.output and f"checkpoint: {out}" in r.output
    assert any(x.startswith("step      3  loss") for x in lines)  # log line (no terminal)
    r = _cli(["train", "--resume", str(out), "--steps", "5"])
    assert r.exit_code == 0, r.output
    assert "done at step 5" in r.output and "resume  from" in r.output


@pytest.mark.parametrize("extra,pattern", [
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--data", "/nonexistent/corpus"], "does not exist"),
    (["--preset", "tiny", "--config", "x.json"], "not both"),
])
def test_cli_input_errors_exit_2(tmp_path, extra, pattern):
    out = tmp_path / "never"
    r = _cli(["train", "--steps", "2", "--out", str(out), *extra])
    assert r.exit_code == 2, r.output
    assert pattern in r.output and len(r.output.strip().splitlines()) == 1
    assert "Traceback" not in r.output and not out.exists()


def test_cli_empty_corpus_and_resume_mismatch_exit_2(tmp_path, text_file, reference_run):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    r = _cli(["train", "--preset", "tiny", "--data", str(empty), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "empty" in r.output and not (tmp_path / "o").exists()
    before = (reference_run / "run.json").read_bytes()
    for extra, pattern in ((["--seq-len", "32"], "--seq-len 32 differs"),
                           (["--preset", "small"], "differs from the run"),
                           (["--dtype", "float64"], "--dtype float64 differs")):
        r = _cli(["train", "--resume", str(reference_run), *extra])
        assert r.exit_code == 2, r.output
        assert pattern in r.output and len(r.output.strip().splitlines()) == 1
    r = _cli(["train", "--resume", str(tmp_path / "nothing-here")])
    assert r.exit_code == 2 and "not a refmtp run directory" in r.output
    assert (reference_run / "run.json").read_bytes() == before


def test_cli_nonfinite_exit_1(tmp_path, text_file):
    r = _cli(["train", "--preset", "tiny", "--data", str(text_file), "--steps", "5",
              "--batch-size", "2", "--seq-len", "16", "--lr", "1e30", "--warmup-steps", "0",
              "--out", str(tmp_path / "o")])
    assert r.exit_code == 1
    err = r.output.strip().splitlines()[-1]
    assert err.startswith("Error: step ") and ("not finite" in err or "is nan" in err)


def test_cli_ctrl_c_saves_and_exits_130(tmp_path, text_file, monkeypatch):
    import refmtp.training.step as model  # the one training step calls forward through this name

    real_forward, calls = model.forward, []

    def interrupting_forward(*args, **kw):
        if kw.get("need_cache", True):  # training steps only, not evaluations
            if len(calls) == 2:
                raise KeyboardInterrupt
            calls.append(1)
        return real_forward(*args, **kw)

    monkeypatch.setattr(model, "forward", interrupting_forward)
    out = tmp_path / "o"
    r = _cli(["train", "--preset", "tiny", "--data", str(text_file), "--steps", "5",
              "--batch-size", "2", "--seq-len", "16", "--out", str(out)])
    assert r.exit_code == 130 and "Traceback" not in r.output
    assert "interrupted at step 2" in r.output and f"--resume {out}" in r.output
    assert latest_checkpoint(out).name == "checkpoint-0000002"


def test_plot(tmp_path, reference_run, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    r = _cli(["plot", str(reference_run), "--out", str(tmp_path / "a.png")])
    assert r.exit_code == 1 and "pip install 'refmtp[plot]'" in r.output
    monkeypatch.undo()
    r = _cli(["plot", str(tmp_path)])
    assert r.exit_code == 2 and "metrics.jsonl does not exist" in r.output
    pytest.importorskip("matplotlib")
    r = _cli(["plot", str(reference_run), "--out", str(tmp_path / "c.png")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -------------------------------------------------------------------------------------------
# both backends
# -------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_cupy_matches_numpy_float64(tmp_path, text_file):
    from refmtp.backends import get_backend

    get_backend("cupy")  # skips above when there is no GPU (conftest)
    runs = {}
    for name in ("numpy", "cupy"):
        out = tmp_path / name
        Trainer.new(settings(text_file, steps=4, dtype="float64", backend=name),
                    preset("tiny"), out).run()
        runs[name] = ckpt_tensors(out)
    for k, a in runs["numpy"].items():
        b = runs["cupy"][k]
        scale = max(float(np.max(np.abs(a))), 1e-30)
        assert float(np.max(np.abs(a - b))) <= 1e-10 * scale, k
