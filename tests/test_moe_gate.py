"""The DeepSeekMoE router (refmtp.model.router): forward against a per-token oracle written from the
docs/deepseek-v3.md (§3.2-3.3), -inf group masking, tie-breaking, float64 gradient checks, errors."""
from __future__ import annotations

import math

import numpy as np
import pytest

from refmtp.config import ModelConfig, preset
from refmtp.verification.gradcheck import check_grad
from refmtp.model.router import (RouterGrads, check_router, gate_scale, router_backward, router_forward,
                                 router_margin)

# (scoring_func, topk_method, norm_topk_prob, E, K, G, TG)
ROUTERS = [
    ("sigmoid", "noaux_tc", True, 8, 3, 4, 2),  # V3, group-limited
    ("sigmoid", "noaux_tc", False, 6, 2, 1, 1),  # V3 without groups, no renormalisation
    ("sigmoid", "noaux_tc", True, 12, 4, 3, 3),  # every group kept
    ("softmax", "greedy", False, 7, 3, 1, 1),  # V2-Lite
    ("softmax", "group_limited_greedy", False, 8, 3, 4, 2),  # V2, group score = max
    ("softmax", "group_limited_greedy", True, 9, 2, 3, 1),
    ("softmax", "greedy", True, 7, 3, 1, 1),  # softmax + norm_topk_prob: weights sum to 1, no rho
]


def _cfg(scoring, method, norm, E, K, G, TG, d=6, rho=2.5) -> ModelConfig:
    return ModelConfig(hidden_size=d, n_routed_experts=E, num_experts_per_tok=K, n_group=G,
                       topk_group=TG, scoring_func=scoring, topk_method=method,
                       norm_topk_prob=norm, routed_scaling_factor=rho).validate()


def _oracle(x, W, b, cfg):
    """Per-token routing in plain Python, straight from docs/deepseek-v3.md §3.2 / §3.3 (ties: lowest index)."""
    E, K, G, TG = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
    m = E // G
    idx_out, w_out = [], []
    for xt in x:
        z = [float(np.dot(W[e], xt)) for e in range(E)]
        if cfg.scoring_func == "sigmoid":
            s = [1.0 / (1.0 + math.exp(-v)) for v in z]
            sc = [s[e] + float(b[e]) for e in range(E)]
        else:
            mx = max(z)
            ex = [math.exp(v - mx) for v in z]
            s = [v / sum(ex) for v in ex]
            sc = s
        if cfg.topk_method == "greedy":
            cand = list(range(E))
        else:
            gs = []
            for g in range(G):
                vals = sorted(sc[g * m:(g + 1) * m], reverse=True)
                gs.append(vals[0] + vals[1] if cfg.scoring_func == "sigmoid" else vals[0])
            kept = sorted(range(G), key=lambda g: (-gs[g], g))[:TG]
            cand = [e for e in range(E) if e // m in kept]
        sel = sorted(cand, key=lambda e: (-sc[e], e))[:K]
        w = [s[e] for e in sel]
        rho = cfg.routed_scaling_factor
        if cfg.norm_topk_prob:
            tot = sum(w) + 1e-20
            w = [v / tot for v in w]
            if cfg.scoring_func == "softmax":
                rho = 1.0  # DeepSeek-V2 hub code: normalise OR scale, never both
        idx_out.append(sel)
        w_out.append([v * rho for v in w])
    return np.array(idx_out), np.array(w_out)


def _inputs(backend, cfg, N, seed, dtype="float64", bias_std=0.3, w_std=1.0):
    rng = np.random.default_rng(seed)
    E, d = cfg.n_routed_experts, cfg.hidden_size
    x = backend.asarray(rng.standard_normal((N, d)), dtype=dtype)
    W = backend.asarray(rng.standard_normal((E, d)) * w_std, dtype=dtype)
    b = None
    if cfg.topk_method == "noaux_tc":
        b = backend.asarray(rng.standard_normal(E) * bias_std, dtype="float32")
    return x, W, b


@pytest.mark.parametrize("router", ROUTERS, ids=lambda r: f"{r[1]}-norm{int(r[2])}-E{r[3]}G{r[5]}")
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_router_matches_oracle(backend, router, dtype):
    cfg = _cfg(*router)
    x, W, b = _inputs(backend, cfg, 23, seed=1, dtype=dtype)
    idx, w, cache = router_forward(x, W, b, cfg)
    xn, Wn = backend.to_numpy(x).astype(np.float64), backend.to_numpy(W).astype(np.float64)
    bn = None if b is None else backend.to_numpy(b)
    ridx, rw = _oracle(xn, Wn, bn, cfg)
    if dtype == "float64":
        np.testing.assert_array_equal(backend.to_numpy(idx), ridx)
        np.testing.assert_allclose(backend.to_numpy(w), rw, rtol=1e-13, atol=1e-15)
    else:  # float32 may resolve a near-tie differently: compare where the selection agrees
        same = (backend.to_numpy(idx) == ridx).all(axis=1)
        assert same.mean() > 0.9
        np.testing.assert_allclose(backend.to_numpy(w)[same], rw[same], rtol=2e-5, atol=1e-6)
    assert idx.dtype == backend.xp.int64 and w.dtype == x.dtype
    assert idx.shape == w.shape == (23, cfg.num_experts_per_tok)


def test_router_deepseek_v3_dimensions(backend):
    """The published routing (256 experts, 8 groups, top-4 groups, K=8) on a few tokens."""
    v3 = preset("deepseek-v3")
    x, W, b = _inputs(backend, v3, 3, seed=2, w_std=0.02)
    idx, w, _ = router_forward(x, W, b, v3)
    ridx, rw = _oracle(backend.to_numpy(x), backend.to_numpy(W), backend.to_numpy(b), v3)
    np.testing.assert_array_equal(backend.to_numpy(idx), ridx)
    np.testing.assert_allclose(backend.to_numpy(w), rw, rtol=1e-12)
    # the experts of each token come from at most topk_group=4 of the 8 groups of 32
    for row in backend.to_numpy(idx):
        assert len(set(row // 32)) <= 4
    np.testing.assert_allclose(backend.to_numpy(w).sum(-1), 2.5, rtol=1e-12)  # norm, then rho


def test_masked_groups_get_minus_inf_not_zero(backend):
    """With negative biased scores a 0-mask would let a dropped group win; -inf never does."""
    cfg = _cfg("sigmoid", "noaux_tc", True, 8, 2, 4, 1)
    rng = np.random.default_rng(3)
    x = backend.asarray(rng.standard_normal((40, 6)), dtype="float64")
    W = backend.asarray(rng.standard_normal((8, 6)), dtype="float64")
    b = backend.asarray(np.full(8, -5.0), dtype="float32")  # every biased score < 0
    idx, _, cache = router_forward(x, W, b, cfg)
    gs = backend.to_numpy(cache.group_scores)
    kept = np.argmax(gs, axis=1)  # topk_group = 1
    np.testing.assert_array_equal(backend.to_numpy(idx) // 2, np.stack([kept, kept], 1))


def test_ties_resolve_to_lowest_index(backend):
    """x = 0 makes every affinity 0.5: groups and experts tie, the lowest indices win."""
    cfg = _cfg("sigmoid", "noaux_tc", True, 8, 3, 4, 2)
    x = backend.zeros((3, 6))
    W = backend.asarray(np.random.default_rng(4).standard_normal((8, 6)), dtype="float64")
    b = backend.zeros((8,), dtype="float32")
    idx, w, _ = router_forward(x, W, b, cfg)
    np.testing.assert_array_equal(backend.to_numpy(idx), [[0, 1, 2]] * 3)
    np.testing.assert_allclose(backend.to_numpy(w), 2.5 / 3)
    cfg2 = _cfg("softmax", "greedy", False, 5, 2, 1, 1, rho=1.0)
    idx, w, _ = router_forward(x, W[:5], None, cfg2)
    np.testing.assert_array_equal(backend.to_numpy(idx), [[0, 1]] * 3)
    np.testing.assert_allclose(backend.to_numpy(w), 0.2)  # softmax of equal logits, unnormalised


def test_bias_changes_selection_but_not_gate_values(backend):
    cfg = _cfg("sigmoid", "noaux_tc", False, 6, 2, 1, 1)
    x, W, _ = _inputs(backend, cfg, 1, seed=5)
    zero = backend.zeros((6,), dtype="float32")
    idx0, w0, c0 = router_forward(x, W, zero, cfg)
    # push the least-liked expert far up: it is now selected, with its UNBIASED affinity
    worst = int(np.argmin(backend.to_numpy(c0.s)[0]))
    big = backend.asarray(np.where(np.arange(6) == worst, 10.0, 0.0), dtype="float32")
    idx1, w1, c1 = router_forward(x, W, big, cfg)
    assert int(backend.to_numpy(idx1)[0, 0]) == worst
    np.testing.assert_allclose(backend.to_numpy(w1)[0, 0], 2.5 * backend.to_numpy(c1.s)[0, worst])


@pytest.mark.parametrize("router", ROUTERS, ids=lambda r: f"{r[1]}-norm{int(r[2])}-E{r[3]}G{r[5]}")
@pytest.mark.parametrize("N", [1, 5])
@pytest.mark.parametrize("with_dscores", [False, True])
def test_router_gradcheck(backend, router, N, with_dscores):
    cfg = _cfg(*router)
    for seed in range(20):  # a fixture with a clear score gap: no perturbation flips a choice
        x, W, b = _inputs(backend, cfg, N, seed=10 + seed)
        if router_margin(router_forward(x, W, b, cfg)[2]) > 1e-3:
            break
    else:
        pytest.fail("no fixture with a score gap > 1e-3 in 20 seeds")
    E = cfg.n_routed_experts
    ds = backend.asarray(np.random.default_rng(7).standard_normal((N, E)), dtype="float64")

    def fwd(x, weight):
        idx, w, c = router_forward(x, weight, b, cfg)
        if with_dscores:  # an extra scalar head on s: sum(s * ds), as the balance loss adds
            return (w, backend.xp.sum(c.s * ds)), c
        return w, c

    def bwd(d, c):
        if with_dscores:
            g = router_backward(d[0], c, ds * d[1])
        else:
            g = router_backward(d, c)
        return {"x": g.dx, "weight": g.dweight}

    check_grad(fwd, bwd, {"x": x, "weight": W}, selection=lambda c: c.topk_idx)


def test_router_grads_have_no_bias_field():
    assert RouterGrads._fields == ("dx", "dweight")


def test_router_backward_is_pure(backend):
    cfg = _cfg(*ROUTERS[0])
    x, W, b = _inputs(backend, cfg, 4, seed=8)
    _, w, c = router_forward(x, W, b, cfg)
    d = backend.asarray(np.random.default_rng(9).standard_normal(w.shape), dtype="float64")
    s0 = backend.to_numpy(c.s).copy()
    g1, g2 = router_backward(d, c), router_backward(d, c)
    np.testing.assert_array_equal(backend.to_numpy(g1.dweight), backend.to_numpy(g2.dweight))
    np.testing.assert_array_equal(backend.to_numpy(c.s), s0)


def test_router_errors(backend):
    cfg = _cfg(*ROUTERS[0])
    x, W, b = _inputs(backend, cfg, 2, seed=0)
    with pytest.raises(ValueError, match="float32"):
        check_router(x, W, backend.asarray(backend.to_numpy(b), dtype="float64"), cfg)
    with pytest.raises(ValueError, match="float32"):
        check_router(x, W, None, cfg)
    with pytest.raises(ValueError, match=r"expected \(8, 6\)"):
        check_router(x, W[:7], b, cfg)
    v2 = _cfg(*ROUTERS[3])
    x2, W2, _ = _inputs(backend, v2, 2, seed=0)
    with pytest.raises(ValueError, match="uses no e_score_correction_bias"):
        check_router(x2, W2, backend.zeros((7,), dtype="float32"), v2)


def test_sigmoid_does_not_overflow(backend):
    cfg = _cfg("sigmoid", "noaux_tc", True, 6, 2, 1, 1)
    x = backend.asarray(np.array([[1000.0, -1000.0, 0, 0, 0, 0]]), dtype="float64")
    W = backend.asarray(np.eye(6), dtype="float64")
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow to 0 is fine
        _, w, c = router_forward(x, W, backend.zeros((6,), dtype="float32"), cfg)
    s = backend.to_numpy(c.s)[0]
    assert s[0] == 1.0 and s[1] == 0.0 and np.isfinite(backend.to_numpy(w)).all()


# ------------------------------------------------------------------------------------------
# gate-value conventions (docs/math-decisions.md)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scoring, method, norm, want", [
    ("sigmoid", "noaux_tc", True, 2.5),  # V3: normalise, then times rho (HF, DeepSeek, V3 hub)
    ("softmax", "greedy", True, 1.0),  # V2 hub code: normalise INSTEAD of scaling
    ("softmax", "group_limited_greedy", True, 1.0),
])
def test_normalised_weights_sum(backend, scoring, method, norm, want):
    G, TG = (1, 1) if method == "greedy" else (4, 2)
    cfg = _cfg(scoring, method, norm, 8, 3, G, TG, rho=2.5)
    assert gate_scale(cfg) == want
    x, W, b = _inputs(backend, cfg, 17, seed=4)
    _, w, _ = router_forward(x, W, b, cfg)
    np.testing.assert_allclose(backend.to_numpy(w).sum(axis=-1), want, rtol=1e-14)


@pytest.mark.parametrize("scoring, method", [("sigmoid", "noaux_tc"), ("softmax", "greedy"),
                                             ("softmax", "group_limited_greedy")])
def test_unnormalised_weights_are_rho_times_s(backend, scoring, method):
    G, TG = (1, 1) if method == "greedy" else (4, 2)
    cfg = _cfg(scoring, method, False, 8, 3, G, TG, rho=16.0)
    assert gate_scale(cfg) == 16.0
    x, W, b = _inputs(backend, cfg, 9, seed=5)
    idx, w, c = router_forward(x, W, b, cfg)
    s = backend.to_numpy(c.s)
    want = 16.0 * np.take_along_axis(s, backend.to_numpy(idx), axis=-1)
    np.testing.assert_allclose(backend.to_numpy(w), want, rtol=1e-15)


@pytest.mark.parametrize("scoring, method, want", [("sigmoid", "noaux_tc", 2.5),
                                                   ("softmax", "greedy", 1.0)])
def test_single_expert_is_renormalised(backend, scoring, method, want):
    # K = 1 with norm_topk_prob: refmtp normalises (HF DeepseekV3TopkRouter, DeepSeek's
    # inference/model.py), so the one expert gets exactly gate_scale: rho for V3. The V3 hub
    # code and Megatron skip the normalisation at K = 1 (weight rho * s).
    cfg = _cfg(scoring, method, True, 6, 1, 1, 1, rho=2.5)
    x, W, b = _inputs(backend, cfg, 11, seed=6)
    _, w, c = router_forward(x, W, b, cfg)
    assert w.shape == (11, 1)
    np.testing.assert_allclose(backend.to_numpy(w), want, rtol=1e-14)
    assert float(backend.xp.max(c.s)) < 1.0  # so an unnormalised weight would differ


def test_group_score_is_the_top2_sum(backend):
    # V3 group score = sum of the top-2 biased scores (HF, DeepSeek inference, the V3 hub code).
    # Megatron's group_limited_topk sums the top-(K/topk_group) instead: the same for V3 (8/4 = 2)
    # but not here (K/topk_group = 4/1 = 4), and the V2 max picks differently too.
    p = np.array([[0.95, 0.60, 0.05, 0.05, 0.70, 0.70, 0.70, 0.70],   # top-2: g0; top-4: g1
                  [0.90, 0.10, 0.10, 0.10, 0.80, 0.80, 0.10, 0.10]])  # top-2: g1; max: g0
    cfg = _cfg("sigmoid", "noaux_tc", True, 8, 4, 2, 1, d=8)
    x = backend.asarray(np.ones((2, 8)), dtype="float64")
    W = backend.asarray(np.diag(np.log(p[0] / (1 - p[0]))), dtype="float64")
    idx0, _, c0 = router_forward(x[:1], W, backend.asarray(np.zeros(8), dtype="float32"), cfg)
    W = backend.asarray(np.diag(np.log(p[1] / (1 - p[1]))), dtype="float64")
    idx1, _, c1 = router_forward(x[1:], W, backend.asarray(np.zeros(8), dtype="float32"), cfg)
    np.testing.assert_allclose(backend.to_numpy(c0.group_scores)[0], [1.55, 1.40], rtol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(c1.group_scores)[0], [1.00, 1.60], rtol=1e-12)
    assert sorted(backend.to_numpy(idx0)[0].tolist()) == [0, 1, 2, 3]  # group 0 kept
    assert sorted(backend.to_numpy(idx1)[0].tolist()) == [4, 5, 6, 7]  # group 1 kept
