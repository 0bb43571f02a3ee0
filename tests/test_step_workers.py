"""train_step(..., workers=N): a process's microbatches side by side on threads, the same bits.

refmtp/training/step.py runs the slices in waves of N (forwards side by side, then backwards)
and sums the gradients in slice order, so any N must take the step of N = 1 exactly: the
parameters, the AdamW moments, the losses, the norm and the loads, and the same error when a
slice fails. docs/performance.md says why (2 cores without a second BLAS pool spinning).
"""
from __future__ import annotations

import numba
import numpy as np
import pytest
from click.testing import CliRunner

from refmtp.backends import openblas
from refmtp.backends.numba_kernels import concurrent_launch_safe, kernel_threads
from refmtp.backends.numpy_backend import NumpyBackend
from refmtp.cli.main import cli
from refmtp.config import preset
from refmtp.model import init_params
from refmtp.training import step as step_mod
from refmtp.training.optim import AdamW
from refmtp.training.step import NonFinite, train_step
from tests.test_train import assert_bit_identical, text_file  # noqa: F401 (fixture)


def _tokens(cfg, batch=4, seq=12, seed=3):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int64)


def _run(cfg, tokens, dtype, grad_accum, workers, steps=2):
    params = init_params(cfg, seed=0, backend="numpy", dtype=dtype)
    opt, seen, marks, res = AdamW(), [], [], []
    for _ in range(steps):
        res.append(train_step(params, cfg, tokens, opt, 1e-2, 0.5, grad_accum=grad_accum, workers=workers,
                              mark=marks.append,
                              on_forward=lambda out, cache: seen.append(float(out.losses["total"]))))
    return params, opt, seen, marks, res


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("grad_accum,workers", [(2, 2), (4, 3), (4, 4)])
def test_workers_take_the_bits_of_one_at_a_time(dtype, grad_accum, workers):
    cfg = preset("tiny")
    tokens = _tokens(cfg)
    p1, o1, seen1, marks1, r1 = _run(cfg, tokens, dtype, grad_accum, 1)
    pn, on, seenn, marksn, rn = _run(cfg, tokens, dtype, grad_accum, workers)
    for name in p1:
        assert p1[name].tobytes() == pn[name].tobytes(), name
    assert sorted(o1.m) == sorted(on.m)
    for name in o1.m:
        assert o1.m[name].tobytes() == on.m[name].tobytes() and o1.v[name].tobytes() == on.v[name].tobytes(), name
    assert seen1 == seenn  # on_forward saw every slice, in slice order
    for a, b in zip(r1, rn):
        assert a.losses == b.losses and a.grad_norm == b.grad_norm
        assert all(np.array_equal(a.load[k], b.load[k]) for k in a.load)
    waves = -(-grad_accum // workers)
    assert marks1 == (["forward", "backward"] * grad_accum + ["update"]) * 2
    assert marksn == (["forward", "backward"] * waves + ["update"]) * 2


def test_a_failing_slice_stops_the_step_as_it_does_alone():
    """Slice 1 of 2 holds the one token whose embedding row is inf: the same error, named the
    same way, with workers 1 and 2, and no parameter is touched."""
    cfg = preset("tiny")
    tokens = _tokens(cfg)
    bad = int(tokens[2:].reshape(-1)[0])
    tokens[:2][tokens[:2] == bad] = (bad + 1) % cfg.vocab_size  # slice 0 never sees it
    messages = []
    for workers in (1, 2):
        params = init_params(cfg, seed=0, backend="numpy", dtype="float64")
        emb = next(n for n in params if n.endswith("embed_tokens.weight"))
        params[emb] = params[emb].copy()
        params[emb][bad] = np.inf
        before = {n: a.copy() for n, a in params.items()}
        with pytest.raises(NonFinite) as info:
            train_step(params, cfg, tokens, AdamW(), 1e-2, 1.0, grad_accum=2, workers=workers)
        messages.append(str(info.value))
        assert all(np.array_equal(before[n], params[n]) for n in params)
    assert messages[0] == messages[1]


def test_worker_threads_run_the_kernels_on_refmtps_numba_threads():
    """Numba's thread count is per thread: a worker left at its default would start a pool of
    its own inside every prange kernel."""
    cfg = preset("tiny")
    train_step(init_params(cfg, seed=0, backend="numpy", dtype="float32"), cfg, _tokens(cfg), AdamW(),
               1e-2, 1.0, grad_accum=2, workers=2)
    pool = step_mod._POOLS[2]
    assert pool.submit(numba.get_num_threads).result() == kernel_threads()


def test_workers_are_one_where_the_backend_says_side_by_side_does_not_hold(monkeypatch):
    asked = []
    real = step_mod._pool
    monkeypatch.setattr(step_mod, "_pool", lambda workers, bk: asked.append(workers) or real(workers, bk))
    cfg = preset("tiny")
    tokens = _tokens(cfg)
    train_step(init_params(cfg, seed=0, backend="numpy", dtype="float64"), cfg, tokens, AdamW(), 1e-2, 1.0,
               grad_accum=2, workers=2)
    monkeypatch.setattr(NumpyBackend, "concurrent_microbatches", lambda self: False)
    train_step(init_params(cfg, seed=0, backend="numpy", dtype="float64"), cfg, tokens, AdamW(), 1e-2, 1.0,
               grad_accum=2, workers=2)
    train_step(init_params(cfg, seed=0, backend="numpy", dtype="float64"), cfg, tokens, AdamW(), 1e-2, 1.0,
               grad_accum=1, workers=2)
    assert asked == [2, 1, 1]  # more workers than slices: the slices there are


def test_the_workqueue_layer_is_not_safe_side_by_side(monkeypatch):
    monkeypatch.setattr(numba, "threading_layer", lambda: "workqueue")
    assert concurrent_launch_safe() is False
    monkeypatch.setattr(numba, "threading_layer", lambda: "omp")
    assert concurrent_launch_safe() is True

    def not_chosen():
        raise ValueError("Threading layer is not initialized.")

    monkeypatch.setattr(numba, "threading_layer", not_chosen)
    monkeypatch.setattr(numba.config, "THREADING_LAYER", "workqueue")
    assert concurrent_launch_safe() is False


def _train(out, text, *extra):
    args = ["train", "--preset", "tiny", "--data", str(text), "--steps", "2", "--batch-size", "4",
            "--seq-len", "16", "--eval-every", "0", "--out", str(out), *extra]
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_cli_workers_train_the_same_run(tmp_path, text_file):  # noqa: F811
    blas = openblas.threads()
    try:
        one = _train(tmp_path / "one", text_file, "--grad-accum", "2")
        two = _train(tmp_path / "two", text_file, "--grad-accum", "2", "--workers", "2")
    finally:
        openblas.threads(blas)  # the CLI gave each worker its share of OpenBLAS's threads
    assert one.exit_code == 0 and two.exit_code == 0, one.output + two.output
    assert "workers 2 of this process's 2 microbatch(es) side by side" in two.output
    assert_bit_identical(tmp_path / "one", tmp_path / "two")


def test_cli_workers_need_as_many_microbatches(tmp_path, text_file):  # noqa: F811
    r = CliRunner().invoke(cli, ["train", "--preset", "tiny", "--data", str(text_file), "--steps", "2",
                                 "--workers", "2", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and not (tmp_path / "x").exists()
    assert r.output.strip().splitlines()[-1] == (
        "Error: --workers 2 runs microbatches side by side: give --grad-accum 2 or more (now 1)")


def test_side_by_side_workers_rule():
    """The one rule the step and the trainer's description share: at most the slices there are,
    1 under expert parallelism or where the backend refuses."""
    bk = NumpyBackend()
    assert step_mod.side_by_side_workers(2, 4, bk, False) == 2
    assert step_mod.side_by_side_workers(4, 2, bk, False) == 2
    assert step_mod.side_by_side_workers(2, 4, bk, True) == 1
    assert step_mod.side_by_side_workers(1, 4, bk, False) == 1
