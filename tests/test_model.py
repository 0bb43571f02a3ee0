"""The whole model: float64 gradient checks over every parameter, loss assembly, causality,
the output contract and the bias update."""
from __future__ import annotations

import numpy as np
import pytest

from refmtp.model.block import block_backward, block_forward
from refmtp.params import sub_params
from refmtp.config import preset
from refmtp.verification.gradcheck import check_grad
from refmtp.params import is_bias, layer_prefix, param_shapes
from refmtp.model.loss import loss_backward, loss_forward
from refmtp.model.moe import routing_selection as moe_routing_selection
from refmtp.model import (backward, forward, init_params, routing_margin, routing_selection,
                          update_expert_bias)

# Whole-model checks resolve gradients down to ~1e-6 of an O(10) loss that rounds at ~1e-15:
# plain central differences are rounding-limited below h ~ 1e-4 and truncation-limited above
# (the LoRA RMSNorms make the loss strongly curved). The checked function is therefore the
# Richardson combination below, whose central difference is the 4th-order five-point stencil,
# with h = 3e-4 (measured worst rel err 6e-8..4e-7 on the fixtures below, tolerance 1e-6).
H = 3e-4


def _tokens(bk, cfg, B, T, seed=0):
    rng = np.random.default_rng(seed)
    return bk.asarray(rng.integers(0, cfg.vocab_size, size=(B, T + 1)), dtype="int64")


def _richardson(forward, x0: dict):
    """``G(x) = 4/3 F(x) - 1/6 F(2x - x0)``: ``G'(x0) = F'(x0)`` (same analytic gradient), and
    ``(G(x0+h) - G(x0-h)) / 2h = [8 (F(x0+h) - F(x0-h)) - (F(x0+2h) - F(x0-2h))] / 12h``, the
    O(h^4) stencil, through check_grad's own central difference. Returns the two caches."""

    def g(**x):
        a, cache_a = forward(**x)
        b, cache_b = forward(**{k: 2 * x[k] - x0[k] for k in x})
        return {k: (4 / 3) * a[k] - (1 / 6) * b[k] for k in a}, (cache_a, cache_b)

    return g


def _model_check(cfg, bk, *, B=1, T=4, seed=4, max_coords=6, std=0.2):
    """Gradient check of forward/backward over EVERY parameter (biases are no inputs: no grad).

    The checked output is losses["total"] with every MTP depth weighted 1 (mtp_lambda = D) and
    alpha = 0.1, so every parameter has a clearly resolvable gradient.
    """
    params = init_params(cfg, seed=seed, backend=bk, std=std, bias_std=0.2)
    tokens = _tokens(bk, cfg, B, T, seed)
    biases = {k: v for k, v in params.items() if is_bias(k)}
    inputs = {k: v for k, v in params.items() if not is_bias(k)}

    def fwd(**p):
        out, cache = forward({**p, **biases}, cfg, tokens)
        return {"total": out.losses["total"]}, cache

    def bwd(dout, caches):
        return backward(caches[0], dout)  # caches[0]: the evaluation at x0 itself

    def selection(caches):
        return bk.xp.concat([routing_selection(c) for c in caches])

    _, cache = fwd(**inputs)
    margin = routing_margin(cache)
    assert margin > 10 * H, f"fixture too close to a routing flip (margin {margin:.2e}): pick another seed"
    reports = check_grad(_richardson(fwd, inputs), bwd, inputs, seed=seed, h=H,
                         max_coords=max_coords, selection=selection)
    assert set(reports) == set(inputs)
    # the check must not be vacuous: most tensors have a clearly non-zero gradient
    g = backward(cache)
    nonzero = [k for k, v in g.items() if float(bk.xp.max(bk.xp.abs(v))) > 1e-8]
    assert len(nonzero) > 0.5 * len(g)
    return reports


VARIANTS = {
    "causal-post_norm-paper": {},
    "causal-pre_norm": {"mtp_chain": "pre_norm"},
    "causal-valid_mean": {"mtp_loss_norm": "valid_mean"},
    "parallel": {"mtp_kind": "parallel"},
}


@pytest.mark.slow  # ~10-15 s each on 2 cores; the fast lane keeps test_model_gradcheck_no_mtp
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_model_gradcheck(backend, variant):
    cfg = preset("tiny").replace(refmtp=VARIANTS[variant])
    assert cfg.D == 2 and cfg.n_group > 1 and cfg.refmtp.seq_aux_alpha > 0
    cfg = cfg.replace(refmtp={"seq_aux_alpha": 0.1, "mtp_lambda": float(cfg.D)})
    reports = _model_check(cfg, backend, max_coords=5)
    assert len(reports) == len([k for k in param_shapes(cfg) if not is_bias(k)])


@pytest.mark.slow  # ~7-11 s on 2 cores
def test_model_gradcheck_group_limited_one_token_per_depth(backend):
    # topk_group < n_group (groups really dropped), q_proj without LoRA, T = D+1 (depth D has
    # ONE row), and first_k_dense_replace = 2 (both main layers dense, only the MTP blocks MoE)
    cfg = preset("tiny").replace(topk_group=1, q_lora_rank=None, first_k_dense_replace=2,
                                 refmtp={"seq_aux_alpha": 0.1, "mtp_lambda": 2.0})
    _model_check(cfg, backend, B=1, T=3, seed=3, max_coords=5)


def test_model_gradcheck_no_mtp(backend):
    cfg = preset("tiny").replace(num_nextn_predict_layers=0)
    reports = _model_check(cfg, backend, B=2, T=3, max_coords=4)
    assert not any(k.startswith("model.layers.2.") for k in reports)


@pytest.mark.parametrize("layer,B,T", [(0, 1, 1), (0, 2, 3), (1, 2, 5), (1, 1, 1)])
def test_block_grad(backend, layer, B, T):
    """One decoder block (layer 0 dense SwiGLU, layer 1 MoE) on its own, every input."""
    cfg = preset("tiny").replace(refmtp={"seq_aux_alpha": 0.1})
    params = init_params(cfg, seed=layer + 2 * T, backend=backend, std=0.3, bias_std=0.05)
    p = sub_params(params, layer_prefix(layer))
    fixed = {k: v for k, v in p.items() if is_bias(k)}
    inputs = {k: v for k, v in p.items() if not is_bias(k)}
    rng = np.random.default_rng(B * 10 + T)
    inputs["x"] = backend.asarray(rng.standard_normal((B, T, cfg.hidden_size)), dtype="float64")
    positions = backend.xp.arange(T, dtype=backend.xp.int64) + 3  # any positions (RoPE only)
    moe = cfg.is_moe_layer(layer)

    def fwd(x, **q):
        y, aux, cache = block_forward(x, {**q, **fixed}, cfg, layer, positions)
        return ({"y": y, "aux": aux} if moe else {"y": y}), cache

    def bwd(dout, cache):
        dx, grads = block_backward(dout["y"], dout.get("aux"), cache)
        return {"x": dx, **grads}

    sel = (lambda c: moe_routing_selection(c.ffn)) if moe else None  # noqa: E731
    reports = check_grad(fwd, bwd, inputs, seed=T, max_coords=10, selection=sel)
    assert set(reports) == set(inputs)
    _, cache = fwd(**inputs)
    assert not any(is_bias(k) for k in bwd({"y": inputs["x"], "aux": 1.0}, cache))


def test_backward_is_linear_in_the_loss_terms(backend):
    """backward(cache, dlosses) is the gradient of sum_name dlosses[name] * losses[name]."""
    cfg = preset("tiny")
    params = init_params(cfg, seed=0, backend=backend, std=0.2, bias_std=0.1)
    _, cache = forward(params, cfg, _tokens(backend, cfg, 2, 5))
    w = {"main": 0.7, "mtp.1": -1.3, "mtp.2": 0.4, "balance": 2.0, "total": 0.5}
    mixed = backward(cache, w)
    single = {k: backward(cache, {k: 1.0}) for k in w}
    for name in mixed:
        expect = sum(w[k] * backend.to_numpy(single[k][name]) for k in w)
        np.testing.assert_allclose(backend.to_numpy(mixed[name]), expect, rtol=1e-10, atol=1e-14)
    # total = main + (lambda/D) sum_k mtp.k + balance, term by term
    lam = cfg.refmtp.mtp_lambda / cfg.D
    for name in mixed:
        expect = (backend.to_numpy(single["main"][name]) + backend.to_numpy(single["balance"][name])
                  + lam * (backend.to_numpy(single["mtp.1"][name]) + backend.to_numpy(single["mtp.2"][name])))
        np.testing.assert_allclose(backend.to_numpy(single["total"][name]), expect, rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="unknown loss term"):
        backward(cache, {"mtp.3": 1.0})


# -------------------------------------------------------------------------------------------
def test_loss_assembly_grad(backend):
    rng = np.random.default_rng(7)
    B, T = 2, 5
    for extra in ({}, {"mtp_loss_norm": "valid_mean"}):
        cfg = preset("tiny").replace(refmtp=extra)

        def fwd(main, m1, m2, a1, a3):
            return loss_forward(main, [m1, m2], {1: a1, 3: a3}, cfg, B, T)

        def bwd(d, cache):
            g = loss_backward(d, cache)
            return {"main": g.dmain_rows, "m1": g.dmtp_rows[0], "m2": g.dmtp_rows[1],
                    "a1": g.daux[1], "a3": g.daux[3]}

        inputs = {"main": rng.random(B * T), "m1": rng.random(B * (T - 1)),
                  "m2": rng.random(B * (T - 2)), "a1": np.asarray(rng.random()),
                  "a3": np.asarray(rng.random())}
        check_grad(fwd, bwd, {k: backend.asarray(v, dtype="float64") for k, v in inputs.items()})


def test_losses_match_independent_formulas(backend):
    cfg = preset("tiny").replace(refmtp={"seq_aux_alpha": 0.01})
    B, T = 3, 6
    tok = _tokens(backend, cfg, B, T, seed=5)
    params = init_params(cfg, seed=5, backend=backend, std=0.2, bias_std=0.1)
    out, _ = forward(params, cfg, tok)
    t = backend.to_numpy(tok)

    def ce_sum(logits, targets):
        z = backend.to_numpy(logits).reshape(-1, cfg.vocab_size)
        m = z.max(-1, keepdims=True)
        lse = np.log(np.exp(z - m).sum(-1)) + m[:, 0]
        return float(np.sum(lse - z[np.arange(len(z)), targets.reshape(-1)]))

    main = ce_sum(out.logits, t[:, 1:]) / (B * T)
    assert np.isclose(float(out.losses["main"]), main, rtol=1e-12)
    assert out.logits.shape == (B, T, cfg.vocab_size)
    total = main
    for k in (1, 2):
        assert out.mtp_logits[k - 1].shape == (B, T - k, cfg.vocab_size)
        lk = ce_sum(out.mtp_logits[k - 1], t[:, k + 1:]) / (B * T)  # paper: 1/(B T)
        assert np.isclose(float(out.losses[f"mtp.{k}"]), lk, rtol=1e-12)
        total += cfg.refmtp.mtp_lambda / cfg.D * lk
    moe_layers = [l for l in range(cfg.num_hidden_layers + cfg.D) if cfg.is_moe_layer(l)]
    assert sorted(out.load) == sorted(out.routing) == moe_layers == [1, 2, 3]
    assert float(out.losses["balance"]) > 0
    total += float(out.losses["balance"])
    assert np.isclose(float(out.losses["total"]), total, rtol=1e-12)
    for layer in moe_layers:
        load = backend.to_numpy(out.load[layer])
        T_l = T if layer < cfg.num_hidden_layers else T - (layer - cfg.num_hidden_layers + 1)
        assert load.shape == (cfg.n_routed_experts,) and load.sum() == B * T_l * cfg.num_experts_per_tok
        idx, w = out.routing[layer]
        assert idx.shape == w.shape == (B, T_l, cfg.num_experts_per_tok)

    # valid_mean: depth k divides by B (T-k) instead
    cfg2 = cfg.replace(refmtp={"mtp_loss_norm": "valid_mean"})
    out2, _ = forward(params, cfg2, tok)
    for k in (1, 2):
        assert np.isclose(float(out2.losses[f"mtp.{k}"]),
                          float(out.losses[f"mtp.{k}"]) * T / (T - k), rtol=1e-12)


def test_causality_of_main_and_mtp(backend):
    """Main row i sees t_0..t_i; depth-k row i sees t_0..t_{i+k} and nothing later."""
    cfg = preset("tiny")
    B, T = 2, 7
    params = init_params(cfg, seed=1, backend=backend, std=0.2)
    tok = backend.to_numpy(_tokens(backend, cfg, B, T, seed=1))
    out, _ = forward(params, cfg, backend.asarray(tok, dtype="int64"))
    for j in (2, 4, 6):
        t2 = tok.copy()
        t2[:, j] = (t2[:, j] + 1) % cfg.vocab_size
        out2, _ = forward(params, cfg, backend.asarray(t2, dtype="int64"))
        a, b = backend.to_numpy(out.logits), backend.to_numpy(out2.logits)
        # equal up to rounding: an expert's row block (and so its BLAS call) changes with the
        # tokens routed to it, which may move the last bit
        np.testing.assert_allclose(a[:, :j], b[:, :j], rtol=1e-12, atol=1e-13)
        assert np.abs(a[:, j:] - b[:, j:]).max() > 1e-6
        for k in (1, 2):
            a, b = backend.to_numpy(out.mtp_logits[k - 1]), backend.to_numpy(out2.mtp_logits[k - 1])
            np.testing.assert_allclose(a[:, :j - k], b[:, :j - k], rtol=1e-12, atol=1e-13)
            assert np.abs(a[:, j - k:] - b[:, j - k:]).max() > 1e-6


def test_chain_flag_changes_only_deeper_depths(backend):
    cfg = preset("tiny")
    tok = _tokens(backend, cfg, 2, 5, seed=2)
    params = init_params(cfg, seed=2, backend=backend, std=0.2)
    post, _ = forward(params, cfg, tok)
    pre, _ = forward(params, cfg.replace(refmtp={"mtp_chain": "pre_norm"}), tok)
    np.testing.assert_array_equal(backend.to_numpy(post.logits), backend.to_numpy(pre.logits))
    np.testing.assert_array_equal(backend.to_numpy(post.mtp_logits[0]),
                                  backend.to_numpy(pre.mtp_logits[0]))
    assert not np.allclose(backend.to_numpy(post.mtp_logits[1]), backend.to_numpy(pre.mtp_logits[1]))


def test_backward_contract(backend):
    cfg = preset("tiny")
    params = init_params(cfg, seed=0, backend=backend, bias_std=0.1)
    before = {k: backend.to_numpy(v).copy() for k, v in params.items()}
    out, cache = forward(params, cfg, _tokens(backend, cfg, 2, 4))
    g1 = backward(cache)
    g2 = backward(cache)  # pure: same result twice, nothing accumulates
    assert set(g1) == {k for k in params if not is_bias(k)}
    assert not any("e_score_correction_bias" in k for k in g1)
    for k in g1:
        assert g1[k].shape == params[k].shape and g1[k].dtype == params[k].dtype
        np.testing.assert_array_equal(backend.to_numpy(g1[k]), backend.to_numpy(g2[k]))
    for k, v in params.items():
        np.testing.assert_array_equal(backend.to_numpy(v), before[k])
    # inference path: same outputs, no cache
    out2, none = forward(params, cfg, _tokens(backend, cfg, 2, 4), need_cache=False)
    assert none is None
    np.testing.assert_array_equal(backend.to_numpy(out.losses["total"]),
                                  backend.to_numpy(out2.losses["total"]))
    with pytest.raises(ValueError, match="need_cache=True"):
        backward(None)


def test_float32_agrees_with_float64(backend):
    cfg = preset("tiny")
    tok = _tokens(backend, cfg, 2, 6, seed=4)
    p64 = init_params(cfg, seed=4, backend=backend, dtype="float64", bias_std=0.3)
    p32 = init_params(cfg, seed=4, backend=backend, dtype="float32", bias_std=0.3)
    o64, c64 = forward(p64, cfg, tok)
    o32, c32 = forward(p32, cfg, tok)
    assert o32.logits.dtype == backend.xp.float32
    for k in o64.losses:
        assert np.isclose(float(o32.losses[k]), float(o64.losses[k]), rtol=1e-5, atol=1e-7)
    g64, g32 = backward(c64), backward(c32)
    for k in g64:
        a, b = backend.to_numpy(g64[k]), backend.to_numpy(g32[k])
        assert b.dtype == np.float32
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-3 * (np.abs(a).max() + 1e-12))


def test_update_expert_bias(backend):
    cfg = preset("tiny")
    params = init_params(cfg, seed=0, backend=backend)
    out, _ = forward(params, cfg, _tokens(backend, cfg, 2, 6))
    old = {l: backend.to_numpy(params[f"model.layers.{l}.mlp.gate.e_score_correction_bias"]).copy()
           for l in out.load}
    update_expert_bias(params, out.load, 0.01)
    for layer, load in out.load.items():
        new = params[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"]
        assert new.dtype == backend.xp.float32
        c = backend.to_numpy(load).astype(float)
        expect = old[layer] + np.float32(0.01) * np.sign(c.mean() - c).astype(np.float32)
        np.testing.assert_array_equal(backend.to_numpy(new), expect)
    with pytest.raises(ValueError, match="not MoE"):
        update_expert_bias(params, {0: out.load[1]}, 0.01)


@pytest.mark.parametrize("bad,match", [
    (np.zeros((2,), dtype=np.int64), r"\(B, T\+1\)"),
    (np.zeros((2, 1), dtype=np.int64), r"T\+1 >= 2"),
    (np.zeros((2, 3), dtype=np.int64), r"T >= D\+1"),
    (np.full((1, 5), 64, dtype=np.int64), r"\[0, 64\)"),
    (np.zeros((1, 5), dtype=np.float64), "integers"),
])
def test_bad_tokens(backend, bad, match):
    cfg = preset("tiny")
    params = init_params(cfg, seed=0, backend=backend)
    with pytest.raises(ValueError, match=match):
        forward(params, cfg, backend.asarray(bad))


def test_bad_params(backend):
    cfg = preset("tiny")
    params = init_params(cfg, seed=0, backend=backend)
    tok = _tokens(backend, cfg, 1, 4)
    p = dict(params)
    del p["model.layers.2.enorm.weight"]
    with pytest.raises(ValueError, match="missing 1: model.layers.2.enorm.weight"):
        forward(p, cfg, tok)
    p = dict(params)
    p["lm_head.weight"] = p["lm_head.weight"][:, :3]
    with pytest.raises(ValueError, match=r"lm_head.weight.*shape"):
        forward(p, cfg, tok)


# -------------------------------------------------------------------------------------------
# numpy <-> cupy parity of the whole model (float64, 1e-12 relative; routing equal)
# -------------------------------------------------------------------------------------------
def _model_case(variant):
    """fn(bk) -> {name: host array}: losses, logits, states, routing, load and every gradient of
    one forward/backward of the tiny model (variant of VARIANTS), inputs drawn on the host."""

    def fn(bk):
        cfg = preset("tiny").replace(refmtp=VARIANTS[variant])
        cfg = cfg.replace(refmtp={"seq_aux_alpha": 0.1})
        params = init_params(cfg, seed=6, backend=bk, std=0.2, bias_std=0.1)
        out, cache = forward(params, cfg, _tokens(bk, cfg, 2, 6, seed=6))
        margin = routing_margin(cache)
        assert margin > 1e-8, f"fixture too close to a routing flip (margin {margin:.2e})"
        h = bk.to_numpy
        res = {f"loss/{k}": h(v) for k, v in out.losses.items()}
        res["logits"], res["hidden"] = h(out.logits), h(out.hidden)
        for k, (z, st) in enumerate(zip(out.mtp_logits, out.mtp_hidden), start=1):
            res[f"mtp_logits/{k}"], res[f"mtp_hidden/{k}"] = h(z), h(st)
        for layer, (idx, w) in out.routing.items():
            res[f"routing/{layer}/idx"], res[f"routing/{layer}/weight"] = h(idx), h(w)
            res[f"load/{layer}"] = h(out.load[layer])
        res.update({f"grad/{k}": h(v) for k, v in backward(cache).items()})
        return res

    return fn


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "plain"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cupy_matches_numpy_float64(variant, kernels):
    from refmtp.backends import get_backend
    from tests.test_ops import assert_parity, run_on

    want = run_on(get_backend("numpy"), _model_case(variant), kernels=False)  # plain numpy reference
    got = run_on(get_backend("cupy"), _model_case(variant), kernels=kernels)
    assert any(k.startswith("routing/") for k in want) and any(k.startswith("grad/") for k in want)
    assert_parity(got, want, what=f"model {variant} ({'kernels' if kernels else 'plain'}): ")
