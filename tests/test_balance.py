"""Balance losses (V3 eqs. 17-20, V2 expert-level), the bias update and load statistics."""
from __future__ import annotations

import numpy as np
import pytest

from refmtp.model.balance import (balance_loss_backward, balance_loss_forward, expert_balance_loss_forward,
                            expert_load_stats, seq_balance_loss_forward, update_bias)
from refmtp.verification.gradcheck import check_grad
from refmtp.model.router import sigmoid, softmax

SHAPES = [(1, 1, 4, 2), (2, 3, 5, 2), (3, 7, 8, 3), (2, 4, 6, 5)]  # (B, T, E, K)


def _seq_oracle(s, K):
    """Eqs. 17-20 (without alpha) per sequence with explicit loops, averaged over the batch."""
    B, T, E = s.shape
    total = 0.0
    for b in range(B):
        f = np.zeros(E)
        P = np.zeros(E)
        for t in range(T):
            top = sorted(range(E), key=lambda i: (-s[b, t, i], i))[:K]  # unbiased, ungrouped
            for i in top:
                f[i] += E / (K * T)
            P += s[b, t] / s[b, t].sum() / T
        total += float(f @ P)
    return total / B


def _expert_oracle(s, idx):
    B, T, E = s.shape
    K = idx.shape[-1]
    f = np.zeros(E)
    for i in idx.reshape(-1):
        f[i] += E / (K * B * T)
    P = (s / s.sum(-1, keepdims=True)).reshape(-1, E).mean(0)
    return float(f @ P)


def _scores(backend, B, T, E, seed, kind="sigmoid"):
    rng = np.random.default_rng(seed)
    z = backend.asarray(rng.standard_normal((B, T, E)) * 2, dtype="float64")
    return sigmoid(z, backend.xp) if kind == "sigmoid" else softmax(z, backend.xp)


@pytest.mark.parametrize("B,T,E,K", SHAPES)
def test_seq_loss_matches_oracle(backend, B, T, E, K):
    s = _scores(backend, B, T, E, seed=1)
    loss, cache = seq_balance_loss_forward(s, K)
    assert loss.shape == ()
    np.testing.assert_allclose(float(loss), _seq_oracle(backend.to_numpy(s), K), rtol=1e-13)
    # f sums to E per sequence (each token contributes K/(K T) * E in total)
    np.testing.assert_allclose(backend.to_numpy(cache.f).sum(-1), E, rtol=1e-13)


@pytest.mark.parametrize("B,T,E,K", SHAPES)
def test_expert_loss_matches_oracle(backend, B, T, E, K):
    s = _scores(backend, B, T, E, seed=2, kind="softmax")
    rng = np.random.default_rng(3)
    idx = np.stack([rng.permutation(E)[:K] for _ in range(B * T)]).reshape(B, T, K)
    loss, _ = expert_balance_loss_forward(s, backend.asarray(idx, dtype="int64"))
    np.testing.assert_allclose(float(loss), _expert_oracle(backend.to_numpy(s), idx), rtol=1e-13)


def test_seq_loss_is_per_sequence_not_per_batch(backend):
    """Two sequences with opposite preferences: balanced over the batch, not per sequence."""
    E, K, T = 4, 1, 3
    s = np.full((2, T, E), 0.1)
    s[0, :, 0] = 0.9  # sequence 0 always picks expert 0
    s[1, :, 3] = 0.9  # sequence 1 always picks expert 3
    loss, _ = seq_balance_loss_forward(backend.asarray(s, dtype="float64"), K)
    # per sequence: f = (4, 0, 0, 0), P_0 = 0.9 / 1.2 = 0.75 -> L = 3.0 for both sequences;
    # over the batch: f_0 = f_3 = 2, P_0 = P_3 = (0.75 + 0.1 / 1.2) / 2 -> L = 5/3
    np.testing.assert_allclose(float(loss), 3.0, rtol=1e-14)
    idx = backend.asarray(np.argmax(s, -1)[..., None], dtype="int64")
    loss_e, _ = expert_balance_loss_forward(backend.asarray(s, dtype="float64"), idx)
    np.testing.assert_allclose(float(loss_e), 5 / 3, rtol=1e-14)


@pytest.mark.parametrize("B,T,E,K", SHAPES)
@pytest.mark.parametrize("kind", ["seq", "expert"])
def test_balance_gradcheck(backend, B, T, E, K, kind):
    s = _scores(backend, B, T, E, seed=4)
    idx = backend.asarray(np.argsort(-backend.to_numpy(s), -1, kind="stable")[..., :K], dtype="int64")
    sn = np.sort(backend.to_numpy(s), -1)[..., ::-1]
    if K < E:  # the eq. 18 top-K must not flip under the perturbation
        assert (sn[..., K - 1] - sn[..., K]).min() > 1e-4

    def fwd(s):
        return balance_loss_forward(s, idx, kind)

    def bwd(d, c):
        return {"s": balance_loss_backward(d, c)}

    check_grad(fwd, bwd, {"s": s}, selection=lambda c: c.count_idx)


def test_all_experts_selected_gives_one(backend):
    """K = E: every f_i = 1 and sum_i P_i = 1, so the loss is exactly 1 and its gradient 0."""
    s = _scores(backend, 2, 3, 5, seed=8)
    loss, c = seq_balance_loss_forward(s, 5)
    np.testing.assert_allclose(float(loss), 1.0, rtol=1e-15)
    np.testing.assert_allclose(backend.to_numpy(balance_loss_backward(1.0, c)), 0.0, atol=1e-15)


def test_softmax_scores_normalisation_is_identity(backend):
    s = _scores(backend, 2, 3, 5, seed=5, kind="softmax")
    _, c = seq_balance_loss_forward(s, 2)
    np.testing.assert_allclose(backend.to_numpy(c.s_norm).reshape(2, 3, 5), backend.to_numpy(s),
                               rtol=1e-15)


def test_none_kind_is_zero(backend):
    s = _scores(backend, 2, 3, 5, seed=6)
    loss, cache = balance_loss_forward(s, backend.zeros((2, 3, 2), dtype="int64"), "none")
    assert float(loss) == 0.0 and cache is None
    with pytest.raises(ValueError, match="choose one of seq, expert, none"):
        balance_loss_forward(s, backend.zeros((2, 3, 2), dtype="int64"), "aux")


def test_balance_backward_is_pure(backend):
    s = _scores(backend, 2, 3, 5, seed=7)
    loss, c = seq_balance_loss_forward(s, 2)
    f0 = backend.to_numpy(c.f).copy()
    a, b = balance_loss_backward(0.7, c), balance_loss_backward(0.7, c)
    np.testing.assert_array_equal(backend.to_numpy(a), backend.to_numpy(b))
    np.testing.assert_array_equal(backend.to_numpy(c.f), f0)
    assert a is not b


def test_update_bias_sign_rule(backend):
    bias = backend.asarray(np.array([0.5, -0.25, 0.0, 1.0]), dtype="float32")
    load = backend.asarray(np.array([10, 2, 4, 4]), dtype="int64")  # mean 5
    new = update_bias(bias, load, 0.001)
    assert new.dtype == backend.xp.float32 and new is not bias
    expect = np.array([0.5, -0.25, 0.0, 1.0], dtype=np.float32) + np.float32(0.001) * np.array(
        [-1, 1, 1, 1], dtype=np.float32)
    np.testing.assert_array_equal(backend.to_numpy(new), expect)
    np.testing.assert_array_equal(backend.to_numpy(bias), [0.5, -0.25, 0.0, 1.0])  # not mutated
    same = update_bias(bias, backend.asarray(np.array([3, 3, 3, 3]), dtype="int64"), 0.1)
    np.testing.assert_array_equal(backend.to_numpy(same), backend.to_numpy(bias))  # at the mean: 0


def test_update_bias_errors(backend):
    load = backend.asarray(np.array([1, 2]), dtype="int64")
    with pytest.raises(ValueError, match="must stay float32"):
        update_bias(backend.zeros((2,), dtype="float64"), load, 0.001)
    with pytest.raises(ValueError, match="must both be"):
        update_bias(backend.zeros((3,), dtype="float32"), load, 0.001)
    with pytest.raises(ValueError, match="gamma"):
        update_bias(backend.zeros((2,), dtype="float32"), load, -1.0)


def test_expert_load_stats(backend):
    st = expert_load_stats(backend.asarray(np.array([6, 2, 0, 4]), dtype="int64"))
    assert st["load"] == [6, 2, 0, 4] and st["total"] == 12 and st["mean"] == 3.0
    assert st["max"] == 6 and st["min"] == 0
    assert st["max_over_mean"] == 2.0 and st["min_over_mean"] == 0.0
    empty = expert_load_stats(backend.zeros((3,), dtype="int64"))
    assert empty["max_over_mean"] == 0.0


def test_shape_errors(backend):
    with pytest.raises(ValueError, match=r"must be \(B, T, E\)"):
        seq_balance_loss_forward(backend.zeros((3, 4)), 2)
    with pytest.raises(ValueError, match="K=5"):
        seq_balance_loss_forward(backend.zeros((1, 3, 4)), 5)
