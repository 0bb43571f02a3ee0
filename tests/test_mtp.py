"""One causal MTP module: gradient check, concatenation order, and the model's MTP indexing
checked against an independent Megatron-style (rolled, full-length) formulation."""
from __future__ import annotations

import numpy as np
import pytest

from refmtp.params import sub_params
from refmtp.config import preset
from refmtp.verification.gradcheck import check_grad
from refmtp.model import init_params
from refmtp.params import is_bias, layer_prefix
from refmtp.model import forward
from refmtp.model.moe import routing_margin, routing_selection
from refmtp.model.mtp import mtp_backward, mtp_forward
from refmtp.model.ops.embedding import embedding_forward
from refmtp.model.ops.linear import linear_forward


def _module(bk, cfg, k=1, seed=0, std=0.3):
    params = init_params(cfg, seed=seed, backend=bk, std=std, bias_std=0.05)
    layer = cfg.num_hidden_layers + k - 1
    return sub_params(params, layer_prefix(layer)), layer, params


def _check_module(bk, cfg, B, T, seed, with_dy):
    p, layer, _ = _module(bk, cfg, seed=seed)
    rng = np.random.default_rng(seed)
    d = cfg.hidden_size
    inputs = {k: v for k, v in p.items() if not is_bias(k)}
    fixed = {k: v for k, v in p.items() if is_bias(k)}
    inputs["emb"] = bk.asarray(rng.standard_normal((B, T, d)), dtype="float64")
    inputs["h_prev"] = bk.asarray(rng.standard_normal((B, T, d)), dtype="float64")
    positions = bk.xp.arange(T, dtype=bk.xp.int64)
    moe = cfg.is_moe_layer(layer)

    def fwd(emb, h_prev, **q):
        n, y, aux, cache = mtp_forward(emb, h_prev, {**q, **fixed}, cfg, layer, positions)
        out = {"n": n}
        if with_dy:
            out["y"] = y
        if moe:
            out["aux"] = aux
        return out, cache

    def bwd(dout, cache):
        demb, dh, grads = mtp_backward(dout["n"], dout.get("y"), dout.get("aux"), cache)
        return {"emb": demb, "h_prev": dh, **grads}

    _, cache = fwd(**inputs)
    sel = None
    if moe:
        assert routing_margin(cache.block.ffn) > 2e-4
        sel = lambda c: routing_selection(c.block.ffn)  # noqa: E731
    reports = check_grad(fwd, bwd, inputs, seed=seed, max_coords=12, selection=sel)
    assert set(reports) == set(inputs)
    grads = mtp_backward(bk.xp.ones_like(cache.head_norm.x), None, 1.0 if moe else None, cache)[2]
    assert not any(is_bias(k) for k in grads)  # the balancing bias has no gradient


@pytest.mark.parametrize("B,T,seed,with_dy", [(1, 1, 0, False), (2, 3, 1, True), (3, 5, 2, False)])
def test_mtp_module_grad_moe(backend, B, T, seed, with_dy):
    cfg = preset("tiny").replace(refmtp={"seq_aux_alpha": 0.1})
    _check_module(backend, cfg, B, T, seed, with_dy)


def test_mtp_module_grad_dense_block(backend):
    # first_k_dense_replace <= num_hidden_layers, so an MTP block is MoE whenever the model has
    # MoE at all; its dense path is exercised with n_routed_experts = 0 (no MoE anywhere)
    cfg = preset("tiny").replace(n_routed_experts=0)
    assert not cfg.is_moe_layer(cfg.num_hidden_layers)
    _check_module(backend, cfg, 2, 4, 3, True)


def test_embedding_goes_first_in_eh_proj(backend):
    cfg = preset("tiny")
    p, layer, _ = _module(backend, cfg)
    d = cfg.hidden_size
    rng = np.random.default_rng(0)
    emb = backend.asarray(rng.standard_normal((1, 4, d)), dtype="float64")
    h1 = backend.asarray(rng.standard_normal((1, 4, d)), dtype="float64")
    h2 = backend.asarray(rng.standard_normal((1, 4, d)), dtype="float64")
    pos = backend.xp.arange(4, dtype=backend.xp.int64)
    w = backend.to_numpy(p["eh_proj.weight"]).copy()
    w[:, d:] = 0.0  # drop the hnorm(h) half: the module must ignore h_prev
    q = {**p, "eh_proj.weight": backend.asarray(w, dtype="float64")}
    n1 = mtp_forward(emb, h1, q, cfg, layer, pos)[0]
    n2 = mtp_forward(emb, h2, q, cfg, layer, pos)[0]
    np.testing.assert_array_equal(backend.to_numpy(n1), backend.to_numpy(n2))
    # and by hand: x = enorm(emb) @ eh_proj[:, :d]^T feeds the block
    e = backend.to_numpy(emb)
    en = e / np.sqrt((e ** 2).mean(-1, keepdims=True) + cfg.rms_norm_eps)
    cache = mtp_forward(emb, h1, q, cfg, layer, pos)[3]
    np.testing.assert_allclose(backend.to_numpy(cache.block.attn_norm.x), en @ w[:, :d].T, rtol=1e-12)


def test_mtp_module_rejects_shape_mismatch(backend):
    cfg = preset("tiny")
    p, layer, _ = _module(backend, cfg)
    a = backend.zeros((1, 3, cfg.hidden_size))
    b = backend.zeros((1, 2, cfg.hidden_size))
    with pytest.raises(ValueError, match="same"):
        mtp_forward(a, b, p, cfg, layer, backend.xp.arange(3, dtype=backend.xp.int64))


@pytest.mark.parametrize("chain", ["post_norm", "pre_norm"])
def test_model_mtp_matches_megatron_style_rolling(backend, chain):
    """Megatron keeps length T: depth k rolls the ids left by k, runs all T rows and masks the
    last k; causality makes its first T-k rows equal to refmtp's T-k-row formulation (docs/deepseek-v3.md §4.5).
    Positions stay 0..T-1 in both."""
    cfg = preset("tiny").replace(refmtp={"mtp_chain": chain})
    B, T = 2, 6
    _, _, params = _module(backend, cfg, seed=4, std=0.2)
    tok = backend.to_numpy(backend.asarray(
        np.random.default_rng(4).integers(0, cfg.vocab_size, size=(B, T + 1)), dtype="int64"))
    out, _ = forward(params, cfg, backend.asarray(tok, dtype="int64"))
    xp = backend.xp
    pos = xp.arange(T, dtype=xp.int64)
    h = out.hidden  # h^0 after model.norm, (B, T, d)
    for k in range(1, cfg.D + 1):
        rolled = np.roll(tok[:, :T], -k, axis=1)  # t_{i+k} at row i; the last k rows wrap (garbage)
        emb, _ = embedding_forward(backend.asarray(rolled, dtype="int64"), params["model.embed_tokens.weight"])
        p = sub_params(params, layer_prefix(cfg.num_hidden_layers + k - 1))
        n, y, _, _ = mtp_forward(emb, h, p, cfg, cfg.num_hidden_layers + k - 1, pos)  # all T rows
        logits, _ = linear_forward(n, params["lm_head.weight"])
        # MoE blocks see different row counts -> expert matmuls may differ in the last bit
        np.testing.assert_allclose(backend.to_numpy(logits)[:, :T - k],
                                   backend.to_numpy(out.mtp_logits[k - 1]), rtol=1e-10, atol=1e-12)
        h = n if chain == "post_norm" else y


def test_row_zero_uses_the_embedding_unmasked(backend):
    # Depth k row i reads Emb(t_{i+k}): at row 0 that is Emb(t_k), a real token, and refmtp
    # does not zero it (V3 eq. 21 masks nothing). vLLM's DeepSeekMTP zeroes the embedding where
    # positions == 0 (vllm-project/vllm#33299 reports it as a divergence from training).
    # Row 0 of depth 1 depends on h^0_0 (token t_0 only, causal) and Emb(t_1): changing the
    # embedding row of t_1 must change it.
    cfg = preset("tiny").replace(num_nextn_predict_layers=1)
    params = init_params(cfg, seed=3, backend=backend, std=0.2)
    tokens = backend.asarray(np.array([[5, 9, 11, 13, 17]]), dtype="int64")
    out1, _ = forward(params, cfg, tokens, need_cache=False)
    emb = backend.to_numpy(params["model.embed_tokens.weight"]).copy()
    emb[9] += 0.5
    params["model.embed_tokens.weight"] = backend.asarray(emb, dtype="float64")
    out2, _ = forward(params, cfg, tokens, need_cache=False)
    row0 = lambda o: backend.to_numpy(o.mtp_logits[0])[0, 0]  # noqa: E731
    main0 = lambda o: backend.to_numpy(o.logits)[0, 0]  # noqa: E731
    np.testing.assert_array_equal(main0(out1), main0(out2))  # h^0_0 does not see t_1
    assert np.max(np.abs(row0(out1) - row0(out2))) > 1e-6  # MTP row 0 does
