"""The MLA layer (docs/deepseek-v3.md §2.1-2.8): forward vs a naive per-head, per-position loop written here from
the equations of docs/deepseek-v3.md §2, full-layer float64 gradcheck over x and every parameter, the absorbed-form
identity of the decoding helpers, and input validation."""
from __future__ import annotations

import math

import numpy as np
import pytest

from refmtp.backends import set_kernels_enabled
from refmtp.config import preset
from refmtp.verification.gradcheck import check_grad
from refmtp.model.mla import (check_mla, mla_backward, mla_forward, mla_kv_b_heads, mla_kv_up,
                              mla_latent_kv, mla_query)
from refmtp.params import mla_param_shapes


def _cfg(variant):
    cfg = preset("tiny")
    if variant == "tiny":
        return cfg
    if variant == "no_q_lora":
        return cfg.replace(q_lora_rank=None)
    if variant == "yarn":  # Dr=8, L0=64: ramp low=0, high=2 (partial), both mscales != 1
        return cfg.replace(qk_rope_head_dim=8, rope_scaling={
            "type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8})
    raise AssertionError(variant)


VARIANTS = ["tiny", "no_q_lora", "yarn"]
SHAPES = [(1, 1), (2, 3), (1, 5)]  # (B, T): one token, odd T


def _names(cfg):
    if cfg.q_lora_rank is None:
        q = {"q_proj.weight": (cfg.num_attention_heads * cfg.qk_head_dim, cfg.hidden_size)}
    else:
        q = {"q_a_proj.weight": (cfg.q_lora_rank, cfg.hidden_size),
             "q_a_layernorm.weight": (cfg.q_lora_rank,),
             "q_b_proj.weight": (cfg.num_attention_heads * cfg.qk_head_dim, cfg.q_lora_rank)}
    H = cfg.num_attention_heads
    return {**q,
            "kv_a_proj_with_mqa.weight": (cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.hidden_size),
            "kv_a_layernorm.weight": (cfg.kv_lora_rank,),
            "kv_b_proj.weight": (H * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank),
            "o_proj.weight": (cfg.hidden_size, H * cfg.v_head_dim)}


def _params(bk, cfg, seed, dtype="float64"):
    rng = np.random.default_rng(seed)
    p = {}
    for k, shape in _names(cfg).items():
        if k.endswith("layernorm.weight"):
            p[k] = bk.asarray(1.0 + 0.3 * rng.standard_normal(shape), dtype=dtype)
        else:
            p[k] = bk.asarray(rng.standard_normal(shape) / math.sqrt(shape[1]), dtype=dtype)
    return p


def _positions(bk, cfg, T):
    offset = 60 if cfg.rope_scaling else 0  # past L0 for the YaRN variant
    return bk.asarray(np.arange(T) + offset, dtype="int64")


# ------------------------------------------------------------------------------------------
# the naive reference: docs/deepseek-v3.md §2.3-2.5 written per token and per head, plain Python/numpy
# ------------------------------------------------------------------------------------------
def _spec_rope(cfg):
    """(inverse frequencies th'_j, cos/sin factor, softmax scale) from docs/deepseek-v3.md §2.4 and §2.5."""
    Dr, base = cfg.qk_rope_head_dim, cfg.rope_theta
    th = [base ** (-2 * j / Dr) for j in range(Dr // 2)]
    scale = cfg.qk_head_dim ** -0.5
    rs = cfg.rope_scaling
    if rs is None:
        return th, 1.0, scale
    s, L0 = rs["factor"], rs["original_max_position_embeddings"]
    corr = lambda r: Dr * math.log(L0 / (2 * math.pi * r)) / (2 * math.log(base))  # noqa: E731
    low = max(math.floor(corr(rs["beta_fast"])), 0)
    high = min(math.ceil(corr(rs["beta_slow"])), Dr - 1)
    if high == low:
        high += 0.001
    th2 = []
    for j in range(Dr // 2):
        ramp = min(max((j - low) / (high - low), 0), 1)
        th2.append(th[j] / s * ramp + th[j] * (1 - ramp))
    gm = lambda m: 0.1 * m * math.log(s) + 1 if s > 1 else 1.0  # noqa: E731
    return th2, gm(rs["mscale"]) / gm(rs["mscale_all_dim"]), scale * gm(rs["mscale_all_dim"]) ** 2


def _naive_mla(x, p, cfg, positions):
    B, T, _ = x.shape
    H, Dn, Dr, Dv, Rkv = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                          cfg.v_head_dim, cfg.kv_lora_rank)
    th, amp, scale = _spec_rope(cfg)
    eps = cfg.rms_norm_eps

    def rms(v, w):  # docs/deepseek-v3.md §1
        return w * v / math.sqrt(sum(a * a for a in v) / len(v) + eps)

    def rope(v, m):  # docs/deepseek-v3.md §2.4, interleaved pairs
        y = np.empty(len(v))
        for j in range(len(v) // 2):
            c, s_ = amp * math.cos(m * th[j]), amp * math.sin(m * th[j])
            y[2 * j] = v[2 * j] * c - v[2 * j + 1] * s_
            y[2 * j + 1] = v[2 * j] * s_ + v[2 * j + 1] * c
        return y

    out = np.zeros((B, T, cfg.hidden_size))
    for b in range(B):
        q, k, v = {}, {}, {}
        for t in range(T):
            h_t, m = x[b, t], int(positions[t])
            if cfg.q_lora_rank is None:
                qt = p["q_proj.weight"] @ h_t
            else:
                cq = rms(p["q_a_proj.weight"] @ h_t, p["q_a_layernorm.weight"])  # step 1
                qt = p["q_b_proj.weight"] @ cq  # step 2
            kv = p["kv_a_proj_with_mqa.weight"] @ h_t  # step 3, latent first
            c_kv = rms(kv[:Rkv], p["kv_a_layernorm.weight"])
            k_pe = rope(kv[Rkv:], m)  # no norm, shared by all heads
            kvb = p["kv_b_proj.weight"] @ c_kv  # step 4
            for h in range(H):
                r = h * (Dn + Dr)  # q_b_proj row h*(Dn+Dr)+c
                q[t, h] = np.concatenate([qt[r:r + Dn], rope(qt[r + Dn:r + Dn + Dr], m)])  # step 5
                r = h * (Dn + Dv)  # kv_b_proj row h*(Dn+Dv)+c
                k[t, h] = np.concatenate([kvb[r:r + Dn], k_pe])
                v[t, h] = kvb[r + Dn:r + Dn + Dv]
        for t in range(T):  # step 6
            o = []
            for h in range(H):
                sc = [float(q[t, h] @ k[j, h]) * scale for j in range(t + 1)]
                mx = max(sc)
                e = [math.exp(a - mx) for a in sc]
                o.append(sum(e[j] / sum(e) * v[j, h] for j in range(t + 1)))
            out[b, t] = p["o_proj.weight"] @ np.concatenate(o)
    return out


# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("B,T", SHAPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_mla_forward_matches_naive_loop(backend, variant, B, T):
    cfg = _cfg(variant)
    p = _params(backend, cfg, seed=1)
    x = backend.asarray(np.random.default_rng(2).standard_normal((B, T, cfg.hidden_size)))
    pos = _positions(backend, cfg, T)
    out, cache = mla_forward(x, p, cfg, pos)
    assert out.shape == (B, T, cfg.hidden_size)
    ref = _naive_mla(backend.to_numpy(x), {k: backend.to_numpy(w) for k, w in p.items()}, cfg,
                     backend.to_numpy(pos))
    np.testing.assert_allclose(backend.to_numpy(out), ref, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("B,T", SHAPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_mla_grad_every_parameter(backend, variant, B, T):
    cfg = _cfg(variant)
    p = _params(backend, cfg, seed=3)
    x = backend.asarray(np.random.default_rng(4).standard_normal((B, T, cfg.hidden_size)))
    pos = _positions(backend, cfg, T)

    def fwd(x, **params):
        return mla_forward(x, params, cfg, pos)

    def bwd(d, cache):
        dx, grads = mla_backward(d, cache)
        assert set(grads) == set(_names(cfg))  # a gradient for every parameter, nothing else
        return {"x": dx, **grads}

    rep = check_grad(fwd, bwd, {"x": x, **p}, seed=B * 10 + T)
    assert set(rep) == {"x", *_names(cfg)}


def test_mla_param_shapes_v3():
    s = mla_param_shapes(preset("deepseek-v3"))  # docs/deepseek-v3.md §5.2
    assert s == {
        "q_a_proj.weight": (1536, 7168), "q_a_layernorm.weight": (1536,),
        "q_b_proj.weight": (24576, 1536), "kv_a_proj_with_mqa.weight": (576, 7168),
        "kv_a_layernorm.weight": (512,), "kv_b_proj.weight": (32768, 512),
        "o_proj.weight": (7168, 16384),
    }
    s = mla_param_shapes(preset("deepseek-v3").replace(q_lora_rank=None))
    assert s["q_proj.weight"] == (24576, 7168) and "q_a_proj.weight" not in s
    for variant in VARIANTS:
        assert mla_param_shapes(_cfg(variant)) == _names(_cfg(variant))


@pytest.mark.parametrize("variant", VARIANTS)
def test_decoding_helpers_and_absorbed_form(backend, variant):
    # docs/deepseek-v3.md §2.7: the latent cache (c_KV post-norm, k_pe post-RoPE) with W_UK / W_UV absorbed
    # reproduces the naive layer exactly.
    cfg = _cfg(variant)
    B, T = 2, 5
    p = _params(backend, cfg, seed=5)
    x = backend.asarray(np.random.default_rng(6).standard_normal((B, T, cfg.hidden_size)))
    pos = _positions(backend, cfg, T)
    out, cache = mla_forward(x, p, cfg, pos)
    c_kv, k_pe = mla_latent_kv(x, p, cfg, pos)
    q_nope, q_pe = mla_query(x, p, cfg, pos)
    np.testing.assert_array_equal(backend.to_numpy(c_kv), backend.to_numpy(cache.c_kv))
    np.testing.assert_array_equal(backend.to_numpy(k_pe), backend.to_numpy(cache.k_pe))
    k_nope, v = mla_kv_up(c_kv, p, cfg)
    assert k_nope.shape == (B, cfg.num_attention_heads, T, cfg.qk_nope_head_dim)
    assert v.shape == (B, cfg.num_attention_heads, T, cfg.v_head_dim)
    W_UK, W_UV = (backend.to_numpy(w) for w in mla_kv_b_heads(p, cfg))
    c, kp = backend.to_numpy(c_kv), backend.to_numpy(k_pe)
    qn, qp = backend.to_numpy(q_nope), backend.to_numpy(q_pe)
    _, _, scale = _spec_rope(cfg)
    q_t = np.einsum("bhtd,hdc->bhtc", qn, W_UK)  # q~ = W_UK[h]^T q_nope
    s = (np.einsum("bhtc,bjc->bhtj", q_t, c) + np.einsum("bhtr,bjr->bhtj", qp, kp)) * scale
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    pr = np.exp(s - s.max(-1, keepdims=True))
    pr /= pr.sum(-1, keepdims=True)
    lat = np.einsum("bhtj,bjc->bhtc", pr, c)  # sum_j p c_KV_j
    o = np.einsum("bhtc,hdc->bthd", lat, W_UV).reshape(B, T, -1)  # W_UV[h] @ x
    absorbed = o @ backend.to_numpy(p["o_proj.weight"]).T
    np.testing.assert_allclose(absorbed, backend.to_numpy(out), rtol=1e-11, atol=1e-13)


def test_mla_float32_agrees_with_float64(backend):
    cfg = _cfg("yarn")
    p64 = _params(backend, cfg, seed=7)
    x64 = backend.asarray(np.random.default_rng(8).standard_normal((2, 4, cfg.hidden_size)))
    pos = _positions(backend, cfg, 4)
    out64, c64 = mla_forward(x64, p64, cfg, pos)
    p32 = {k: backend.asarray(w, dtype="float32") for k, w in p64.items()}
    out32, c32 = mla_forward(backend.asarray(x64, dtype="float32"), p32, cfg, pos)
    assert out32.dtype == p32["o_proj.weight"].dtype
    np.testing.assert_allclose(backend.to_numpy(out32), backend.to_numpy(out64), rtol=1e-4, atol=1e-5)
    d = backend.asarray(np.random.default_rng(9).standard_normal(tuple(out64.shape)))
    dx64, g64 = mla_backward(d, c64)
    dx32, g32 = mla_backward(backend.asarray(d, dtype="float32"), c32)
    np.testing.assert_allclose(backend.to_numpy(dx32), backend.to_numpy(dx64), rtol=1e-3, atol=1e-4)
    for k in g64:
        assert g32[k].dtype == p32[k].dtype
        np.testing.assert_allclose(backend.to_numpy(g32[k]), backend.to_numpy(g64[k]),
                                   rtol=1e-3, atol=1e-4)


def test_mla_kernels_on_off_agree(backend):
    cfg = _cfg("yarn")
    p = _params(backend, cfg, seed=10)
    x = backend.asarray(np.random.default_rng(11).standard_normal((2, 3, cfg.hidden_size)))
    pos = _positions(backend, cfg, 3)
    d = backend.asarray(np.random.default_rng(12).standard_normal((2, 3, cfg.hidden_size)))
    results = []
    previous = set_kernels_enabled(True)
    try:
        for flag in (True, False):
            set_kernels_enabled(flag)
            out, cache = mla_forward(x, p, cfg, pos)
            results.append((out, *mla_backward(d, cache)))
    finally:
        set_kernels_enabled(previous)
    (o1, dx1, g1), (o2, dx2, g2) = results
    np.testing.assert_allclose(backend.to_numpy(o1), backend.to_numpy(o2), rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(backend.to_numpy(dx1), backend.to_numpy(dx2), rtol=1e-14, atol=1e-15)
    for k in g1:
        np.testing.assert_allclose(backend.to_numpy(g1[k]), backend.to_numpy(g2[k]), rtol=1e-14,
                                   atol=1e-15)


def test_mla_backward_is_pure(backend):
    cfg = _cfg("tiny")
    p = _params(backend, cfg, seed=13)
    x = backend.asarray(np.random.default_rng(14).standard_normal((1, 3, cfg.hidden_size)))
    out, cache = mla_forward(x, p, cfg, _positions(backend, cfg, 3))
    d = backend.asarray(np.random.default_rng(15).standard_normal(tuple(out.shape)))
    x0 = backend.to_numpy(x).copy()
    dx1, g1 = mla_backward(d, cache)
    dx2, g2 = mla_backward(d, cache)
    np.testing.assert_array_equal(backend.to_numpy(dx1), backend.to_numpy(dx2))
    for k in g1:
        np.testing.assert_array_equal(backend.to_numpy(g1[k]), backend.to_numpy(g2[k]))
        assert g1[k] is not g2[k]
    np.testing.assert_array_equal(backend.to_numpy(x), x0)


def test_mla_rejects_bad_input(backend):
    """check_mla is the layer's contract, checked once at an entry point (not inside mla_forward)."""
    cfg = _cfg("tiny")
    p = _params(backend, cfg, seed=16)
    x = backend.zeros((1, 3, cfg.hidden_size))
    pos = _positions(backend, cfg, 3)
    with pytest.raises(ValueError, match="'kv_b_proj.weight' is missing"):
        check_mla(x, {k: w for k, w in p.items() if k != "kv_b_proj.weight"}, cfg, pos)
    with pytest.raises(ValueError, match="unexpected parameter 'q_proj.weight'"):
        check_mla(x, {**p, "q_proj.weight": p["q_b_proj.weight"]}, cfg, pos)
    with pytest.raises(ValueError, match=r"o_proj.weight has shape \(8, 16\)"):
        check_mla(x, {**p, "o_proj.weight": p["o_proj.weight"].T}, cfg, pos)
    with pytest.raises(ValueError, match=r"positions must be \(T,\)"):
        check_mla(x, p, cfg, _positions(backend, cfg, 2))
    with pytest.raises(ValueError, match="hidden_size=16"):
        check_mla(backend.zeros((1, 3, 15)), p, cfg, pos)
    with pytest.raises(ValueError, match="float32 but x is float64"):
        check_mla(x, {**p, "o_proj.weight": backend.asarray(p["o_proj.weight"], dtype="float32")},
                    cfg, pos)


def mla_parity_outputs(bk, cfg) -> dict:
    """One MLA forward and backward on backend ``bk`` (fixed seeds), as host arrays: what the
    backend-parity tests (cupy here, array_api_strict in tests/test_strict_lane.py) compare."""
    h = bk.to_numpy
    p = _params(bk, cfg, seed=17)
    rng = np.random.default_rng(18)
    x = bk.asarray(rng.standard_normal((2, 5, cfg.hidden_size)))
    d = bk.asarray(rng.standard_normal((2, 5, cfg.hidden_size)))
    out, cache = mla_forward(x, p, cfg, _positions(bk, cfg, 5))
    dx, grads = mla_backward(d, cache)
    return {"out": h(out), "c_kv": h(cache.c_kv), "k_pe": h(cache.k_pe), "p": h(cache.attn.p),
            "dx": h(dx), **{f"grad.{k}": h(v) for k, v in grads.items()}}


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "plain"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_cupy_matches_numpy_float64(variant, kernels):
    """The whole layer on cupy (RoPE kernel on / off) against the plain numpy layer, 1e-12."""
    from refmtp.backends import get_backend
    from tests.test_ops import assert_parity, run_on

    cfg = _cfg(variant)

    def fn(bk):
        return mla_parity_outputs(bk, cfg)

    want = run_on(get_backend("numpy"), fn, kernels=False)
    got = run_on(get_backend("cupy"), fn, kernels=kernels)
    assert_parity(got, want, what=f"mla {variant}: ")


def test_latent_norms_use_rms_norm_eps(backend, monkeypatch):
    # q_a_layernorm and kv_a_layernorm take cfg.rms_norm_eps (1e-6 in V3). HF, the DeepSeek hub
    # code and DeepSeek's inference/model.py build both with a fixed 1e-6: the same number for
    # V3 and every preset, different only for a config with another rms_norm_eps.
    # docs/math-decisions.md.
    import refmtp.model.mla as mla

    seen = []
    real = mla.rmsnorm_forward

    def spy(x, w, eps):
        seen.append((int(w.shape[0]), eps))
        return real(x, w, eps)

    monkeypatch.setattr(mla, "rmsnorm_forward", spy)
    cfg = _cfg("tiny").replace(rms_norm_eps=1e-3)
    p = _params(backend, cfg, seed=1)
    x = backend.asarray(np.random.default_rng(2).standard_normal((1, 3, cfg.hidden_size)))
    mla_forward(x, p, cfg, _positions(backend, cfg, 3))
    assert sorted(seen) == sorted([(cfg.q_lora_rank, 1e-3), (cfg.kv_lora_rank, 1e-3)])
    assert preset("deepseek-v3").rms_norm_eps == 1e-6
