"""Fault tests: `refmtp train` killed with SIGKILL (no clean-up of any kind) at chosen points of a
save and at random moments; resuming must give bit-identical results and a correct `latest`.

The named points are the test hook of refmtp.training.rundir (REFMTP_TEST_KILL_AT=<point>:<step>):
before the manifest update, before the rename of ckpt.tmp, between the rename and the `latest`
update, and after `latest` before the older checkpoint is removed. The random series is `slow`.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from refmtp.config import preset
from refmtp.training.rundir import (FAULT_ENV, MANIFEST_FILE, latest_checkpoint, read_pointer)
from refmtp.training.trainer import Trainer, TrainSettings
from tests.test_train import assert_bit_identical, text_file  # noqa: F401 (fixture)

STEPS = 6


def _settings(text_file) -> TrainSettings:  # noqa: F811
    return TrainSettings(preset="tiny", data=str(text_file), steps=STEPS, batch_size=2,
                         seq_len=16, eval_every=0, checkpoint_every=1, log_every=1)


def _command(text_file, out):  # noqa: F811
    return [sys.executable, "-m", "refmtp.cli.main", "train", "--preset", "tiny", "--data",
            str(text_file), "--steps", str(STEPS), "--batch-size", "2", "--seq-len", "16",
            "--eval-every", "0", "--checkpoint-every", "1", "--log-every", "1", "--out", str(out)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, text_file):  # noqa: F811
    out = tmp_path_factory.mktemp("faults") / "ref"
    assert Trainer.new(_settings(text_file), preset("tiny"), out).run().step == STEPS
    return out


def _finish_and_check(out, text_file, reference):  # noqa: F811
    """Continue whatever the kill left (resume, or a fresh start when run.json was not yet
    written) and check the result against the uninterrupted run."""
    if (out / "run.json").exists():
        result = Trainer.resume(out, {}).run()
    else:
        result = Trainer.new(_settings(text_file), preset("tiny"), out).run()
    assert result.step == STEPS
    assert_bit_identical(out, reference)
    final = f"checkpoint-{STEPS:07d}"
    assert latest_checkpoint(out).name == final and read_pointer(out) == final
    assert json.loads((out / MANIFEST_FILE).read_text())["checkpoints"] == [final]
    assert not (out / "ckpt.tmp").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [final]


@pytest.mark.parametrize("point", [  # each is one ~1 s subprocess: one in the fast lane
    "after_rename", *(pytest.param(p, marks=pytest.mark.slow)
                      for p in ("before_rename", "before_manifest", "after_latest"))])
def test_kill_at_each_point_of_a_save(tmp_path, text_file, reference, point):  # noqa: F811
    out = tmp_path / "run"
    env = {**os.environ, FAULT_ENV: f"{point}:3"}
    proc = subprocess.run(_command(text_file, out), env=env, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    if point == "after_rename":  # the case the issue found: latest still names step 2
        assert read_pointer(out) == "checkpoint-0000002"
        assert latest_checkpoint(out).name == "checkpoint-0000003"  # derived, not trusted
        # generate reads the newest checkpoint, not the stale pointer
        from refmtp.cli.generate import resolve_checkpoint
        assert resolve_checkpoint(out).name == "checkpoint-0000003"
    _finish_and_check(out, text_file, reference)


@pytest.mark.slow
def test_sigkill_at_random_moments(tmp_path, text_file, reference):  # noqa: F811
    rng = random.Random(16)

    def start(out):
        """Start a run; -> (process, seconds until its run.json appeared)."""
        t0 = time.perf_counter()
        proc = subprocess.Popen(_command(text_file, out), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        while not (out / "run.json").exists() and proc.poll() is None:
            time.sleep(0.002)
        return proc, time.perf_counter() - t0

    proc, startup = start(tmp_path / "timing")
    t0 = time.perf_counter()
    assert proc.wait() == 0
    training = time.perf_counter() - t0  # the steps and saves after run.json
    resumed = 0
    for trial in range(24):
        out = tmp_path / f"trial{trial}"
        if trial % 6 == 0:  # during the start-up (imports, checks, run.json)
            proc = subprocess.Popen(_command(text_file, out), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.0, 1.2) * startup)
        else:  # while training and saving
            proc, _ = start(out)
            time.sleep(rng.uniform(0.0 if trial % 2 else 0.5, 1.0) * training)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        resumed += out.is_dir() and latest_checkpoint(out) is not None
        _finish_and_check(out, text_file, reference)
    assert resumed >= 5  # many kills hit the steps and saves after the first checkpoint


@pytest.mark.slow
def test_sigterm_and_second_signal_from_outside(tmp_path, text_file, reference):  # noqa: F811
    """SIGTERM from another process: save, print the resume command, exit 143; resuming is exact."""
    out = tmp_path / "term"
    proc = subprocess.Popen(_command(text_file, out) + ["--steps", "100000", "--decay-steps",
                                                        str(STEPS)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not list(out.glob("checkpoint-*")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert f"--resume {out}" in stderr and "Traceback" not in stderr
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and read_pointer(out) == ckpt.name
    # two signals in a row: the second aborts at once; the last checkpoint stays valid
    proc = subprocess.Popen([sys.executable, "-m", "refmtp.cli.main", "train", "--resume",
                             str(out), "--steps", "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while latest_checkpoint(out) == ckpt:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in stderr, stderr
    trainer = Trainer.resume(out, {})  # hashes, run id and step checked
    trainer.close()
    assert trainer.step >= 1
