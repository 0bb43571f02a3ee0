"""The run directory keeps data safe: the manifest, a derived `latest`, the lock, resume checks,
no non-finite checkpoint, SIGTERM, a full disk (docs/training.md, "What survives what").

In-process and small: the tiny preset for a few steps on the generated text of test_train.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner

from refmtp.cli.main import cli
from refmtp.config import preset
from refmtp.training.rundir import (LOCK_FILE, MANIFEST_FILE, RunLock, latest_checkpoint,
                                   read_pointer)
from refmtp.training.trainer import Aborted, NonFiniteError, RunError, Trainer
from tests.test_train import assert_bit_identical, settings, text_file  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def ref6(tmp_path_factory, text_file):  # noqa: F811
    """6 steps in one go, a checkpoint every 2 (what interrupted runs must reproduce)."""
    out = tmp_path_factory.mktemp("safety") / "ref"
    assert Trainer.new(settings(text_file, checkpoint_every=2), preset("tiny"), out).run().step == 6
    return out


def _run(out, text_file, steps=6, **kw):  # noqa: F811
    return Trainer.new(settings(text_file, steps=steps, decay_steps=6, checkpoint_every=2, **kw),
                       preset("tiny"), out).run()


def _cli(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def _one_error_line(r):
    lines = r.stderr.strip().splitlines()
    return len(lines) == 1 and "Traceback" not in r.output


def test_cleanup_keeps_user_copies_and_latest_is_derived(tmp_path, text_file, ref6):  # noqa: F811
    out = tmp_path / "run"
    _run(out, text_file, steps=4)
    shutil.copytree(out / "checkpoint-0000004", out / "checkpoint-0000004-mine")
    shutil.copytree(out / "checkpoint-0000004", out / "checkpoint-0000001")  # a user's copy
    assert json.loads((out / MANIFEST_FILE).read_text())["checkpoints"] == ["checkpoint-0000004"]
    # a kill between the rename and the latest update leaves latest on an older name
    (out / "latest").write_text("checkpoint-0000002\n")
    assert latest_checkpoint(out).name == "checkpoint-0000004"
    t = Trainer.resume(out, {"steps": 6})
    assert read_pointer(out) == "checkpoint-0000004"  # repaired on resume
    assert t.run().step == 6
    assert_bit_identical(out, ref6)
    assert (out / "checkpoint-0000004-mine").is_dir() and (out / "checkpoint-0000001").is_dir()
    assert not (out / "checkpoint-0000004").exists()  # the run's own older checkpoint is gone
    for garbage in (b"\xff\x00\x01", b"../../etc", b""):
        (out / "latest").write_bytes(garbage)
        assert latest_checkpoint(out).name == "checkpoint-0000006"


def test_resume_refuses_checkpoints_of_another_run(tmp_path, text_file):  # noqa: F811
    a, b = tmp_path / "a", tmp_path / "b"
    _run(a, text_file, steps=2)
    _run(b, text_file, steps=2)
    # another run's checkpoint, copied in under the newest name
    shutil.copytree(b / "checkpoint-0000002", a / "c2")
    shutil.rmtree(a / "checkpoint-0000002")
    (a / "c2").rename(a / "checkpoint-0000002")
    with pytest.raises(RunError, match="not written by this run"):
        Trainer.resume(a, {"steps": 4})
    # a swapped model file
    shutil.rmtree(a / "checkpoint-0000002")
    shutil.copytree(b / "checkpoint-0000002", a / "checkpoint-0000002")
    state = json.loads((a / "checkpoint-0000002" / "trainer_state.json").read_text())
    state["run_id"] = json.loads((a / "run.json").read_text())["run_id"]
    (a / "checkpoint-0000002" / "trainer_state.json").write_text(json.dumps(state))
    model = a / "checkpoint-0000002" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-1] ^= 1
    model.write_bytes(bytes(data))
    with pytest.raises(RunError, match="sha256"):
        Trainer.resume(a, {"steps": 4})
    # a checkpoint that is a link to a directory outside the run
    shutil.rmtree(a / "checkpoint-0000002")
    os.symlink(b / "checkpoint-0000002", a / "checkpoint-0000002")
    with pytest.raises(RunError, match="no complete checkpoint|outside"):
        Trainer.resume(a, {"steps": 4})


def test_restart_before_the_first_checkpoint_is_the_same_run(tmp_path, text_file, ref6):  # noqa: F811
    out = tmp_path / "early"
    t = Trainer.new(settings(text_file, checkpoint_every=2), preset("tiny"), out)
    t.close()  # as if killed before the first save: run.json, no checkpoint
    (out / LOCK_FILE).write_text("999999999\n")  # a stale lock of a dead process
    r = _cli(["train", "--out", str(out), "--preset", "tiny", "--data", "x"])
    assert r.exit_code == 2 and "--resume" in r.stderr
    assert Trainer.resume(out, {}).run().step == 6
    assert_bit_identical(out, ref6)


def test_one_process_per_run_directory(tmp_path, text_file):  # noqa: F811
    out = tmp_path / "locked"
    _run(out, text_file, steps=2)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from refmtp.training.rundir import RunLock;"
         f"lock = RunLock({str(out)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunError, match=f"in use by process {holder.pid}"):
            Trainer.resume(out, {"steps": 4})
        r = _cli(["train", "--resume", str(out), "--steps", "4"])
        assert r.exit_code == 2 and str(holder.pid) in r.stderr and _one_error_line(r)
        r = _cli(["train", "--preset", "tiny", "--out", str(out)])
        assert r.exit_code == 2 and str(holder.pid) in r.stderr
    finally:
        holder.kill()
        holder.wait()
    assert Trainer.resume(out, {"steps": 4}).run().step == 4  # the dead holder's lock is taken over
    assert not (out / LOCK_FILE).exists()
    assert RunLock(out).acquire().held


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_no_checkpoint_holds_a_nonfinite_tensor(tmp_path, text_file, monkeypatch):  # noqa: F811
    import refmtp.training.step as step_mod

    real = step_mod.update_expert_bias

    def poison(params, load, gamma):  # the update of step 3 makes a weight infinite
        real(params, load, gamma)
        if poison.calls == 2:
            params["lm_head.weight"] = params["lm_head.weight"] * float("inf")
        poison.calls += 1

    poison.calls = 0
    monkeypatch.setattr(step_mod, "update_expert_bias", poison)
    out = tmp_path / "inf"
    t = Trainer.new(settings(text_file, checkpoint_every=1), preset("tiny"), out)
    with pytest.raises(NonFiniteError, match="step 3: 'lm_head.weight' is not finite") as e:
        t.run()
    assert "last good checkpoint" in str(e.value) and "checkpoint-0000002" in str(e.value)
    assert latest_checkpoint(out).name == "checkpoint-0000002"


def test_full_disk_while_saving_is_one_clean_line(tmp_path, text_file, monkeypatch):  # noqa: F811
    from safetensors import SafetensorError

    import refmtp.training.trainer as train_mod

    real = train_mod.save_optimizer

    def full(path, opt):
        if opt.step_count == 4:
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: "
                                  "StorageFull, message: \"No space left on device\" })")
        real(path, opt)

    monkeypatch.setattr(train_mod, "save_optimizer", full)
    out = tmp_path / "full"
    r = _cli(["train", "--preset", "tiny", "--data", str(text_file), "--steps", "4",
              "--batch-size", "2", "--seq-len", "16", "--checkpoint-every", "2",
              "--eval-every", "0", "--out", str(out)])
    assert r.exit_code == 1 and _one_error_line(r), r.output
    assert "No space left on device" in r.stderr and "checkpoint-0000002 is intact" in r.stderr
    assert latest_checkpoint(out).name == "checkpoint-0000002" and not (out / "ckpt.tmp").exists()
    monkeypatch.undo()
    assert Trainer.resume(out, {}).run().step == 4


def test_sigterm_saves_and_exits_143(tmp_path, text_file, ref6):  # noqa: F811
    out = tmp_path / "term"
    t = Trainer.new(settings(text_file, checkpoint_every=2), preset("tiny"), out)

    def on_step(step, record):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # what SLURM / Kubernetes send

    r = t.run(on_step=on_step)
    assert r.status == "interrupted" and r.step == 3 and r.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert Trainer.resume(out, {}).run().step == 6
    assert_bit_identical(out, ref6)


def test_second_signal_aborts_without_saving(tmp_path, text_file):  # noqa: F811
    out = tmp_path / "twice"
    t = Trainer.new(settings(text_file, checkpoint_every=2), preset("tiny"), out)

    def on_step(step, record):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Aborted):
        t.run(on_step=on_step)
    assert latest_checkpoint(out).name == "checkpoint-0000002"
    assert not (out / LOCK_FILE).exists()
    assert Trainer.resume(out, {}).step == 2


def test_ctrl_c_during_startup_imports_exits_130(monkeypatch, capsys):
    """The console script imports the commands inside its guard: Ctrl-C there is exit 130."""
    import importlib.abc

    import refmtp.cli as cli_pkg

    class Interrupting(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "refmtp.cli.main":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "refmtp.cli.main")
    monkeypatch.setattr(sys, "meta_path", [Interrupting(), *sys.meta_path])
    with pytest.raises(SystemExit) as e:
        cli_pkg.entry()
    assert e.value.code == 130 and capsys.readouterr().err.strip() == "interrupted"


def test_ctrl_c_in_a_command_exits_130_without_traceback(monkeypatch):
    import refmtp.cli.info as info_mod

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(info_mod, "collect_info", interrupted)
    r = CliRunner().invoke(cli, ["info"])
    assert r.exit_code == 130 and r.stderr.strip() == "interrupted" and "Traceback" not in r.output
