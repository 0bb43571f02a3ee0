"""Data parallelism under MPI (docs/distributed.md): `mpiexec -n N refmtp train` against the single
process with `--grad-accum N`, byte for byte; resume under MPI; a rank with bad input, a killed
rank; the install hint without mpi4py. Every MPI run is a subprocess with a timeout (no hang can
stall the suite); `-n 4` runs oversubscribed on CI's 2 cores.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from refmtp.config import preset
from refmtp.model import init_params
from refmtp.training.optim import AdamW
from refmtp.training.step import train_step
from tests.test_train import TIMING_KEYS, text_file  # noqa: F401 (fixture)

pytest.importorskip("mpi4py", reason="the MPI tests need mpi4py and mpich: pip install -e '.[test]'")
MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
if MPIEXEC is None:  # pragma: no cover - the mpich wheel of the test extra provides it
    pytest.skip("no mpiexec next to this Python or on PATH (pip install mpich)", allow_module_level=True)

TIMEOUT = 120  # seconds for one MPI run of a few tiny steps (each takes a few seconds)
CKPT_FILES = ("model.safetensors", "optimizer.safetensors", "config.json")
# trainer_state.json differs only in these keys: the run's random id and its wall time
STATE_DIFFERS = ("run_id", "elapsed_s", "files")


def _args(text_file, out, steps=4, **extra):  # noqa: F811
    args = ["train", "--preset", "tiny", "--data", str(text_file), "--steps", str(steps),
            "--decay-steps", "4", "--warmup-steps", "1", "--batch-size", "4", "--seq-len", "16",
            "--eval-every", "0", "--log-every", "1", "--checkpoint-every", "2"]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    if out is not None:
        args += ["--out", str(out)]
    return args


def _refmtp(*args):
    return [sys.executable, "-m", "refmtp.cli.main", *args]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _mpi(n, args, timeout=TIMEOUT, env=None, **kw):
    cmd = [MPIEXEC, "-n", str(n), *_refmtp(*args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**_env(), **(env or {})}, **kw)


def _single(args):
    return subprocess.run(_refmtp(*args), capture_output=True, text=True, timeout=TIMEOUT,
                          env=_env())


def _metrics(run: Path, drop=()) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING_KEYS | set(drop)}
            for x in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a: Path, b: Path, step: int = 4, drop=()):
    """The checkpoint files byte for byte, the trainer state but its id and wall time, metrics
    but their timings (and ``drop``)."""
    ca, cb = a / f"checkpoint-{step:07d}", b / f"checkpoint-{step:07d}"
    for name in CKPT_FILES:
        assert (ca / name).read_bytes() == (cb / name).read_bytes(), name
    sa, sb = (json.loads((c / "trainer_state.json").read_text()) for c in (ca, cb))
    assert {k: v for k, v in sa.items() if k not in STATE_DIFFERS} == \
        {k: v for k, v in sb.items() if k not in STATE_DIFFERS}
    assert sa["files"] == sb["files"]  # hashes of the identical files
    assert _metrics(a, drop) == _metrics(b, drop)
    run_a, run_b = (json.loads((r / "run.json").read_text()) for r in (a, b))
    assert run_a["settings"] == run_b["settings"]  # microbatches = ranks x --grad-accum


class _Accum(dict):
    """Single-process references, made when first asked for: accum[N] is the run directory of
    ``--grad-accum N``."""

    def __init__(self, base, text_file):  # noqa: F811
        super().__init__()
        self.base, self.text_file = base, text_file

    def __missing__(self, n):
        out = self.base / f"accum{n}"
        proc = _single(_args(self.text_file, out, grad_accum=n))
        assert proc.returncode == 0, proc.stderr
        self[n] = out
        return out


@pytest.fixture(scope="module")
def accum(tmp_path_factory, text_file):  # noqa: F811
    return _Accum(tmp_path_factory.mktemp("accum"), text_file)


@pytest.mark.parametrize("n", [2, pytest.param(4, marks=pytest.mark.slow)])  # 4 on 2 cores: oversubscribed
def test_data_parallel_equals_grad_accum_bit_for_bit(tmp_path, text_file, accum, n):  # noqa: F811
    out = tmp_path / "dp"
    proc = _mpi(n, _args(text_file, out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("checkpoint: ") == 1  # rank 0 prints; the others are silent
    assert_same_run(out, accum[n])


@pytest.mark.slow
def test_two_ranks_with_grad_accum_equal_four_microbatches(tmp_path, text_file, accum):  # noqa: F811
    out = tmp_path / "dp2x2"
    proc = _mpi(2, _args(text_file, out, grad_accum=2))
    assert proc.returncode == 0, proc.stderr
    assert_same_run(out, accum[4])


@pytest.mark.slow
def test_resume_under_mpi(tmp_path, text_file, accum):  # noqa: F811
    out = tmp_path / "resumed"
    proc = _mpi(2, _args(text_file, out, steps=2))
    assert proc.returncode == 0, proc.stderr
    proc = _mpi(2, ["train", "--resume", str(out), "--steps", "4"])
    assert proc.returncode == 0, proc.stderr
    # the stopped invocation evaluated at its last step (every invocation does): the rest is equal
    assert_same_run(out, accum[2], drop=("eval_loss", "eval_acc"))
    # the same run continues in one process: its 2 microbatches become --grad-accum 2
    single = tmp_path / "single"
    shutil.copytree(out, single)
    for p in single.glob("checkpoint-0000004"):
        shutil.rmtree(p)
    (single / "latest").write_text("checkpoint-0000002\n")
    proc = _single(["train", "--resume", str(single), "--steps", "4"])
    assert proc.returncode == 0, proc.stderr
    for name in CKPT_FILES:
        assert (single / "checkpoint-0000004" / name).read_bytes() == \
            (accum[2] / "checkpoint-0000004" / name).read_bytes(), name
    # a split that does not match the run's microbatches: one line, exit 2
    proc = _single(["train", "--resume", str(single), "--steps", "6", "--grad-accum", "4"])
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "microbatches" in proc.stderr


def test_grad_accum_must_divide_batch_size(tmp_path, text_file):  # noqa: F811
    proc = _single(_args(text_file, tmp_path / "x", grad_accum=3))
    assert proc.returncode == 2 and not (tmp_path / "x").exists()
    assert proc.stderr.strip().splitlines() == [
        "Error: --grad-accum 3 must divide --batch-size 4 (every microbatch has the same number "
        "of windows)"]


@pytest.mark.slow
def test_ranks_must_divide_batch_size(tmp_path, text_file):  # noqa: F811
    proc = _mpi(2, _args(text_file, tmp_path / "y", batch_size=3))
    assert proc.returncode == 2 and not (tmp_path / "y").exists()
    assert proc.stderr.strip().splitlines() == [
        "Error: 2 ranks x --grad-accum 1 = 2 must divide --batch-size 3 (every microbatch has "
        "the same number of windows)"]


def test_a_rank_with_bad_input_stops_every_rank(tmp_path, text_file):  # noqa: F811
    """MPMD launch: rank 1 alone gets a --grad-accum that does not divide the batch."""
    out = tmp_path / "bad"
    good = _refmtp(*_args(text_file, out))
    bad = _refmtp(*_args(text_file, out, grad_accum=3))
    proc = subprocess.run([MPIEXEC, "-n", "1", *good, ":", "-n", "1", *bad], capture_output=True,
                          text=True, timeout=TIMEOUT, env=_env())
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: rank 1: 2 ranks x --grad-accum 3")
    assert not out.exists()


def _rank_pid(marker: str, rank: int, deadline: float) -> int:
    """The pid of the rank whose command line holds ``marker`` (PMI_RANK from its environment)."""
    while time.monotonic() < deadline:
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                cmd = (p / "cmdline").read_bytes().split(b"\0")
                if marker.encode() not in cmd or b"refmtp.cli.main" not in cmd:
                    continue
                env = (p / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"PMI_RANK={rank}".encode() in env:
                return int(p.name)
        time.sleep(0.05)
    raise AssertionError(f"rank {rank} of {marker} did not start")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank through /proc")
@pytest.mark.parametrize("rank", [1, 0])
def test_a_killed_rank_stops_every_rank(tmp_path, text_file, rank):  # noqa: F811
    """SIGKILL one rank mid-run: mpiexec stops the other at once, says so, exits non-zero."""
    out = tmp_path / "killed"
    proc = subprocess.Popen([MPIEXEC, "-n", "2", *_refmtp(*_args(text_file, out, steps=100000))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (out / "metrics.jsonl").exists():  # training has started
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
            time.sleep(0.05)
        os.kill(_rank_pid(str(out), rank, deadline), signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    assert "BAD TERMINATION OF ONE OF YOUR APPLICATION PROCESSES" in stdout + stderr
    assert "Killed (signal 9)" in stdout + stderr
    if rank == 1:  # rank 0 kept its run directory consistent: the last checkpoint is usable
        from refmtp.training.rundir import latest_checkpoint

        ckpt = latest_checkpoint(out)
        assert ckpt is None or (ckpt / "trainer_state.json").exists()


def test_parallel_run_without_mpi4py_says_how_to_install(tmp_path, text_file):  # noqa: F811
    """As if launched by mpiexec (PMI_* set) with mpi4py missing (a module that fails to import)."""
    shim = tmp_path / "shim" / "mpi4py"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named mpi4py')\n")
    env = {**_env(), "PMI_RANK": "0", "PMI_SIZE": "2",
           "PYTHONPATH": os.pathsep.join([str(shim.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(_refmtp(*_args(text_file, tmp_path / "x")), capture_output=True,
                          text=True, timeout=TIMEOUT, env=env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and 'pip install "refmtp[mpi]"' in lines[0], proc.stderr


def test_grad_accum_step_is_the_full_batch_step_within_rounding(text_file):  # noqa: F811
    """The mean of the microbatch losses is the batch loss (every term is a mean over equal
    slices; the sequence-wise balance loss is per sequence): float64 steps agree to 1e-12."""
    cfg = preset("tiny")
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, cfg.vocab_size, (4, 9)).astype(np.int64)
    res, params = {}, {}
    for n in (1, 4):
        params[n] = init_params(cfg, seed=0, backend="numpy", dtype="float64")
        res[n] = train_step(params[n], cfg, tokens, AdamW(), 1e-3, 1.0, grad_accum=n)
    for n in (4,):
        for term, value in res[1].losses.items():
            assert abs(res[n].losses[term] - value) <= 1e-12 * max(1.0, abs(value)), term
        assert abs(res[n].grad_norm - res[1].grad_norm) <= 1e-12 * res[1].grad_norm
        for layer in res[1].load:
            assert np.array_equal(res[n].load[layer], res[1].load[layer])  # global loads
        for name in params[1]:
            assert np.allclose(params[n][name], params[1][name], rtol=0, atol=1e-12), name


def _tensors(run: Path, step: int = 4) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(run / f"checkpoint-{step:07d}" / "model.safetensors"))


@pytest.mark.slow
def test_expert_parallel_run_equals_grad_accum_within_rounding(tmp_path, text_file):  # noqa: F811
    """`mpiexec -n 2 refmtp train --expert-parallel 2` against `--grad-accum 2` (float64): each
    expert's gradient is one block over both ranks' tokens instead of a sum of two microbatch
    blocks, so the parameters agree to rounding (docs/distributed.md: |diff| <= 1e-12 here)."""
    ep, ga = tmp_path / "ep", tmp_path / "ga"
    proc = _mpi(2, _args(text_file, ep, expert_parallel=2, dtype="float64"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = _single(_args(text_file, ga, grad_accum=2, dtype="float64"))
    assert proc.returncode == 0, proc.stderr
    a, b = _tensors(ep), _tensors(ga)
    assert sorted(a) == sorted(b)
    for name in a:
        assert np.allclose(a[name], b[name], rtol=0, atol=1e-12), name
    for ma, mb in zip(_metrics(ep), _metrics(ga)):
        assert ma["step"] == mb["step"]
        for term, value in mb["loss"].items():
            assert abs(ma["loss"][term] - value) <= 1e-12 * max(1.0, abs(value)), term


def test_expert_parallel_needs_its_ranks(tmp_path, text_file):  # noqa: F811
    proc = _single(_args(text_file, tmp_path / "x", expert_parallel=2))
    assert proc.returncode == 2 and not (tmp_path / "x").exists()
    assert proc.stderr.strip().splitlines() == [
        "Error: --expert-parallel 2 shards the experts over 2 ranks: launch it with mpiexec -n 2 "
        "refmtp train ..."]
    shim = tmp_path / "shim" / "mpi4py"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named mpi4py')\n")
    env = {**_env(), "PYTHONPATH": os.pathsep.join([str(shim.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(_refmtp(*_args(text_file, tmp_path / "y", expert_parallel=2)),
                          capture_output=True, text=True, timeout=TIMEOUT, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and 'pip install "refmtp[mpi]"' in lines[0], proc.stderr


@pytest.mark.slow
def test_expert_parallel_on_four_ranks_rejects_then_runs(tmp_path, text_file):  # noqa: F811
    """4 ranks: --expert-parallel 2 does not match the ranks (one line, exit 2); 4 does."""
    proc = _mpi(4, _args(text_file, tmp_path / "x", expert_parallel=2))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--expert-parallel 2 shards the experts over 2 ranks; this run has 4" in proc.stderr
    proc = _mpi(4, _args(text_file, tmp_path / "ep4", expert_parallel=4, dtype="float64"))
    assert proc.returncode == 0, proc.stderr


# -------------------------------------------------------------------------------------------
# expert parallel: each rank holds its own experts (docs/distributed.md §3)
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_expert_parallel_ranks_hold_only_their_experts(tmp_path, text_file, n):  # noqa: F811
    """Every rank's parameters and AdamW moments after a few steps: the replicated tensors and
    its E/N experts, nothing of the others' (names and bytes; tests/ep_train_ranks.py)."""
    script = Path(__file__).with_name("ep_train_ranks.py")
    env = {**_env(), "PYTHONPATH": os.pathsep.join([str(script.parent.parent),
                                                    os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([MPIEXEC, "-n", str(n), sys.executable, str(script), str(text_file),
                           str(tmp_path / "run")], capture_output=True, text=True,
                          timeout=TIMEOUT, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"ok: {n} ranks"), proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("n, extra", [(2, {"eval_every": 2}),
                                      (2, {"grad_accum": 2}), (4, {"dtype": "float64"})])
def test_sharded_experts_write_the_bytes_of_replicated_experts(tmp_path, text_file, n, extra):  # noqa: F811
    """The run with every rank holding only its experts against the same run with the experts
    replicated on every rank (REFMTP_EP_REPLICATED=1, the layout before the sharding): the same
    checkpoint bytes, trainer state, metrics (evaluation included) and settings."""
    sharded, replicated = tmp_path / "sharded", tmp_path / "replicated"
    args = dict(expert_parallel=n, **extra)
    proc = _mpi(n, _args(text_file, sharded, **args))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "experts sharded" in proc.stdout
    proc = _mpi(n, _args(text_file, replicated, **args), env={"REFMTP_EP_REPLICATED": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "experts replicated" in proc.stdout
    assert_same_run(sharded, replicated)
    from refmtp.checkpoint import load_checkpoint

    load_checkpoint(sharded / "checkpoint-0000004")  # the one-process format, without MPI


@pytest.mark.slow
def test_resume_under_expert_parallel(tmp_path, text_file):  # noqa: F811
    """2 steps, then a resume to 4 (each rank reads its own experts) = 4 steps in one go."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    proc = _mpi(2, _args(text_file, whole, expert_parallel=2))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = _mpi(2, _args(text_file, resumed, steps=2, expert_parallel=2))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = _mpi(2, ["train", "--resume", str(resumed), "--steps", "4"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"resume  from {resumed / 'checkpoint-0000002'}" in proc.stdout
    assert_same_run(whole, resumed, drop=("eval_loss", "eval_acc"))


# -------------------------------------------------------------------------------------------
# refmtp launch: a killed or hung rank ends the run with one line (docs/distributed.md §2)
# -------------------------------------------------------------------------------------------
def _ranks_gone(marker: str) -> bool:
    """No process of the run is left (its --out directory is on every rank's command line)."""
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().split(b"\0")
            state = (p / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmd and b"refmtp.cli.main" in cmd and state != "Z":
            return False
    return True


def _start_and_hit(out: Path, cmd: list, rank: int, signum):
    """Start ``cmd``, wait until it has checkpointed step 2 or later, send ``signum`` to
    ``rank``: (returncode, stdout, stderr, seconds from the signal to the end, pid)."""
    from refmtp.training.rundir import latest_checkpoint

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())
    pid = None
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            ckpt = latest_checkpoint(out) if out.is_dir() else None
            if ckpt is not None and int(ckpt.name.split("-")[1]) >= 2:
                break
            assert proc.poll() is None, "the run ended before its second step"
            assert time.monotonic() < deadline, "no checkpoint of step 2 in time"
            time.sleep(0.05)
        pid = _rank_pid(str(out), rank, deadline)
        t0 = time.monotonic()
        os.kill(pid, signum)
        stdout, stderr = proc.communicate(timeout=60)
        return proc.returncode, stdout, stderr, time.monotonic() - t0, pid
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if pid is not None and signum == signal.SIGSTOP:
            try:  # never leave a stopped process behind, whatever the test found
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _launch(n, args):
    return _refmtp("launch", "-n", str(n), *args)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank through /proc")
@pytest.mark.parametrize("rank", [1, pytest.param(0, marks=pytest.mark.slow)])
def test_launch_says_in_one_line_that_a_rank_was_killed(tmp_path, text_file, rank):  # noqa: F811
    """SIGKILL one rank of `refmtp launch -n 2 train --expert-parallel 2` (a checkpoint every
    step, so the kill often lands in a save): every process ends at once, stderr has one
    `refmtp:` line naming the rank, its pid, the signal and the last checkpoint, no hydra
    banner; exit 137; the last checkpoint loads and the run resumes from it."""
    from refmtp.checkpoint import load_checkpoint
    from refmtp.training.rundir import latest_checkpoint

    out = tmp_path / "killed"
    args = _args(text_file, out, steps=100000, checkpoint_every=1, expert_parallel=2)
    code, stdout, stderr, took, pid = _start_and_hit(out, _launch(2, args), rank, signal.SIGKILL)
    assert code == 128 + signal.SIGKILL, stdout + stderr
    assert took < 30 and _ranks_gone(str(out))
    lines = [x for x in stderr.splitlines() if x.strip()]
    ckpt = latest_checkpoint(out)
    assert lines == [f"refmtp: rank {rank} (pid {pid}) was killed by signal 9 (SIGKILL); all 2 "
                     f"ranks stopped; last checkpoint: {ckpt}"], stderr
    assert "BAD TERMINATION" not in stdout + stderr and "Abort(" not in stdout + stderr
    load_checkpoint(ckpt)
    step = int(ckpt.name.split("-")[1])
    proc = _mpi(2, ["train", "--resume", str(out), "--steps", str(step + 1)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"resume  from {ckpt}" in proc.stdout


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank through /proc")
@pytest.mark.slow  # waits out the 5 s deadline
@pytest.mark.parametrize("launcher, rank", [("launch", 1), ("launch", 0),
                                            ("mpiexec", 1)])
def test_a_stopped_rank_is_found_by_the_deadline(tmp_path, text_file, launcher, rank):  # noqa: F811
    """SIGSTOP one rank (alive, but never arrives): after --rank-timeout 5 s the other rank
    names the step, the exchange and the missing rank in one line, and every rank stops
    (exit 124); under `refmtp launch` that is the only `refmtp:` line."""
    out = tmp_path / "stopped"
    args = _args(text_file, out, steps=100000, rank_timeout=5, expert_parallel=2)
    cmd = _launch(2, args) if launcher == "launch" else [MPIEXEC, "-n", "2", *_refmtp(*args)]
    code, stdout, stderr, took, pid = _start_and_hit(out, cmd, rank, signal.SIGSTOP)
    assert code == 124, stdout + stderr
    assert 5 <= took < 5 + 30
    lines = [x for x in stderr.splitlines() if x.startswith("refmtp:")]
    assert len(lines) == 1, stderr
    other = 1 - rank
    # the step's exchanges, or the check before a checkpoint when the stop lands on one
    assert lines[0].startswith((f"refmtp: rank {other} of 2: step ",
                                f"refmtp: rank {other} of 2: the checkpoint of step ")), lines
    assert f": rank {rank} has not arrived within --rank-timeout 5 s" in lines[0]
    if launcher == "launch":
        from refmtp.training.rundir import latest_checkpoint

        assert lines[0].endswith(f"all 2 ranks stopped; last checkpoint: {latest_checkpoint(out)}")
        assert [x for x in stderr.splitlines() if x.strip()] == lines  # nothing else
        assert _ranks_gone(str(out))


@pytest.mark.slow
def test_the_deadline_changes_no_bit(tmp_path, text_file, accum):  # noqa: F811
    """The exchanges poll against the deadline or wait forever (--rank-timeout 0): the same
    bits as the single process with --grad-accum 2 either way (the default deadline is on in
    every other test of this file)."""
    out = tmp_path / "nodeadline"
    proc = _mpi(2, _args(text_file, out, rank_timeout=0))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no --rank-timeout" in proc.stdout
    assert_same_run(out, accum[2])


@pytest.mark.parametrize("args, says", [
    (["launch", "-n", "2"], "name the refmtp command to run on the ranks"),
    (["launch", "-n", "2", "-f", "hosts"], "name the refmtp command to run on the ranks"),
    (["launch", "-n", "2", "launch", "-n", "2", "train"], "not another launch"),
    (["launch", "-n", "0", "train"], "'-n' / '--np'"),
    (["launch", "train"], "Missing option '-n'"),
])
def test_launch_bad_input_is_one_line(args, says):
    proc = subprocess.run(_refmtp(*args), capture_output=True, text=True, timeout=TIMEOUT, env=_env())
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], proc.stderr


def test_launch_passes_the_command_s_exit_code(tmp_path, text_file):  # noqa: F811
    """A run the ranks refuse themselves (2 ranks do not divide 3 windows): their one line, exit 2."""
    proc = subprocess.run(_launch(2, _args(text_file, tmp_path / "x", batch_size=3)),
                          capture_output=True, text=True, timeout=TIMEOUT, env=_env())
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "Error: 2 ranks x --grad-accum 1 = 2 must divide --batch-size 3 (every microbatch has "
        "the same number of windows)"]
