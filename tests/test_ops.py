"""Float64 gradient checks and independent forward checks of the simple ops."""
from __future__ import annotations

import numpy as np
import pytest

from refmtp.verification.gradcheck import GradientMismatch, check_grad
from refmtp.model.ops.embedding import embedding_backward, embedding_forward
from refmtp.model.ops.linear import linear_backward, linear_forward
from refmtp.model.ops.rmsnorm import rmsnorm_backward, rmsnorm_forward
from refmtp.model.ops.swiglu import swiglu_backward, swiglu_forward
from refmtp.model.ops.xent import xent_backward, xent_forward

SHAPES = [(1, 1), (2, 3), (3, 5)]  # (B, T) including one token and odd sizes


def _rand(bk, rng, *shape, scale=1.0):
    return bk.asarray(rng.standard_normal(shape) * scale, dtype="float64")


@pytest.mark.parametrize("B,T", SHAPES)
def test_linear_grad(backend, B, T):
    rng = np.random.default_rng(1)
    x, w = _rand(backend, rng, B, T, 7), _rand(backend, rng, 5, 7)
    check_grad(linear_forward,
               lambda d, c: {"x": linear_backward(d, c).dx, "weight": linear_backward(d, c).dweight},
               {"x": x, "weight": w})


@pytest.mark.parametrize("B,T", SHAPES)
def test_rmsnorm_grad_and_forward(backend, B, T):
    rng = np.random.default_rng(2)
    x, w = _rand(backend, rng, B, T, 9), _rand(backend, rng, 9)
    def bwd(d, c):
        g = rmsnorm_backward(d, c)
        return {"x": g.dx, "weight": g.dweight}
    check_grad(lambda x, weight: rmsnorm_forward(x, weight, 1e-6), bwd, {"x": x, "weight": w})
    # independent forward: the formula of docs/deepseek-v3.md §1, in plain numpy
    xn, wn = backend.to_numpy(x), backend.to_numpy(w)
    ref = wn * xn / np.sqrt(np.mean(xn ** 2, axis=-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(backend.to_numpy(rmsnorm_forward(x, w, 1e-6)[0]), ref, rtol=1e-13)


@pytest.mark.parametrize("B,T", SHAPES)
def test_swiglu_grad_and_forward(backend, B, T):
    """I = 5: N = B*T = 15 >= 2I takes the one-GEMM [Wg; Wu] path, N = 1 and 6 the two products."""
    rng = np.random.default_rng(3)
    x = _rand(backend, rng, B, T, 6)
    g, u, dn = _rand(backend, rng, 5, 6), _rand(backend, rng, 5, 6), _rand(backend, rng, 6, 5)
    def bwd(d, c):
        r = swiglu_backward(d, c)
        return {"x": r.dx, "gate_proj": r.dgate_proj, "up_proj": r.dup_proj, "down_proj": r.ddown_proj}
    check_grad(swiglu_forward, bwd, {"x": x, "gate_proj": g, "up_proj": u, "down_proj": dn})
    xn = backend.to_numpy(x)
    a = xn @ backend.to_numpy(g).T
    ref = ((a / (1 + np.exp(-a))) * (xn @ backend.to_numpy(u).T)) @ backend.to_numpy(dn).T
    np.testing.assert_allclose(backend.to_numpy(swiglu_forward(x, g, u, dn)[0]), ref, rtol=1e-12)


@pytest.mark.parametrize("B,T", SHAPES)
def test_embedding_grad_repeated_ids(backend, B, T):
    rng = np.random.default_rng(4)
    ids = backend.asarray(rng.integers(0, 3, size=(B, T)), dtype="int64")  # repeats likely
    w = _rand(backend, rng, 4, 5)
    def bwd(d, c):
        return {"weight": embedding_backward(d, c).dweight}
    check_grad(lambda weight: embedding_forward(ids, weight), bwd, {"weight": w})


def test_embedding_rejects_out_of_range(backend):
    w = backend.zeros((4, 2))
    with pytest.raises(ValueError, match=r"in \[0, 4\)"):
        embedding_forward(backend.asarray(np.array([[4]]), dtype="int64"), w)


@pytest.mark.parametrize("N,V", [(1, 2), (5, 7), (8, 3)])
def test_xent_grad_ignore_index_and_forward(backend, N, V):
    rng = np.random.default_rng(5)
    z = _rand(backend, rng, N, V, scale=3.0)
    t = rng.integers(0, V, size=N)
    if N > 1:
        t[0] = -100
    tt = backend.asarray(t, dtype="int64")
    def bwd(d, c):
        return {"logits": xent_backward(d, c).dlogits}
    check_grad(lambda logits: xent_forward(logits, tt), bwd, {"logits": z})
    zn = backend.to_numpy(z)
    ref = -np.log(np.exp(zn) / np.exp(zn).sum(-1, keepdims=True))[np.arange(N), np.maximum(t, 0)]
    ref[t == -100] = 0.0
    np.testing.assert_allclose(backend.to_numpy(xent_forward(z, tt)[0]), ref, rtol=1e-12, atol=1e-14)


def test_gradcheck_catches_a_wrong_backward(backend):
    rng = np.random.default_rng(6)
    x, w = _rand(backend, rng, 2, 3, 4), _rand(backend, rng, 9)[:4]
    def wrong(d, c):
        g = rmsnorm_backward(d, c)
        return {"x": g.dx * 1.001, "weight": g.dweight}
    with pytest.raises(GradientMismatch, match="x: max rel err"):
        check_grad(lambda x, weight: rmsnorm_forward(x, weight, 1e-6), wrong, {"x": x, "weight": w})


def test_gradcheck_refuses_float32(backend):
    x = backend.zeros((2, 2), dtype="float32")
    with pytest.raises(TypeError, match="float64"):
        check_grad(lambda x: (x, None), lambda d, c: {"x": d}, {"x": x})


def test_backward_is_pure(backend):
    rng = np.random.default_rng(7)
    x, w = _rand(backend, rng, 3, 4), _rand(backend, rng, 4)
    out, cache = rmsnorm_forward(x, w, 1e-6)
    d = _rand(backend, rng, 3, 4)
    x0 = backend.to_numpy(x).copy()
    g1 = rmsnorm_backward(d, cache)
    g2 = rmsnorm_backward(d, cache)
    np.testing.assert_array_equal(backend.to_numpy(g1.dx), backend.to_numpy(g2.dx))
    np.testing.assert_array_equal(backend.to_numpy(x), x0)
    assert g1.dx is not g2.dx


# -------------------------------------------------------------------------------------------
# numpy <-> cupy parity (float64, 1e-12 relative): every op, forward and backward, with the
# backend's kernels on and off. Imported by the layer test files (test_mla, test_moe).
# -------------------------------------------------------------------------------------------
PARITY_RTOL = 1e-12


def rel_err(got, want) -> float:
    """max |got - want| / max |want| (0 for empty arrays): a norm-wise relative error."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if want.size == 0:
        return 0.0
    scale = float(np.max(np.abs(want)))
    return float(np.max(np.abs(got - want))) / (scale if scale > 0 else 1e-300)


def assert_parity(got: dict, want: dict, rtol: float = PARITY_RTOL, what: str = "") -> None:
    """Host arrays keyed alike: same shapes and dtypes, integers equal, floats within rtol."""
    assert sorted(got) == sorted(want), f"{what}: keys differ: {sorted(set(got) ^ set(want))}"
    for k in sorted(want):
        g, w = np.asarray(got[k]), np.asarray(want[k])
        assert g.shape == w.shape and g.dtype == w.dtype, f"{what}{k}: {g.shape} {g.dtype} vs {w.shape} {w.dtype}"
        if w.dtype.kind in "biu":
            np.testing.assert_array_equal(g, w, err_msg=f"{what}{k}")
        else:
            err = rel_err(g, w)
            assert err <= rtol, f"{what}{k}: relative error {err:.2e} > {rtol:.0e}"


def run_on(bk, fn, kernels: bool):
    """fn(bk) with the kernel table switched on or off, restoring the previous setting."""
    from refmtp.backends import set_kernels_enabled

    prev = set_kernels_enabled(kernels)
    try:
        return fn(bk)
    finally:
        set_kernels_enabled(prev)


def _op_case(name):
    """fn(bk) -> {output and gradient name: host array}; inputs drawn from a fixed seed on the host."""
    from refmtp.config import preset
    from refmtp.model.ops.attention import attention_backward, attention_forward
    from refmtp.model.ops.rope import rope_backward, rope_forward, rope_tables

    def fn(bk):
        rng = np.random.default_rng(sum(map(ord, name)))
        h = bk.to_numpy

        def A(*shape, scale=1.0):
            return bk.asarray(rng.standard_normal(shape) * scale, dtype="float64")

        if name == "linear":
            x, w = A(3, 5, 7), A(6, 7)
            y, c = linear_forward(x, w)
            g = linear_backward(A(3, 5, 6), c)
            return {"y": h(y), "dx": h(g.dx), "dweight": h(g.dweight)}
        if name == "rmsnorm":
            x, w = A(3, 5, 9), A(9)
            y, c = rmsnorm_forward(x, w, 1e-6)
            g = rmsnorm_backward(A(3, 5, 9), c)
            return {"y": h(y), "dx": h(g.dx), "dweight": h(g.dweight)}
        if name == "swiglu":
            x, gp, up, dn = A(2, 7, 6), A(5, 6), A(5, 6), A(6, 5)
            y, c = swiglu_forward(x, gp, up, dn)
            g = swiglu_backward(A(2, 7, 6), c)
            return {"y": h(y), "dx": h(g.dx), "dgate": h(g.dgate_proj), "dup": h(g.dup_proj),
                    "ddown": h(g.ddown_proj)}
        if name == "embedding":
            ids = bk.asarray(rng.integers(0, 5, size=(4, 6)), dtype="int64")  # many repeats
            y, c = embedding_forward(ids, A(5, 3))
            return {"y": h(y), "dweight": h(embedding_backward(A(4, 6, 3), c).dweight)}
        if name == "xent":
            t = rng.integers(0, 11, size=9)
            t[[2, 5]] = -100
            z = A(9, 11, scale=3.0)
            losses, c = xent_forward(z, bk.asarray(t, dtype="int64"))
            return {"losses": h(losses), "lse": h(c.lse), "dlogits": h(xent_backward(A(9), c).dlogits)}
        if name == "attention":
            q, k, v = A(2, 3, 4, 5), A(2, 3, 6, 5), A(2, 3, 6, 7)
            o, c = attention_forward(q, k, v, 0.4, start=2)
            g = attention_backward(A(2, 3, 4, 7), c)
            return {"o": h(o), "p": h(c.p), "dq": h(g.dq), "dk": h(g.dk), "dv": h(g.dv)}
        if name == "rope":
            x = A(2, 3, 5, 8)
            cfg = preset("deepseek-v3").replace(qk_rope_head_dim=8)  # YaRN frequencies
            cos, sin = rope_tables(cfg, bk.asarray(np.arange(5) + 4000, dtype="int64"), x)
            y, c = rope_forward(x, cos, sin)
            return {"cos": h(cos), "sin": h(sin), "y": h(y), "dx": h(rope_backward(A(2, 3, 5, 8), c).dx)}
        raise AssertionError(name)

    return fn


OPS = ["linear", "rmsnorm", "swiglu", "embedding", "xent", "attention", "rope"]


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "plain"])
@pytest.mark.parametrize("op", OPS)
def test_cupy_matches_numpy_float64(op, kernels):
    from refmtp.backends import get_backend

    want = run_on(get_backend("numpy"), _op_case(op), kernels=False)  # the plain numpy reference
    got = run_on(get_backend("cupy"), _op_case(op), kernels=kernels)
    assert_parity(got, want, what=f"{op} ({'kernels' if kernels else 'plain'}): ")
