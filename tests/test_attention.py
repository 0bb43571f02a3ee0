"""Causal attention with a cache offset (docs/deepseek-v3.md §2.3 step 6, §2.6): forward vs a naive loop, gradcheck."""
from __future__ import annotations

import math

import numpy as np
import pytest

from refmtp.verification.gradcheck import check_grad
from refmtp.model.ops.attention import attention_backward, attention_forward

# (B, H, T, start, Dq, Dv): one token, one token after a cache, odd sizes, Dq != Dv, and T over
# two query blocks of the numpy kernel (backends/numba_attention.py, blocks of 64) behind a cache
CASES = [(1, 1, 1, 0, 3, 2), (2, 3, 4, 0, 5, 3), (1, 2, 3, 2, 4, 5), (2, 1, 1, 5, 3, 3),
         (1, 2, 5, 1, 6, 1), (1, 1, 70, 3, 2, 2)]


def _inputs(bk, B, H, T, start, Dq, Dv, seed, dtype="float64"):
    rng = np.random.default_rng(seed)
    S = start + T
    q = bk.asarray(rng.standard_normal((B, H, T, Dq)), dtype=dtype)
    k = bk.asarray(rng.standard_normal((B, H, S, Dq)), dtype=dtype)
    v = bk.asarray(rng.standard_normal((B, H, S, Dv)), dtype=dtype)
    return q, k, v


def _naive(q, k, v, scale, start):
    """Per (b, h, t): softmax over keys j <= start + t of scale * q.k, then sum p_j v_j."""
    B, H, T, _ = q.shape
    out = np.zeros((B, H, T, v.shape[-1]))
    for b in range(B):
        for h in range(H):
            for t in range(T):
                scores = [scale * sum(q[b, h, t, i] * k[b, h, j, i] for i in range(q.shape[-1]))
                          for j in range(start + t + 1)]
                mx = max(scores)
                w = [math.exp(s - mx) for s in scores]
                z = sum(w)
                for j, wj in enumerate(w):
                    out[b, h, t] += (wj / z) * v[b, h, j]
    return out


@pytest.mark.parametrize("case", CASES)
def test_attention_forward_matches_naive_loop(backend, case):
    q, k, v = _inputs(backend, *case, seed=1)
    start, scale = case[3], 0.37
    o, cache = attention_forward(q, k, v, scale, start=start)
    ref = _naive(*(backend.to_numpy(a) for a in (q, k, v)), scale, start)
    np.testing.assert_allclose(backend.to_numpy(o), ref, rtol=1e-12, atol=1e-14)
    p = backend.to_numpy(cache.p)
    T, S = case[2], case[3] + case[2]
    future = np.arange(S)[None, :] > start + np.arange(T)[:, None]  # (T, S)
    assert np.all(p[..., future] == 0.0)  # masked keys get exactly zero weight
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-14)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "plain"])
@pytest.mark.parametrize("case", CASES)
def test_attention_grad(backend, case, kernels, monkeypatch):
    """Central differences of the backward, on the kernel (numpy backend) and on the plain path."""
    import refmtp.backends.base as base

    monkeypatch.setattr(base, "_KERNELS_ENABLED", kernels and base.kernels_enabled())
    q, k, v = _inputs(backend, *case, seed=2)
    start = case[3]

    def fwd(q, k, v):
        return attention_forward(q, k, v, 0.61, start=start)

    def bwd(d, c):
        g = attention_backward(d, c)
        return {"q": g.dq, "k": g.dk, "v": g.dv}

    rep = check_grad(fwd, bwd, {"q": q, "k": k, "v": v})
    assert set(rep) == {"q", "k", "v"}


def test_attention_float32_agrees_with_float64(backend):
    q, k, v = _inputs(backend, 2, 2, 6, 3, 8, 4, seed=3)
    o64, _ = attention_forward(q, k, v, 0.3, start=3)
    q32, k32, v32 = (backend.asarray(a, dtype="float32") for a in (q, k, v))
    o32, _ = attention_forward(q32, k32, v32, 0.3, start=3)
    assert o32.dtype == q32.dtype
    np.testing.assert_allclose(backend.to_numpy(o32), backend.to_numpy(o64), rtol=2e-5, atol=2e-6)


def test_attention_large_scores_stay_finite(backend):
    # max-subtraction: logits of order 1e3 would overflow exp() without it
    q, k, v = _inputs(backend, 1, 1, 4, 0, 3, 2, seed=4)
    o, _ = attention_forward(q * 300.0, k * 300.0, v, 1.0)
    assert np.all(np.isfinite(backend.to_numpy(o)))


def test_attention_backward_is_pure(backend):
    q, k, v = _inputs(backend, 1, 2, 3, 1, 4, 3, seed=5)
    o, cache = attention_forward(q, k, v, 0.5, start=1)
    d = backend.asarray(np.random.default_rng(6).standard_normal(tuple(o.shape)))
    p0 = backend.to_numpy(cache.p).copy()
    g1, g2 = attention_backward(d, cache), attention_backward(d, cache)
    for a, b in zip(g1, g2):
        np.testing.assert_array_equal(backend.to_numpy(a), backend.to_numpy(b))
    np.testing.assert_array_equal(backend.to_numpy(cache.p), p0)


def test_attention_rejects_bad_input(backend):
    q, k, v = _inputs(backend, 1, 2, 3, 2, 4, 3, seed=7)
    with pytest.raises(ValueError, match=r"k must be \(1, 2, 3, 4\)"):
        attention_forward(q, k, v, 1.0, start=0)  # S = 5 keys but start + T = 3
    with pytest.raises(ValueError, match="start=-1"):
        attention_forward(q, k, v, 1.0, start=-1)
    with pytest.raises(ValueError, match="4-D"):
        attention_forward(q[0], k[0], v[0], 1.0, start=2)
    with pytest.raises(ValueError, match="dtypes differ"):
        attention_forward(q, k, backend.asarray(v, dtype="float32"), 1.0, start=2)
