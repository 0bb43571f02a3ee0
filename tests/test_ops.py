"""Float64 gradient checks and independent forward checks of the simple ops."""
from __future__ import annotations

import numpy as np
import pytest

from refmtp.gradcheck import GradientMismatch, check_grad
from refmtp.ops.embedding import embedding_backward, embedding_forward
from refmtp.ops.linear import linear_backward, linear_forward
from refmtp.ops.rmsnorm import rmsnorm_backward, rmsnorm_forward
from refmtp.ops.swiglu import swiglu_backward, swiglu_forward
from refmtp.ops.xent import xent_backward, xent_forward

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
    # independent forward: the formula of spec section 1, in plain numpy
    xn, wn = backend.to_numpy(x), backend.to_numpy(w)
    ref = wn * xn / np.sqrt(np.mean(xn ** 2, axis=-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(backend.to_numpy(rmsnorm_forward(x, w, 1e-6)[0]), ref, rtol=1e-13)


@pytest.mark.parametrize("B,T", SHAPES)
def test_swiglu_grad_and_forward(backend, B, T):
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
