"""One parity harness for every kernel of every backend against its plain array reference.

``TABLE`` maps each registered kernel name (``Backend.kernel(name)``) to its reference in
``refmtp/`` (same signature), a generator of inputs (random data plus edge shapes: empty,
a single element, odd sizes, experts with no tokens, every token on one expert, ...) and the
comparison rule: outputs listed in ``exact`` must be bit-identical to the reference (the kernel
does the same IEEE operations in the same order); the others must agree to the stated rounding
bound (a reduction summed in another order). Every case runs on the Numba kernels (numpy
backend) and, under the gpu marker, on the CuPy RawKernels (skipped with the reason when cupy or
a GPU is missing). ``test_table_covers_every_registered_kernel`` fails when a kernel is
registered without a parity entry.

``BAD`` lists inputs that the kernel's argument contract (refmtp.backends.contracts) rejects:
every backend's wrapper must raise the same one-line error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest

from refmtp.backends import cupy_table, get_backend, numba_kernels
from refmtp.backends.base import topk_ref
from refmtp.inference.acceptance import verify_drafts_batch_ref
from refmtp.model.moe import (moe_combine_backward_ref, moe_combine_ref, moe_dispatch_plan_ref,
                              moe_permute_backward_ref, moe_permute_ref)
from refmtp.model.ops.attention import causal_attention_backward_ref, causal_attention_ref
from refmtp.model.ops.rmsnorm import rmsnorm_rows_backward_ref, rmsnorm_rows_ref
from refmtp.model.ops.rope import rope_apply_ref
from refmtp.model.ops.swiglu import swiglu_gate_backward_ref, swiglu_gate_ref
from refmtp.training.optim import adamw_update_ref, sum_squares_ref
from refmtp.model.ops.xent import xent_backward_ref, xent_forward_ref
from tests.conftest import BACKEND_PARAMS
from tests.test_accept_kernels import random_batch

DTYPES = (np.float32, np.float64)
# rounding bounds of the outputs that are not bit-exact (reductions in another order)
XENT_TOL = {np.float32: 2e-5, np.float64: 1e-13}
DWEIGHT_TOL = {np.float32: 2e-6, np.float64: 1e-13}
ROWSUM_TOL = {np.float32: 1e-5, np.float64: 1e-13}  # a row sum left to right vs numpy's pairwise sum
EXP_TOL = {np.float32: 1e-6, np.float64: 1e-14}  # exp from another libm (a few ulp)
# attention: sums over up to a few hundred keys in another order, on outputs of size ~1
ATTENTION_TOL = {np.float32: 1e-5, np.float64: 1e-13}
# Kernels of the numpy backend only (issue 17's CPU speed levers: fused elementwise tails). On
# cupy these names have no kernel and the plain array path runs; the GPU has no twin to check.
CPU_ONLY = frozenset({"causal_attention", "causal_attention_backward", "swiglu_gate", "swiglu_gate_backward",
                      "rmsnorm_rows", "rmsnorm_rows_backward", "adamw_update", "sum_squares", "topk"})


@dataclass(frozen=True)
class Entry:
    ref: Callable
    cases: Callable[[], list]  # -> [(case id, args tuple of host arrays / scalars / None)]
    exact: tuple  # indices of the outputs that must be bit-identical
    tol: dict = field(default_factory=dict)  # {output index: {dtype: bound}} for the others
    why: str = ""  # why an output is not bit-exact


def _outputs(out) -> tuple:
    return tuple(out) if isinstance(out, tuple) or hasattr(out, "_fields") else (out,)


# ------------------------------------------------------------------------------------------
# input generators
# ------------------------------------------------------------------------------------------
ROPE_SHAPES = [(1, 2), (1, 1, 2), (3, 7, 6), (2, 3, 5, 8), (4, 1, 64), (2, 0, 4), (0, 3, 4), (5, 1, 2)]


def rope_cases():
    out = []
    for shape in ROPE_SHAPES:
        for dt in DTYPES:
            rng = np.random.default_rng(sum(shape) + 7)
            x = rng.standard_normal(shape).astype(dt)
            T, half = shape[-2], shape[-1] // 2
            ang = rng.uniform(-50, 50, size=(T, half))
            cos, sin = np.cos(ang).astype(dt), np.sin(ang).astype(dt)
            tag = f"{'x'.join(map(str, shape))}-{np.dtype(dt).name}"
            out.append((tag, (x, cos, sin)))
            out.append((tag + "-backward", (x, cos, -sin)))  # the backward passes -sin
    return out


XENT_SHAPES = [(0, 5), (1, 1), (1, 7), (5, 3), (33, 257), (4, 2)]


def _xent_data(N, V, dt, seed):
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((N, V)) * 4).astype(dt)
    t = rng.integers(0, V, size=N).astype(np.int64)
    if N > 2:
        t[1] = -100  # an ignored row
    if (N, V) == (4, 2):
        t[:] = -100  # every row ignored
    d = rng.standard_normal(N).astype(dt)
    return z, t, d


def xent_forward_cases():
    return [(f"{N}x{V}-{np.dtype(dt).name}", _xent_data(N, V, dt, N + V)[:2] + (-100,))
            for N, V in XENT_SHAPES for dt in DTYPES]


def xent_backward_cases():
    out = []
    for N, V in XENT_SHAPES:
        for dt in DTYPES:
            z, t, d = _xent_data(N, V, dt, 3 * N + V)
            _, lse = xent_forward_ref(z, t)
            out.append((f"{N}x{V}-{np.dtype(dt).name}", (d, z, t, lse, -100)))
    return out


# (N, K, E, d, kind): "random" | "unused" (expert E-1 never chosen) | "one" (every token's first
# choice on expert 0; with K = 1 all tokens on one expert)
MOE_CASES = [
    (0, 2, 4, 3, "random"),  # no tokens at all
    (1, 1, 4, 3, "random"),  # a single token, top-1
    (1, 3, 5, 2, "random"),  # a single token, several experts
    (7, 2, 5, 3, "unused"),  # an expert with no tokens
    (13, 1, 6, 5, "one"),  # every token on one expert
    (9, 3, 4, 7, "one"),
    (257, 2, 8, 33, "random"),  # not a multiple of a 256-thread block
    (64, 4, 16, 8, "unused"),
    (5, 2, 3, 1, "random"),  # d = 1
]


def _moe_data(N, K, E, d, kind, dt, seed):
    rng = np.random.default_rng(seed)
    if kind == "random":
        idx = [rng.permutation(E)[:K] for _ in range(N)]
    elif kind == "unused":
        idx = [rng.permutation(E - 1)[:K] for _ in range(N)]
    else:
        idx = [np.concatenate([[0], 1 + rng.permutation(E - 1)[:K - 1]]) for _ in range(N)]
    idx = np.array(idx, dtype=np.int64).reshape(N, K)
    order, _ = moe_dispatch_plan_ref(idx, E)
    S = N * K
    return dict(idx=idx, order=order, x=rng.standard_normal((N, d)).astype(dt),
                w=rng.standard_normal((N, K)).astype(dt), ys=rng.standard_normal((S, d)).astype(dt),
                dy=rng.standard_normal((N, d)).astype(dt))


def _moe_cases(build, min_tokens=0):
    out = []
    for i, (N, K, E, d, kind) in enumerate(MOE_CASES):
        if N < min_tokens:
            continue
        for dt in DTYPES:
            c = _moe_data(N, K, E, d, kind, dt, seed=i)
            out.append((f"N{N}-K{K}-E{E}-d{d}-{kind}-{np.dtype(dt).name}", build(c, N, K, E)))
    return out


def accept_cases():
    specs = [  # (id, N, K, V, one_hot, dtype, q_dtype, logits)
        ("empty", 0, 2, 3, False, np.float64, None, True),
        ("k0-bonus-only", 8, 0, 5, False, np.float64, None, True),
        ("v1", 16, 1, 1, False, np.float64, None, True),
        ("single", 1, 3, 7, False, np.float64, None, True),
        ("one-hot", 40, 3, 7, True, np.float32, None, False),
        ("f32", 40, 2, 9, False, np.float32, None, True),
        ("f32-p-f64-q", 24, 2, 6, False, np.float32, np.float64, True),
        ("odd", 129, 4, 33, False, np.float64, None, False),
    ]
    out = []
    for i, (tag, N, K, V, one_hot, dt, qdt, logits) in enumerate(specs):
        args = random_batch(500 + i, N, K, V, one_hot=one_hot, dtype=dt, q_dtype=qdt, logits=logits)
        out.append((tag, args))
    return out


# (B, H, T, start): one query row over a long cache, several rows with and without a cache,
# an empty batch, a single score, T over several query blocks (64) with and without a cache
ATTENTION_SHAPES = [(1, 1, 1, 0), (2, 3, 5, 4), (2, 4, 64, 0), (1, 2, 1, 6), (0, 2, 3, 0), (3, 1, 7, 0),
                    (1, 1, 33, 9), (2, 2, 150, 0), (1, 2, 130, 37), (2, 2, 31, 0), (1, 3, 32, 5)]
# (T = 31 and 32: either side of numba_attention.TRANSPOSE_FROM_ROWS, the view and the copy of k^T, v^T)


def _attention_data(B, H, T, start, dt, seed):
    """q, k, v, dout with logits of a few units (q scaled by 3), as in a trained model."""
    rng = np.random.default_rng(seed)
    S = start + T
    q = (rng.standard_normal((B, H, T, 24)) * 3).astype(dt)
    k, v = rng.standard_normal((B, H, S, 24)).astype(dt), rng.standard_normal((B, H, S, 16)).astype(dt)
    return q, k, v, rng.standard_normal((B, H, T, 16)).astype(dt)


def _attention_views(q, k, v, do):
    """The same values in MLA's layouts: v and dout as heads of permuted (B, T, H, D) arrays
    (unit inner stride, row stride H * D), k's last 8 columns a broadcast shared part, and q read
    through a reversed last axis (a stride BLAS cannot take: the kernel copies it)."""
    def heads(a):  # (B, H, T, D) values, stored (B, T, H, D + 5) and viewed back
        B, H, T, D = a.shape
        store = np.zeros((B, T, H, D + 5), a.dtype)
        store[..., :D] = np.transpose(a, (0, 2, 1, 3))
        return np.transpose(store, (0, 2, 1, 3))[..., :D]
    k = k.copy()
    k[..., 16:] = k[:, :1, :, 16:]  # one shared part for all heads, as k_pe
    k_view = np.concatenate([k[..., :16], np.broadcast_to(k[:, :1, :, 16:], k[..., 16:].shape)], axis=-1)
    q_rev = np.ascontiguousarray(q[..., ::-1])[..., ::-1]
    return q_rev, k_view, heads(v), heads(do)


def causal_attention_cases():
    out = [(f"{B}x{H}x{T}-start{st}-{np.dtype(dt).name}", _attention_data(B, H, T, st, dt, B + T + st)[:3] + (0.2, st))
           for B, H, T, st in ATTENTION_SHAPES for dt in DTYPES]
    for dt in DTYPES:  # strided views (MLA's layouts)
        q, k, v, _ = _attention_views(*_attention_data(2, 3, 70, 0, dt, 11))
        out.append((f"views-2x3x70-{np.dtype(dt).name}", (q, k, v, 0.2, 0)))
    return out


def causal_attention_backward_cases():
    out = []
    for B, H, T, st in ATTENTION_SHAPES:
        for dt in DTYPES:
            q, k, v, do = _attention_data(B, H, T, st, dt, 2 * B + T + st)
            _, p = causal_attention_ref(q, k, v, 0.2, st)
            out.append((f"{B}x{H}x{T}-start{st}-{np.dtype(dt).name}", (do, q, k, v, p, 0.2, st)))
    for dt in DTYPES:  # strided views (MLA's layouts)
        q, k, v, do = _attention_views(*_attention_data(2, 3, 70, 0, dt, 12))
        _, p = causal_attention_ref(q, k, v, 0.2, 0)
        out.append((f"views-2x3x70-{np.dtype(dt).name}", (do, q, k, v, p, 0.2, 0)))
    return out


SWIGLU_SHAPES = [(0, 4), (1, 1), (7, 5), (512, 128), (33, 3)]  # (N, I); ab is (N, 2I)


def _swiglu_data(N, I, dt, seed):
    rng = np.random.default_rng(seed)
    ab = (rng.standard_normal((N, 2 * I)) * 3).astype(dt)
    return ab, rng.standard_normal((N, I)).astype(dt)


def swiglu_gate_cases():
    return [(f"{N}x{I}-{np.dtype(dt).name}", (_swiglu_data(N, I, dt, N + I)[0],))
            for N, I in SWIGLU_SHAPES for dt in DTYPES]


def swiglu_gate_backward_cases():
    out = []
    for N, I in SWIGLU_SHAPES:
        for dt in DTYPES:
            ab, dh = _swiglu_data(N, I, dt, 3 * N + I)
            sig, _ = swiglu_gate_ref(ab)
            out.append((f"{N}x{I}-{np.dtype(dt).name}", (dh, ab, sig)))
    return out


RMSNORM_SHAPES = [(0, 4), (1, 1), (5, 7), (2, 3, 33), (64, 256)]


def _rmsnorm_data(shape, dt, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dt)
    w = (1 + 0.1 * rng.standard_normal(shape[-1])).astype(dt)
    return x, w, rng.standard_normal(shape).astype(dt)


def rmsnorm_rows_cases():
    return [(f"{'x'.join(map(str, sh))}-{np.dtype(dt).name}", _rmsnorm_data(sh, dt, sum(sh))[:2] + (1e-6,))
            for sh in RMSNORM_SHAPES for dt in DTYPES]


def rmsnorm_rows_backward_cases():
    out = []
    for sh in RMSNORM_SHAPES:
        for dt in DTYPES:
            x, w, dout = _rmsnorm_data(sh, dt, 2 * sum(sh))
            _, rstd = rmsnorm_rows_ref(x, w, 1e-6)
            out.append((f"{'x'.join(map(str, sh))}-{np.dtype(dt).name}", (dout, x, w, rstd)))
    for dt in DTYPES:  # a column of -0.0 products: numpy's column sum starts from +0.0 (so +0.0)
        x, w, dout = _rmsnorm_data((3, 5), dt, 7)
        dout[:, 1] = 0.0  # column 1: every dout * n is -0.0 (x < 0), so is their sum
        x[:, 1] = -1.0
        _, rstd = rmsnorm_rows_ref(x, w, 1e-6)
        out.append((f"signed-zeros-{np.dtype(dt).name}", (dout, x, w, rstd)))
    return out


ADAMW_SHAPES = [(0,), (1,), (7, 5), (3, 4, 2), (4096,)]


def sum_squares_cases():
    """empty, one element, under one 4096-element chunk, across chunks, 2-D; both dtypes"""
    out = []
    for i, sh in enumerate([(0,), (1,), (17,), (4096,), (4097,), (3, 5000), (40000,)]):
        for dt in DTYPES:
            g = (np.random.default_rng(70 + i).standard_normal(sh) * 10).astype(dt)
            out.append((f"{'x'.join(map(str, sh))}-{np.dtype(dt).name}", (g,)))
    return out


def adamw_update_cases():
    out = []
    for i, sh in enumerate(ADAMW_SHAPES):
        for dt in DTYPES:
            rng = np.random.default_rng(40 + i)
            p, g, m = (rng.standard_normal(sh).astype(dt) for _ in range(3))
            v = np.abs(rng.standard_normal(sh)).astype(dt) * 1e-3
            for t, wd, gs in ((1, 0.1, 1.0), (7, 0.0, 1.0), (3, 0.1, 0.37)):  # first step, later, clipped
                bc1, bc2 = 1 - 0.9 ** t, 1 - 0.95 ** t
                out.append((f"{'x'.join(map(str, sh))}-t{t}-gs{gs}-{np.dtype(dt).name}",
                            (p, g, m, v, 3e-4, wd, 0.9, 0.95, 1e-8, bc1, bc2, gs)))
    return out


def topk_cases():
    """router shapes (tokens x experts, tokens x groups x experts-per-group), k = 1 and k = n, ties
    (repeated values, -0.0 beside 0.0), -inf rows (a masked group), +inf, one element, no rows."""
    out = []
    for i, (sh, k) in enumerate([((7, 8), 2), ((5, 2, 4), 2), ((6, 4), 1), ((3, 5), 5), ((1, 1), 1), ((0, 6), 3),
                                 ((33, 256), 8), ((4, 9), 3)]):
        for dt in DTYPES:
            rng = np.random.default_rng(90 + i)
            x = rng.standard_normal(sh).astype(dt)
            if sh == (4, 9):
                x[0] = 1.5  # a whole row of ties
                x[1, ::2] = -np.inf  # masked experts among kept ones
                x[2, :] = -np.inf  # every expert masked
                x[3, :4] = (0.0, -0.0, 0.0, -0.0)
                x[3, 4:] = -1.0
                x[3, 7] = np.inf
            if sh == (7, 8):
                x[:, 3] = x[:, 5]  # equal scores on two experts
            out.append((f"{'x'.join(map(str, sh))}-k{k}-{np.dtype(dt).name}", (x, k)))
    return out


TABLE: dict[str, Entry] = {
    "topk": Entry(topk_ref, topk_cases, exact=(0, 1)),
    "rope_apply": Entry(rope_apply_ref, rope_cases, exact=(0,)),
    "xent_forward": Entry(xent_forward_ref, xent_forward_cases, exact=(),
                          tol={0: XENT_TOL, 1: XENT_TOL},
                          why="one pass per row vs numpy's pairwise sum of exp"),
    "xent_backward": Entry(xent_backward_ref, xent_backward_cases, exact=(), tol={0: XENT_TOL},
                           why="exp(z - lse) rounded by a different libm / device exp"),
    "moe_dispatch_plan": Entry(moe_dispatch_plan_ref, lambda: _moe_cases(lambda c, N, K, E: (c["idx"], E)),
                               exact=(0, 1)),
    "moe_permute": Entry(moe_permute_ref, lambda: _moe_cases(lambda c, N, K, E: (c["x"], c["order"], K)),
                         exact=(0,)),
    # n_tokens = 0 has no K (S // N): the reference and the kernels both refuse it
    "moe_permute_backward": Entry(moe_permute_backward_ref,
                                  lambda: _moe_cases(lambda c, N, K, E: (c["ys"], c["order"], N), min_tokens=1),
                                  exact=(0,)),
    "moe_combine": Entry(moe_combine_ref, lambda: _moe_cases(lambda c, N, K, E: (c["ys"], c["order"], c["w"])),
                         exact=(0,)),
    "moe_combine_backward": Entry(moe_combine_backward_ref,
                                  lambda: _moe_cases(lambda c, N, K, E: (c["dy"], c["ys"], c["order"], c["w"])),
                                  exact=(0,), tol={1: DWEIGHT_TOL},
                                  why="dweight = <dy, ys>: sequential float64 sum vs numpy's pairwise sum"),
    "verify_drafts_batch": Entry(verify_drafts_batch_ref, accept_cases, exact=(0, 1, 2, 3)),
    "causal_attention": Entry(causal_attention_ref, causal_attention_cases, exact=(),
                              tol={0: ATTENTION_TOL, 1: ATTENTION_TOL},
                              why="products over the visible keys only, row sums in 16 partial sums; float32 exp "
                                  "of backends/numba_attention.py (<= 1.4 ulp)"),
    "causal_attention_backward": Entry(causal_attention_backward_ref, causal_attention_backward_cases, exact=(),
                                       tol={0: ATTENTION_TOL, 1: ATTENTION_TOL, 2: ATTENTION_TOL},
                                       why="products over the visible keys only, sum(dp * p) in 16 partial sums"),
    "swiglu_gate": Entry(swiglu_gate_ref, swiglu_gate_cases, exact=(), tol={0: EXP_TOL, 1: EXP_TOL},
                         why="exp from another libm"),
    "swiglu_gate_backward": Entry(swiglu_gate_backward_ref, swiglu_gate_backward_cases, exact=(0,)),
    "rmsnorm_rows": Entry(rmsnorm_rows_ref, rmsnorm_rows_cases, exact=(), tol={0: ROWSUM_TOL, 1: ROWSUM_TOL},
                          why="sum(x * x) left to right vs numpy's pairwise mean"),
    "adamw_update": Entry(adamw_update_ref, adamw_update_cases, exact=(0, 1, 2)),
    "sum_squares": Entry(sum_squares_ref, sum_squares_cases, exact=(), tol={0: {np.float32: 1e-13, np.float64: 1e-13}},
                         why="float64 sum in 16-lane chunks vs numpy's pairwise sum"),
    "rmsnorm_rows_backward": Entry(rmsnorm_rows_backward_ref, rmsnorm_rows_backward_cases, exact=(1,),
                                   tol={0: ROWSUM_TOL}, why="sum(g * n) left to right vs numpy's pairwise mean"),
}

CASES = [pytest.param(name, tag, args, id=f"{name}-{tag}")
         for name, entry in TABLE.items() for tag, args in entry.cases()]


def _to(bk, args):
    return tuple(bk.asarray(a) if isinstance(a, np.ndarray) else a for a in args)


def _compare(name, got, want, to_host):
    entry = TABLE[name]
    got, want = _outputs(got), _outputs(want)
    assert len(got) == len(want), f"{name}: {len(got)} outputs, reference has {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        g, w = to_host(g), np.asarray(to_host(w))
        assert g.shape == w.shape, f"{name} output {i}: shape {g.shape} vs {w.shape}"
        assert g.dtype == w.dtype, f"{name} output {i}: dtype {g.dtype} vs {w.dtype}"
        if i in entry.exact:
            np.testing.assert_array_equal(g, w, err_msg=f"{name} output {i} (bit-exact)")
            if w.dtype.kind == "f":  # bit-exact includes the sign of zero (array_equal has -0.0 == 0.0)
                np.testing.assert_array_equal(np.signbit(g), np.signbit(w), err_msg=f"{name} output {i} (signs)")
        else:
            bound = entry.tol[i][w.dtype.type]
            np.testing.assert_allclose(g, w, rtol=bound, atol=bound,
                                       err_msg=f"{name} output {i} ({entry.why})")


@pytest.mark.parametrize("backend_name", BACKEND_PARAMS)
@pytest.mark.parametrize("name,tag,args", CASES)
def test_kernel_matches_reference(backend_name, name, tag, args):
    bk = get_backend(backend_name)
    if bk.name != "numpy" and name in CPU_ONLY:
        pytest.skip(f"{name} is a numpy-backend kernel only (CPU_ONLY): {bk.name} runs the plain array path")
    kernel = bk.kernel_table()[name]
    want = TABLE[name].ref(*args)  # the numpy reference, on the host
    dev = _to(bk, args)
    got = kernel(*dev)
    _compare(name, got, want, bk.to_numpy)
    if bk.name != "numpy":  # and the plain array path on the same device
        _compare(name, got, TABLE[name].ref(*dev), bk.to_numpy)


def test_table_covers_every_registered_kernel():
    numba_names = set(numba_kernels.KERNELS)
    cupy_names = set(cupy_table.collect())  # importing the wrappers never imports cupy
    assert numba_names - CPU_ONLY == cupy_names, f"numba {sorted(numba_names)} vs cupy {sorted(cupy_names)}"
    assert CPU_ONLY <= numba_names
    missing = sorted((numba_names | cupy_names) - set(TABLE))
    assert not missing, f"kernels without a parity entry in TABLE: {missing}"
    assert not set(TABLE) - numba_names, "TABLE names a kernel that is not registered"
    for name, entry in TABLE.items():
        cases = entry.cases()
        assert len(cases) >= 4, f"{name}: too few parity cases"
        assert set(entry.tol) | set(entry.exact) >= set(range(len(_outputs(entry.ref(*cases[-1][1]))))), \
            f"{name}: an output has neither a bit-exact rule nor a rounding bound"


def test_edge_shapes_are_in_the_table():
    """The generators really produce the edge cases the harness promises."""
    tags = {name: [t for t, _ in e.cases()] for name, e in TABLE.items()}
    assert any(t.startswith("2x0x4") for t in tags["rope_apply"]) and any(t.startswith("1x2") for t in tags["rope_apply"])
    assert any(t.startswith("0x") for t in tags["xent_forward"]) and any(t.startswith("1x1") for t in tags["xent_forward"])
    for name in ("moe_dispatch_plan", "moe_permute", "moe_combine", "moe_combine_backward"):
        assert any(t.startswith("N0-") for t in tags[name]), name  # no tokens
    for name in ("moe_dispatch_plan", "moe_permute_backward", "moe_combine"):
        assert any("-unused-" in t for t in tags[name]) and any("-K1-E6-d5-one-" in t for t in tags[name])
    assert {"empty", "k0-bonus-only", "v1", "single"} <= set(tags["verify_drafts_batch"])
    # an expert with no tokens / every token on one expert, as generated
    c = _moe_data(7, 2, 5, 3, "unused", np.float64, 0)
    assert 4 not in c["idx"]
    c = _moe_data(13, 1, 6, 5, "one", np.float64, 0)
    assert (c["idx"] == 0).all()


# ------------------------------------------------------------------------------------------
# the argument contracts: each checked once (refmtp.backends.contracts), the same on every backend
# ------------------------------------------------------------------------------------------
def _bad_cases():
    z = np.zeros((3, 4))
    x = np.zeros((2, 3, 8))
    cs = np.zeros((3, 4))
    idx = np.array([[0, 1], [2, 3]], dtype=np.int64)
    order = np.arange(4, dtype=np.int64)
    ys, w, dy = np.zeros((4, 3)), np.zeros((2, 2)), np.zeros((2, 3))
    return [
        ("rope_apply", (x, cs[:2], cs[:2]), ValueError, r"cos/sin \(T, Dr/2\)"),
        ("rope_apply", (x[..., :7], cs, cs), ValueError, r"Dr even"),
        ("rope_apply", (x, cs.astype(np.float32), cs), ValueError, "share one float dtype"),
        ("xent_forward", (z, np.zeros(2, np.int64), -100), ValueError, r"targets \(N,\)"),
        ("xent_forward", (z.astype(np.int64), np.zeros(3, np.int64), -100), TypeError, "float32 or float64"),
        ("xent_backward", (np.zeros(2), z, np.zeros(3, np.int64), np.zeros(3), -100), ValueError,
         r"dlosses and lse must be \(N,\)"),
        ("moe_dispatch_plan", (idx, 3), ValueError, r"expert indices must lie in \[0, 3\)"),
        ("moe_dispatch_plan", (idx - 1, 4), ValueError, r"expert indices must lie in \[0, 4\)"),
        ("moe_permute", (np.zeros((2, 3)), order + 1, 2), ValueError, r"slot ids must lie in \[0, 4\)"),
        ("moe_permute", (np.zeros((2, 3), np.int64), order, 2), TypeError, "x must be float32 or float64"),
        ("moe_permute_backward", (ys[:3], order[:3], 2), ValueError, "3 slots is not a multiple of 2 tokens"),
        ("moe_permute_backward", (ys, order[:3], 2), ValueError, r"order has shape \(3,\), expected \(4,\)"),
        ("moe_combine", (ys[:3], order[:3], w), ValueError, "ys has 3 rows, expected N\\*K = 4"),
        ("moe_combine", (ys, order[:3], w), ValueError, r"order has shape \(3,\), expected \(4,\)"),
        ("moe_combine_backward", (dy[:1], ys, order, w), ValueError, "do not fit weight"),
        ("causal_attention", (np.zeros((2, 3, 4, 5)), np.zeros((2, 3, 5, 5)), np.zeros((2, 3, 5, 2)), 0.5, 0),
         ValueError, r"k must be \(2, 3, 4, 5\)"),
        ("causal_attention", (np.zeros((2, 3, 4, 5), np.int64),) * 3 + (0.5, 0), TypeError, "float32 or float64"),
        ("causal_attention_backward", (np.zeros((2, 3, 4, 2)), np.zeros((2, 3, 4, 5)), np.zeros((2, 3, 4, 5)),
                                       np.zeros((2, 3, 4, 2)), np.zeros((2, 3, 4, 5)), 0.5, 0),
         ValueError, r"p \(2, 3, 4, 4\)"),
        ("swiglu_gate", (np.zeros((3, 5)),), ValueError, "even width"),
        ("swiglu_gate_backward", (np.zeros((3, 2)), np.zeros((3, 4)), np.zeros((3, 3))), ValueError,
         r"must be \(3, 2\)"),
        ("rmsnorm_rows", (np.zeros((3, 4)), np.zeros(5), 1e-6), ValueError, r"weight \(d,\)"),
        ("rmsnorm_rows_backward", (np.zeros((3, 4)), np.zeros((3, 4)), np.zeros(4), np.zeros((3,))), ValueError,
         r"rstd \(3, 1\)"),
        ("sum_squares", (np.zeros(3, np.int64),), TypeError, "float32 or float64"),
        ("topk", (np.zeros((3, 4), np.int64), 2), TypeError, "float32 or float64"),
        ("topk", (np.zeros((3, 4)), 5), ValueError, "between 1 and the last dimension 4"),
        ("topk", (np.zeros((3, 0)), 1), ValueError, r"\(\.\.\., n\) with n >= 1"),
        ("adamw_update", (np.zeros(3), np.zeros(3), np.zeros(4), np.zeros(3), 1e-3, 0.1, 0.9, 0.95, 1e-8, 0.1, 0.05),
         ValueError, r"m is \(4,\)"),
    ]


BAD = _bad_cases()


@pytest.mark.parametrize("backend_name", BACKEND_PARAMS)
@pytest.mark.parametrize("i", range(len(BAD)), ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_kernel_contract_rejects_bad_input(backend_name, i):
    name, args, exc, pattern = BAD[i]
    bk = get_backend(backend_name)
    if bk.name != "numpy" and name in CPU_ONLY:
        pytest.skip(f"{name} is a numpy-backend kernel only (CPU_ONLY)")
    with pytest.raises(exc, match=pattern) as info:
        bk.kernel_table()[name](*_to(bk, args))
    assert "\n" not in str(info.value), "contract errors are one line"


def test_every_kernel_with_a_contract_has_a_bad_input_case():
    from refmtp.backends import contracts

    checked = {n[len("check_"):] for n in dir(contracts) if n.startswith("check_")}
    assert checked == set(TABLE) - {"verify_drafts_batch"}  # validated by its public function
    assert checked <= {b[0] for b in BAD}
