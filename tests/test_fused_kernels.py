"""The fused kernels of issue 17 (backends/numba_attention.py, numba_swiglu.py,
numba_rmsnorm.py, numba_adamw.py): the compiled loops against their ``py_func``, results that do
not depend on Numba's thread count, and a whole training step with kernels on against the plain
array path (REFMTP_KERNELS=0). Parity with the references is tests/test_kernel_parity.py."""
from __future__ import annotations

import numba
import numpy as np
import pytest

from refmtp.backends import (get_backend, numba_adamw, numba_attention, numba_expf, numba_rmsnorm,
                             numba_swiglu, numba_xent, set_kernels_enabled)
from refmtp.config import preset
from refmtp.model import init_params
from refmtp.training.optim import AdamW
from refmtp.training.step import train_step


class _returned_total:
    """A loop that returns a float, adapted to the harness: the total is written into out[0]."""

    def __init__(self, fn):
        self.fn = fn
        self.py_func = _returned_total(fn.py_func) if hasattr(fn, "py_func") else None

    def __call__(self, g, out):
        from refmtp.backends.numba_expf import LANES

        out[0] = self.fn(g, np.empty(LANES))


def _loops():
    """(name, compiled loop, args builder(dtype) -> inputs + zeroed outputs, bit-exact with py_func?)"""
    rng = np.random.default_rng(5)

    def softmax(dt):  # R = 3 (batch x heads), query rows 2..6 of T = 7 behind a cache of 4: L = S = 11
        s = (rng.standard_normal((3, 5, 11)) * 3).astype(dt)
        return (s, dt(0.7), np.int64(2), np.int64(4), np.empty((3, 7, 11), dt))

    def softmax_bwd(dt):
        p, dp = rng.random((3, 7, 11)).astype(dt), rng.standard_normal((3, 5, 11)).astype(dt)
        return (p, dp, np.int64(2), np.int64(4), np.empty_like(p))

    def gate(dt):
        ab = (rng.standard_normal((9, 10)) * 3).astype(dt)
        return (ab, dt(1), np.empty((9, 5), dt), np.empty((9, 5), dt))

    def gate_bwd(dt):
        dh, ab, sig = rng.standard_normal((9, 5)).astype(dt), rng.standard_normal((9, 10)).astype(dt), rng.random((9, 5)).astype(dt)
        return (dh, ab, sig, dt(1), np.empty_like(ab))

    def rms(dt):  # 70 rows: two prange chunks; 37 columns: two 16-lane rounds and a tail
        x, w = rng.standard_normal((70, 37)).astype(dt), rng.standard_normal(37).astype(dt)
        return (x, w, dt(1e-6), dt(37), dt(1), np.empty_like(x), np.empty((70, 1), dt))

    def rms_bwd(dt):
        d, x, w = rng.standard_normal((70, 37)).astype(dt), rng.standard_normal((70, 37)).astype(dt), rng.standard_normal(37).astype(dt)
        r = rng.random((70, 1)).astype(dt) + dt(0.5)
        return (d, x, w, r, dt(37), np.empty_like(x), np.empty(37, dt))

    def sumsq(dt):  # three chunks, the last one short; the total comes back in a 1-element array
        return (rng.standard_normal(2 * numba_adamw.CHUNK + 5).astype(dt), np.empty(1, np.float64))

    def xent(dt):  # 5 rows (one ignored), 37 classes: two 16-lane rounds and a tail
        z = (rng.standard_normal((5, 37)) * 4).astype(dt)
        t = np.array([3, -100, 0, 36, 17], np.int64)
        return (z, t, np.int64(-100), np.empty(5, dt), np.empty(5, dt))

    def xent_bwd(dt):
        z = (rng.standard_normal((5, 37)) * 4).astype(dt)
        t = np.array([3, -100, 0, 36, 17], np.int64)
        lse = np.log(np.exp(z.astype(np.float64)).sum(-1)).astype(dt)
        return (rng.standard_normal(5).astype(dt), z, t, lse, np.int64(-100), np.empty_like(z))

    def adamw(dt):
        p, g, m = (rng.standard_normal(50).astype(dt) for _ in range(3))
        v = rng.random(50).astype(dt)
        scal = tuple(dt(c) for c in (0.9997, 3e-4, 0.9, 0.1, 0.95, 0.05, 0.271, 0.142, 1e-8, 0.37))
        return (p, g, m, v) + scal + tuple(np.empty_like(p) for _ in range(3))

    return [
        ("softmax_rows_f32", numba_attention.softmax_rows_f32_numba, softmax, True),  # float32 only
        ("softmax_rows_f64", numba_attention.softmax_rows_f64_numba, softmax, False),  # float64 only
        ("softmax_backward_rows", numba_attention.softmax_backward_rows_numba, softmax_bwd, True),
        ("swiglu_gate", numba_swiglu.swiglu_gate_numba, gate, False),
        ("swiglu_gate_f32", numba_swiglu.swiglu_gate_f32_numba, gate, True),  # float32 only
        ("swiglu_gate_backward", numba_swiglu.swiglu_gate_backward_numba, gate_bwd, True),
        ("rmsnorm_rows", numba_rmsnorm.rmsnorm_rows_numba, rms, True),
        ("rmsnorm_rows_backward", numba_rmsnorm.rmsnorm_rows_backward_numba, rms_bwd, True),
        ("xent_forward_f32", numba_xent.xent_forward_f32_numba, xent, True),  # float32 only
        ("xent_backward_f32", numba_xent.xent_backward_f32_numba, xent_bwd, True),  # float32 only
        ("adamw_update", numba_adamw.adamw_update_numba, adamw, True),
        ("sum_squares", _returned_total(numba_adamw.sum_squares_numba), sumsq, True),
    ]


LOOPS = _loops()
ONE_DTYPE = {"xent_forward_f32": np.float32, "xent_backward_f32": np.float32, "swiglu_gate_f32": np.float32, "softmax_rows_f32": np.float32, "softmax_rows_f64": np.float64}  # loops written for one dtype


def _copies(args):
    """Fresh copies of the array arguments (some loops overwrite an input: softmax_rows_f32's s)."""
    return [a.copy() if isinstance(a, np.ndarray) else a for a in args]


N_OUT = {"swiglu_gate_f32": 2, "softmax_rows_f32": 1, "softmax_rows_f64": 1, "softmax_backward_rows": 1, "swiglu_gate": 2, "swiglu_gate_backward": 1,
         "rmsnorm_rows": 2, "rmsnorm_rows_backward": 2, "xent_forward_f32": 2, "xent_backward_f32": 1, "adamw_update": 3, "sum_squares": 1}  # trailing output arrays


@pytest.mark.parametrize("name,fn,build,exact,dt", [
    pytest.param(*loop, dt, id=f"{loop[0]}-{np.dtype(dt).name}") for loop in LOOPS for dt in (np.float32, np.float64)
    if ONE_DTYPE.get(loop[0], dt) == dt])
def test_compiled_loop_matches_py_func(name, fn, build, exact, dt):
    args = build(dt)
    n_out = N_OUT[name]
    ins = args[:-n_out]
    a_out = [np.zeros_like(o) for o in args[-n_out:]]
    b_out = [np.zeros_like(o) for o in args[-n_out:]]
    fn(*_copies(ins), *a_out)
    fn.py_func(*_copies(ins), *b_out)
    for a, b in zip(a_out, b_out):
        assert a.dtype in (dt, np.float64)  # sum_squares accumulates in float64 whatever dt
        if exact or dt == np.float64:
            np.testing.assert_array_equal(a, b, err_msg=name)
        else:  # float32 exp: the compiled expf vs Python's float64 exp rounded once
            np.testing.assert_allclose(a, b, rtol=3e-7, atol=3e-7, err_msg=name)


@pytest.mark.parametrize("name,fn,build,exact", LOOPS, ids=[x[0] for x in LOOPS])
def test_result_does_not_depend_on_thread_count(name, fn, build, exact):
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("Numba sees one CPU: no second thread to compare with")
    args = build(ONE_DTYPE.get(name, np.float32))
    prev = numba.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            numba.set_num_threads(n)
            fresh = _copies(args)  # outputs written in place
            fn(*fresh)
            runs.append(fresh)
    finally:
        numba.set_num_threads(prev)
    for a, b in zip(*runs):
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b, err_msg=name)


def test_training_step_kernels_on_matches_plain_path():
    """Three tiny-preset steps (float64) with every kernel on and with REFMTP_KERNELS=0's plain path:
    the losses and weights agree to rounding."""
    cfg = preset("tiny")
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 17)).astype(np.int64)
    runs = []
    for on in (True, False):
        prev = set_kernels_enabled(on)
        try:
            params = init_params(cfg, seed=1, backend="numpy", dtype="float64")
            opt = AdamW()
            losses = [train_step(params, cfg, get_backend("numpy").asarray(tokens), opt, 1e-3, 1.0).losses["total"]
                      for _ in range(3)]
        finally:
            set_kernels_enabled(prev)
        runs.append((losses, params))
    (l_on, p_on), (l_off, p_off) = runs
    np.testing.assert_allclose(l_on, l_off, rtol=1e-12)
    for name in p_on:
        np.testing.assert_allclose(p_on[name], p_off[name], rtol=1e-9, atol=1e-12, err_msg=name)


def test_vectorised_expf_error_and_clamps():
    """backends/numba_expf.py: <= 1.5 ulp against float64 exp over [-87, 88] (dense grid and random
    points), exact at 0, the stated clamps beyond, NaN kept."""
    from refmtp.backends.numba_expf import X_MAX, X_MIN, expf_rows

    rng = np.random.default_rng(3)
    x = np.concatenate([np.linspace(X_MIN, X_MAX, 400_001, dtype=np.float32),
                        rng.uniform(-87, 88, 200_000).astype(np.float32), np.float32([0.0, -0.0, 1.0, -1.0])])
    got = expf_rows(x).astype(np.float64)
    want = np.exp(x.astype(np.float64))
    ulp = np.spacing(want.astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(got - want) / ulp) <= 1.5
    assert expf_rows(np.float32([0.0]))[0] == 1.0
    lo, hi = expf_rows(np.float32([-200.0, 200.0]))
    assert lo == expf_rows(np.float32([X_MIN]))[0] and 0 < lo < 1.7e-38
    assert hi == expf_rows(np.float32([X_MAX]))[0] and np.isfinite(hi)
    assert np.isnan(expf_rows(np.float32([np.nan]))[0])


def test_expf32_bitcast_equals_two_pass_product():
    """expf32 (2^k by a register bitcast) gives the bits of e^f times the 2^k stored through an
    int32 view and multiplied in a second pass, clamps, subnormal-range inputs and NaN included."""
    from refmtp.backends.numba_expf import X_MAX, X_MIN, expf_rows, expf_rows_two_pass

    rng = np.random.default_rng(4)
    x = np.concatenate([np.linspace(X_MIN - 5, X_MAX + 5, 100_001, dtype=np.float32),
                        rng.standard_normal(50_000).astype(np.float32) * 30,
                        np.float32([0.0, -0.0, np.nan, np.inf, -np.inf, 1e-30, -1e-30])])
    np.testing.assert_array_equal(expf_rows(x).view(np.int32), expf_rows_two_pass(x).view(np.int32))



@numba.njit
def _row_max(row, n):
    return numba_expf.row_max_f32(row.view(np.int32), n, np.empty(1, np.float32))


@numba.njit
def _dot_total(a, b, n):
    return numba_expf.dot_total(np.empty(numba_expf.LANES, a.dtype), a, b, n)


@numba.njit
def _row_total_of_products(a, b, n):
    prod = a[:n] * b[:n]
    return numba_expf.row_total(np.empty(numba_expf.LANES, a.dtype), prod, n)


def test_row_max_f32_is_numpy_max_on_edge_values():
    """The max through int32 keys: exact on negatives, +-0, +-inf and subnormals; NaN wins."""
    rng = np.random.default_rng(3)
    for n in list(range(1, 40)) + [255, 256, 257]:
        row = (rng.standard_normal(n) * 10 - 5).astype(np.float32)
        assert _row_max(row, n) == row.max(), n
    edge = np.array([-0.0, 0.0, -np.inf, np.inf, 1e-45, -1e-45, -3.4e38, 3.4e38], np.float32)
    for i in range(1, len(edge) + 1):
        assert _row_max(edge[:i], i) == edge[:i].max()
    assert np.signbit(_row_max(np.array([-0.0], np.float32), 1))
    assert _row_max(np.array([-np.inf, -np.inf], np.float32), 2) == -np.inf
    assert np.isnan(_row_max(np.array([1.0, np.nan, 2.0], np.float32), 3))
    assert _row_max(np.array([5.0, 7.0, 9.0], np.float32), 2) == 7.0  # only row[:n]


@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_dot_total_is_row_total_of_the_rounded_products(dt):
    rng = np.random.default_rng(4)
    for n in (0, 1, 15, 16, 17, 37, 256):
        a, b = rng.standard_normal(n + 3).astype(dt), rng.standard_normal(n + 3).astype(dt)
        assert _dot_total(a, b, n) == _row_total_of_products(a, b, n), n


@numba.njit(cache=True)  # three dtype pairs x two layouts: compiled once, not every run
def _lane_totals(acc, x):
    """Row and column sums and dot products of x (R, n) by the vector lanes (the columns are
    strided rows) and by the reference loops, in acc's dtype."""
    R, n = x.shape
    out = np.zeros((6, max(R, n)), acc.dtype)
    for r in range(R):
        out[0, r] = numba_expf.row_total(acc, x[r], n)
        out[1, r] = numba_expf.row_total_loop(acc, x[r], n)
        out[2, r] = numba_expf.dot_total(acc, x[r], x[R - 1 - r], n)
        out[3, r] = numba_expf.dot_total_loop(acc, x[r], x[R - 1 - r], n)
    for c in range(n):
        out[4, c] = numba_expf.row_total(acc, x[:, c], R)
        out[5, c] = numba_expf.row_total_loop(acc, x[:, c], R)
    return out


@pytest.mark.parametrize("dt,acc_dt", [(np.float32, np.float32), (np.float64, np.float64), (np.float32, np.float64)])
def test_vector_lanes_give_the_loops_bits(dt, acc_dt):
    """row_total / dot_total (one LLVM vector of 16 lanes) against the plain loops over an acc
    array: the same bits, with inf, nan and signed zeros in rows, strided rows, rows shorter
    than the 16 lanes and lanes wider than the row (float64 sums of float32 rows)."""
    rng = np.random.default_rng(9)
    for n in (0, 1, 15, 16, 17, 31, 48, 63, 256, 1000):
        R = 37
        x = (rng.standard_normal((R, n)) * 10.0 ** rng.uniform(-6, 6, (R, 1))).astype(dt)
        if n >= 3:
            x[0, 2], x[1, 1], x[2], x[3, :2] = np.inf, np.nan, -0.0, (-np.inf, np.inf)
            x[4, :2] = (3e38, 3e38)  # overflows a float32 lane, not a float64 one
        out = _lane_totals(np.empty(numba_expf.LANES, acc_dt), x)
        for got, ref, m, what in ((0, 1, R, "row_total"), (2, 3, R, "dot_total"), (4, 5, n, "row_total, strided")):
            g, r = out[got, :m], out[ref, :m]
            assert np.array_equal(g, r, equal_nan=True) and np.array_equal(np.signbit(g), np.signbit(r)), (what, n)
    if n >= 3:
        assert out[0, 2] == 0 and not np.signbit(out[0, 2])  # lanes start at +0.0, as the loops' do
        assert np.isnan(out[0, 1]) and out[0, 0] == np.inf  # the nan row, the inf row


@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_wide_squares_lanes_give_the_loops_bits(dt):
    """wide_squares_total (the sum of squares' lanes, float64 squares of float32 rows) against
    its plain loop, on rows with inf, nan, huge and tiny values and on a strided row."""
    rng = np.random.default_rng(10)
    acc = np.empty(numba_expf.LANES, np.float64)
    for n in (0, 16, 48, 256, 4096):
        row = (rng.standard_normal(n + 7) * 10.0 ** rng.uniform(-30, 30, n + 7)).astype(dt)
        if n:
            row[3] = 3e38 if dt == np.float32 else 1e200  # its square overflows a float32 lane
        for r in (row, row[::-1], np.repeat(row, 2)[::2]):
            got = numba_expf.wide_squares_total(acc, r, 0, n)
            with np.errstate(over="ignore"):  # the overflowing square, on purpose
                assert got == numba_expf.wide_squares_total_loop(acc.copy(), r, 0, n), n
    row[5] = np.nan
    assert np.isnan(numba_expf.wide_squares_total(acc, row, 0, 16))


@pytest.mark.parametrize("dt", [np.float32, np.float64])
@pytest.mark.parametrize("B,H,T,start", [(2, 5, 70, 0), (1, 3, 130, 0), (2, 4, 33, 19), (2, 3, 20, 5)])
def test_attention_backward_bits_do_not_depend_on_the_head_chunk(monkeypatch, dt, B, H, T, start):
    """The backward runs one (batch row, head chunk) at a time with a reused ds scratch; every
    product is the one a whole-batch loop takes, so any chunk size gives the same bits, and the
    same bits as the plain loop that forms the whole ds first (written out here)."""
    rng = np.random.default_rng(B * 100 + T + start)
    S = start + T
    q = (rng.standard_normal((B, H, T, 12)) * 3).astype(dt)
    k, v = rng.standard_normal((B, H, S, 12)).astype(dt), rng.standard_normal((B, H, S, 8)).astype(dt)
    do = rng.standard_normal((B, H, T, 8)).astype(dt)
    _, p = numba_attention.causal_attention(q, k, v, 0.3, start)
    # the whole-ds form: all query blocks of every (b, chunk) first, then all key blocks
    ds = np.zeros((B, H, T, S), dt)
    dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
    for i0, i1, L in numba_attention.query_blocks(T, start):
        for b in range(B):
            vT = numba_attention._transposed(v[b], T)  # the kernel's operand: a copy from 32 rows, else a view
            dp = np.ascontiguousarray(do[b, :, i0:i1] @ vT[:, :, :L])
            numba_attention.softmax_backward_rows_numba(p[b], dp, np.int64(i0), np.int64(start), ds[b])
            np.matmul(ds[b, :, i0:i1, :L], k[b, :, :L], out=dq[b, :, i0:i1])
    for j0, j1, t0 in numba_attention.key_blocks(T, start):
        np.matmul(np.swapaxes(p[:, :, t0:, j0:j1], -1, -2), do[:, :, t0:], out=dv[:, :, j0:j1])
        np.matmul(np.swapaxes(ds[:, :, t0:, j0:j1], -1, -2), q[:, :, t0:], out=dk[:, :, j0:j1])
    whole = (dq * dt(0.3), dk * dt(0.3), dv)
    for chunk in (1, 2, H):
        monkeypatch.setattr(numba_attention, "HEADS_PER_CHUNK", chunk)
        got = numba_attention.causal_attention_backward(do, q, k, v, p, 0.3, start)
        for name, a, b in zip(("dq", "dk", "dv"), got, whole):
            assert np.array_equal(a, b), f"{name} differs with {chunk} heads per chunk"
