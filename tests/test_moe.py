"""The DeepSeekMoE layer (refmtp.model.moe): forward against a per-token oracle, float64 gradient checks
of the whole layer over every parameter and the input, selection-flip detection, kernel vs plain
path, cache contents, parameter names and one-line errors."""
from __future__ import annotations

import math

import numpy as np
import pytest

from refmtp.backends import set_kernels_enabled
from refmtp.config import ConfigError, ModelConfig, preset
from refmtp.verification.gradcheck import SelectionFlip, check_grad
from refmtp.model.moe import (check_moe, moe_backward, moe_forward, routing_margin, routing_selection)
from refmtp.params import BIAS, dense_mlp_param_shapes, moe_param_shapes
from tests.test_moe_gate import _oracle as route_oracle

CONFIGS = {
    # V3: sigmoid, noaux_tc, group-limited, sequence-wise balance loss
    "v3": dict(n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2),
    # V3 with two shared experts (one SwiGLU of width 2*I) and the V2 expert-level loss
    "v3-shared2-expertloss": dict(n_routed_experts=6, num_experts_per_tok=3, n_group=2,
                                  topk_group=1, n_shared_experts=2, balance_loss="expert"),
    # no shared experts, no renormalisation, no balance loss
    "v3-noshared-nonorm": dict(n_routed_experts=5, num_experts_per_tok=2, n_group=1, topk_group=1,
                               n_shared_experts=0, norm_topk_prob=False, balance_loss="none"),
    # V2: softmax, group_limited_greedy (group score = max), no renormalisation
    "v2-group": dict(n_routed_experts=6, num_experts_per_tok=3, n_group=3, topk_group=2,
                     scoring_func="softmax", topk_method="group_limited_greedy",
                     norm_topk_prob=False, routed_scaling_factor=16.0),
    # softmax + norm_topk_prob: normalised, NOT times rho (DeepSeek-V2 hub code)
    "v2-norm": dict(n_routed_experts=6, num_experts_per_tok=3, n_group=3, topk_group=2,
                    scoring_func="softmax", topk_method="group_limited_greedy",
                    norm_topk_prob=True, routed_scaling_factor=16.0),
    # V2-Lite: softmax, greedy, expert-level loss
    "v2-greedy": dict(n_routed_experts=5, num_experts_per_tok=2, n_group=1, topk_group=1,
                      scoring_func="softmax", topk_method="greedy", norm_topk_prob=False,
                      routed_scaling_factor=1.0, balance_loss="expert"),
}
SHAPES = [(1, 1), (2, 3), (3, 5)]  # (B, T): one token, odd sizes


def make_cfg(name, d=7, I=5) -> ModelConfig:
    kw = dict(CONFIGS[name])
    balance = kw.pop("balance_loss", "seq")
    cfg = ModelConfig(hidden_size=d, moe_intermediate_size=I, **kw)
    cfg.refmtp.balance_loss = balance
    return cfg.validate()


def make_params(backend, cfg, seed, dtype="float64", std=0.5, bias_std=0.3):
    rng = np.random.default_rng(seed)
    p = {}
    for name, shape in moe_param_shapes(cfg).items():
        if name == BIAS:
            p[name] = backend.asarray(rng.standard_normal(shape) * bias_std, dtype="float32")
        else:
            p[name] = backend.asarray(rng.standard_normal(shape) * std, dtype=dtype)
    return p


def gapped_fixture(backend, cfg, B, T, seed=0, gap=1e-3, tries=50):
    """(x, params) whose every routing decision has a score gap > gap (asserted)."""
    for k in range(tries):
        p = make_params(backend, cfg, seed * 1000 + k)
        x = backend.asarray(np.random.default_rng(seed * 1000 + k).standard_normal((B, T, cfg.hidden_size)),
                            dtype="float64")
        if routing_margin(moe_forward(x, p, cfg)[2]) > gap:
            return x, p
    raise AssertionError(f"no fixture with a routing gap > {gap} in {tries} seeds")


def layer_check(cfg, x, p, **kw):
    """check_grad of (out, aux) over x and every float64 parameter (the float32 bias is fixed)."""
    fixed = {k: v for k, v in p.items() if k == BIAS}

    def fwd(x, **params):
        out, aux, cache = moe_forward(x, {**params, **fixed}, cfg)
        return (out, aux), cache

    def bwd(d, cache):
        dx, grads = moe_backward(d[0], d[1], cache)
        return {"x": dx, **grads}

    inputs = {"x": x, **{k: v for k, v in p.items() if k != BIAS}}
    return check_grad(fwd, bwd, inputs, selection=routing_selection, **kw)


# -------------------------------------------------------------------------------------------
def _swiglu(x, g, u, dn):
    a = x @ g.T
    return ((a / (1 + np.exp(-a))) * (x @ u.T)) @ dn.T


def _layer_oracle(x, p, cfg):
    """Eq. 12 token by token: shared + sum over the oracle's routing of g_i Expert_i."""
    B, T, d = x.shape
    xt = x.reshape(-1, d)
    bias = p.get(BIAS)
    idx, w = route_oracle(xt, p["gate.weight"], bias, cfg)
    out = np.zeros_like(xt)
    for n in range(xt.shape[0]):
        if cfg.n_shared_experts:
            out[n] += _swiglu(xt[n:n + 1], *(p[f"shared_experts.{k}.weight"] for k in
                                              ("gate_proj", "up_proj", "down_proj")))[0]
        for e, g in zip(idx[n], w[n]):
            out[n] += g * _swiglu(xt[n:n + 1], *(p[f"experts.{e}.{k}.weight"] for k in
                                                 ("gate_proj", "up_proj", "down_proj")))[0]
    return out.reshape(B, T, d), idx.reshape(B, T, -1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_matches_oracle(backend, name):
    cfg = make_cfg(name)
    x, p = gapped_fixture(backend, cfg, 3, 5, seed=1)
    out, aux, cache = moe_forward(x, p, cfg)
    host = {k: backend.to_numpy(v) for k, v in p.items()}
    ref, ref_idx = _layer_oracle(backend.to_numpy(x), host, cfg)
    np.testing.assert_allclose(backend.to_numpy(out), ref, rtol=1e-12, atol=1e-13)
    np.testing.assert_array_equal(backend.to_numpy(cache.topk_idx), ref_idx)
    assert out.shape == x.shape and out.dtype == x.dtype and aux.shape == ()
    if cfg.refmtp.balance_loss == "none":
        assert float(aux) == 0.0
    else:
        assert float(aux) > 0.0


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("B,T", SHAPES)
def test_layer_gradcheck(backend, name, B, T):
    cfg = make_cfg(name)
    x, p = gapped_fixture(backend, cfg, B, T, seed=2 + B)
    reports = layer_check(cfg, x, p, max_coords=12, seed=B * T)
    assert set(reports) == {"x"} | (set(p) - {BIAS})  # every parameter and the input


def test_gradcheck_every_token_on_two_experts(backend):
    """A huge bias sends every token to experts 0 and 1: the others get no token (zero grads)."""
    cfg = make_cfg("v3")
    x, p = gapped_fixture(backend, cfg, 2, 3, seed=9)
    p[BIAS] = backend.asarray(np.array([9.0, 9.0] + [0.0] * 6), dtype="float32")
    _, _, cache = moe_forward(x, p, cfg)
    assert backend.to_numpy(cache.load).tolist() == [6, 6, 0, 0, 0, 0, 0, 0]
    assert routing_margin(cache) > 1e-3
    layer_check(cfg, x, p, max_coords=12)
    _, grads = moe_backward(backend.zeros((2, 3, 7)) + 1.0, 1.0, cache)
    assert float(backend.xp.max(backend.xp.abs(grads["experts.5.up_proj.weight"]))) == 0.0


def test_gradcheck_plain_path(backend):
    """The same check with kernels switched off (the reference dispatch functions)."""
    cfg = make_cfg("v3")
    x, p = gapped_fixture(backend, cfg, 2, 3, seed=3)
    prev = set_kernels_enabled(False)
    try:
        layer_check(cfg, x, p, max_coords=12)
    finally:
        set_kernels_enabled(prev)


def test_checker_detects_flip_on_near_tie(backend):
    """Experts 1 and 2 differ by 1e-9 in their gate rows: a 1e-5 perturbation swaps them."""
    cfg = ModelConfig(hidden_size=4, moe_intermediate_size=3, n_routed_experts=4,
                      num_experts_per_tok=2, n_group=1, topk_group=1).validate()
    p = make_params(backend, cfg, 0)
    W = np.array([[2.0, 1.0, 0.0, 0.5],
                  [0.5, 0.3, 0.2, 0.1],
                  [0.5, 0.3, 0.2, 0.1 + 1e-9],
                  [-2.0, -1.0, 0.0, -0.5]])
    p["gate.weight"] = backend.asarray(W, dtype="float64")
    p[BIAS] = backend.zeros((4,), dtype="float32")
    x = backend.asarray(np.array([[[1.0, 1.0, 1.0, 1.0]]]), dtype="float64")
    _, _, cache = moe_forward(x, p, cfg)
    assert routing_margin(cache) < 1e-8
    with pytest.raises(SelectionFlip, match="selection changed under perturbation"):
        layer_check(cfg, x, p)


# -------------------------------------------------------------------------------------------
def test_kernel_path_equals_plain_path(backend):
    """Same plan, gathers and scatter order; the output and the backward to rounding (the SwiGLU gate
    kernel's exp comes from another libm than numpy's)."""
    cfg = make_cfg("v3")
    x, p = gapped_fixture(backend, cfg, 4, 9, seed=4)
    dout = backend.asarray(np.random.default_rng(5).standard_normal(x.shape), dtype="float64")
    results = {}
    for flag in (True, False):
        prev = set_kernels_enabled(flag)
        try:
            assert (backend.kernel("moe_combine") is not None) == flag
            out, aux, cache = moe_forward(x, p, cfg)
            dx, grads = moe_backward(dout, 0.3, cache)
        finally:
            set_kernels_enabled(prev)
        results[flag] = (out, aux, cache, dx, grads)
    (o1, a1, c1, dx1, g1), (o0, a0, c0, dx0, g0) = results[True], results[False]
    np.testing.assert_allclose(backend.to_numpy(o1), backend.to_numpy(o0), rtol=1e-13, atol=1e-15)
    assert float(a1) == float(a0)
    np.testing.assert_array_equal(backend.to_numpy(c1.order), backend.to_numpy(c0.order))
    np.testing.assert_allclose(backend.to_numpy(dx1), backend.to_numpy(dx0), rtol=1e-12, atol=1e-14)
    for k in g0:
        np.testing.assert_allclose(backend.to_numpy(g1[k]), backend.to_numpy(g0[k]),
                                   rtol=1e-12, atol=1e-14, err_msg=k)


def test_float32_agrees_with_float64(backend):
    cfg = make_cfg("v3")
    x, p = gapped_fixture(backend, cfg, 2, 5, seed=6, gap=1e-2)
    out64, aux64, c64 = moe_forward(x, p, cfg)
    p32 = {k: (v if k == BIAS else backend.asarray(backend.to_numpy(v), dtype="float32"))
           for k, v in p.items()}
    x32 = backend.asarray(backend.to_numpy(x), dtype="float32")
    out32, aux32, c32 = moe_forward(x32, p32, cfg)
    assert out32.dtype == backend.xp.float32 and aux32.dtype == backend.xp.float32
    np.testing.assert_array_equal(backend.to_numpy(c32.topk_idx), backend.to_numpy(c64.topk_idx))
    tol = 4 * math.sqrt(np.finfo(np.float32).eps)
    np.testing.assert_allclose(backend.to_numpy(out32), backend.to_numpy(out64), rtol=tol, atol=tol)
    np.testing.assert_allclose(float(aux32), float(aux64), rtol=tol)
    dx32, g32 = moe_backward(backend.xp.ones_like(out32), 1.0, c32)
    assert dx32.dtype == backend.xp.float32 and all(g.dtype == backend.xp.float32 for g in g32.values())


def test_cache_exposes_routing_and_load(backend):
    cfg = make_cfg("v3")
    x, p = gapped_fixture(backend, cfg, 3, 4, seed=7)
    _, _, c = moe_forward(x, p, cfg)
    idx = backend.to_numpy(c.topk_idx)
    assert idx.shape == (3, 4, 2) and c.topk_weight.shape == (3, 4, 2)
    load = backend.to_numpy(c.load)
    assert load.dtype == np.int64 and load.shape == (8,)
    np.testing.assert_array_equal(load, np.bincount(idx.reshape(-1), minlength=8))
    # the gate values: unbiased s of the selected experts, renormalised, times 2.5
    s = backend.to_numpy(c.router.s).reshape(3, 4, 8)
    sel = np.take_along_axis(s, idx, -1)
    np.testing.assert_allclose(backend.to_numpy(c.topk_weight), 2.5 * sel / (sel.sum(-1, keepdims=True) + 1e-20),
                               rtol=1e-14)


def test_backward_is_pure_and_has_no_bias_grad(backend):
    cfg = make_cfg("v3")
    x, p = gapped_fixture(backend, cfg, 2, 3, seed=8)
    out, aux, c = moe_forward(x, p, cfg)
    d = backend.asarray(np.random.default_rng(1).standard_normal(x.shape), dtype="float64")
    ys0, s0 = backend.to_numpy(c.ys).copy(), backend.to_numpy(c.router.s).copy()
    dx1, g1 = moe_backward(d, 0.5, c)
    dx2, g2 = moe_backward(d, 0.5, c)
    np.testing.assert_array_equal(backend.to_numpy(dx1), backend.to_numpy(dx2))
    assert dx1 is not dx2
    for k in g1:
        np.testing.assert_array_equal(backend.to_numpy(g1[k]), backend.to_numpy(g2[k]))
    np.testing.assert_array_equal(backend.to_numpy(c.ys), ys0)
    np.testing.assert_array_equal(backend.to_numpy(c.router.s), s0)
    assert BIAS not in g1 and set(g1) == set(p) - {BIAS}
    # daux only reaches the router: experts' gradients do not depend on it
    _, g3 = moe_backward(d, 0.0, c)
    np.testing.assert_array_equal(backend.to_numpy(g3["experts.0.up_proj.weight"]),
                                  backend.to_numpy(g1["experts.0.up_proj.weight"]))
    assert not np.array_equal(backend.to_numpy(g3["gate.weight"]), backend.to_numpy(g1["gate.weight"]))


# -------------------------------------------------------------------------------------------
def test_param_shapes():
    v3 = preset("deepseek-v3")
    shapes = moe_param_shapes(v3)
    assert shapes["gate.weight"] == (256, 7168) and shapes[BIAS] == (256,)
    assert shapes["experts.255.down_proj.weight"] == (7168, 2048)
    assert shapes["shared_experts.gate_proj.weight"] == (2048, 7168)
    assert len(shapes) == 2 + 256 * 3 + 3
    assert dense_mlp_param_shapes(v3) == {"gate_proj.weight": (18432, 7168),
                                          "up_proj.weight": (18432, 7168),
                                          "down_proj.weight": (7168, 18432)}
    two = make_cfg("v3-shared2-expertloss")
    assert moe_param_shapes(two)["shared_experts.up_proj.weight"] == (10, 7)  # 2 * I
    assert BIAS not in moe_param_shapes(make_cfg("v2-greedy"))  # V2 has no bias
    assert not any(k.startswith("shared_") for k in moe_param_shapes(make_cfg("v3-noshared-nonorm")))


def _one_line(exc):
    assert "\n" not in str(exc.value), str(exc.value)


def test_input_errors(backend):
    cfg = make_cfg("v3")
    p = make_params(backend, cfg, 0)
    x = backend.zeros((2, 3, 7))
    with pytest.raises(ValueError, match=r"expected \(B, T, 7\)") as e:
        check_moe(backend.zeros((6, 7)), p, cfg)
    _one_line(e)
    with pytest.raises(ValueError, match=r"expected \(B, T, 7\)"):
        check_moe(backend.zeros((2, 3, 6)), p, cfg)
    with pytest.raises(ValueError, match=r"expected \(B, T, 7\)"):
        check_moe(backend.zeros((0, 3, 7)), p, cfg)
    q = dict(p)
    del q["experts.3.up_proj.weight"]
    with pytest.raises(ValueError, match="missing parameter 'experts.3.up_proj.weight'") as e:
        check_moe(x, q, cfg)
    _one_line(e)
    with pytest.raises(ValueError, match="unexpected parameter 'experts.8.up_proj.weight'"):
        check_moe(x, {**p, "experts.8.up_proj.weight": p["experts.0.up_proj.weight"]}, cfg)
    with pytest.raises(ValueError, match=r"experts.2.down_proj.weight has shape \(5, 7\)"):
        check_moe(x, {**p, "experts.2.down_proj.weight": p["experts.2.up_proj.weight"]}, cfg)
    with pytest.raises(ValueError, match="always float32") as e:
        check_moe(x, {**p, BIAS: backend.zeros((8,), dtype="float64")}, cfg)
    _one_line(e)
    with pytest.raises(ValueError, match="expected float64"):
        check_moe(x, {**p, "gate.weight": backend.zeros((8, 7), dtype="float32")}, cfg)
    _, _, c = moe_forward(x, p, cfg)
    with pytest.raises(ValueError, match="dout has shape"):
        moe_backward(backend.zeros((2, 3, 6)), 0.0, c)


@pytest.mark.parametrize("change,msg", [
    (dict(num_experts_per_tok=9), "num_experts_per_tok=9 must be <= n_routed_experts=8"),
    (dict(n_group=3), "n_group=3 must divide n_routed_experts=8"),
    (dict(topk_group=5), "topk_group=5 must be <= n_group=4"),
    (dict(num_experts_per_tok=5), r"topk_group\*experts_per_group = 2\*2 = 4 must be >= num_experts_per_tok=5"),
])
def test_config_errors(backend, change, msg):
    """Rejected by the config, and by the layer's check when a config was changed after validation."""
    cfg = make_cfg("v3")
    with pytest.raises(ConfigError, match=msg) as e:
        cfg.replace(**change)
    _one_line(e)
    p = make_params(backend, cfg, 0)
    for k, v in change.items():
        setattr(cfg, k, v)
    with pytest.raises(ValueError, match=msg):
        check_moe(backend.zeros((1, 2, 7)), p, cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "plain"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_cupy_matches_numpy_float64(name, kernels):
    """The layer on cupy (dispatch kernels on / off) against the plain numpy layer: the same
    routing and loads exactly, outputs, aux and every gradient to 1e-12 relative."""
    from refmtp.backends import get_backend
    from tests.test_ops import assert_parity, run_on

    cfg = make_cfg(name)
    host = get_backend("numpy")
    x0, p0 = gapped_fixture(host, cfg, 3, 5, seed=11)  # routing gap > 1e-3: no tie to break
    d0 = np.random.default_rng(12).standard_normal(x0.shape)

    def fn(bk):
        h = bk.to_numpy
        p = {k: bk.asarray(v) for k, v in p0.items()}  # float32 bias stays float32
        out, aux, cache = moe_forward(bk.asarray(x0), p, cfg)
        dx, grads = moe_backward(bk.asarray(d0), 0.7, cache)
        return {"out": h(out), "aux": h(aux), "topk_idx": h(cache.topk_idx), "load": h(cache.load),
                "topk_weight": h(cache.topk_weight), "order": h(cache.order), "dx": h(dx),
                **{f"grad.{k}": h(v) for k, v in grads.items()}}

    want = run_on(host, fn, kernels=False)
    got = run_on(get_backend("cupy"), fn, kernels=kernels)
    assert_parity(got, want, what=f"moe {name}: ")
