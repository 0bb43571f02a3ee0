"""Sampled runs against the exact law (docs/speculative-decoding.md §7, T-CHI2).

Drafts are drawn from q, coins from PCG64 in the RNG-v1 order (R9), and the observed outcome
cells (A, emitted tokens) are compared with the closed forms of docs/speculative-decoding.md §1.3 by Pearson's
chi-square (cells with expected count < 5 merged; an observation in a probability-0 cell fails
outright). Fixed seeds make every run identical. Negative controls (always accept; resample
from p on rejection; draft and accept test sharing one uniform) use the same N and the same test
and must be rejected, so the test has power.
"""
from __future__ import annotations

import itertools
from collections import Counter
from fractions import Fraction as F

import numpy as np
import pytest
from scipy import stats

from refmtp.inference.acceptance import verify_drafts, verify_drafts_batch
from refmtp.inference.sampling import (exp_from_uniform, exp_race, gumbel, gumbel_from_uniform,
                                      rng_v1_draws_batch)

ALPHA = 1e-6  # reject when the chi-square tail probability is below this (docs/speculative-decoding.md §7 item 4)


def dyadic_rows(rng, V, n, bits=5):
    """n dyadic distributions over V tokens (exact as floats and Fractions)."""
    rows = []
    for _ in range(n):
        counts = rng.multinomial(2 ** bits, rng.dirichlet(np.full(V, 1.0)))
        rows.append([F(int(c), 2 ** bits) for c in counts])
    return rows


def make_tables(V, K, seed):
    """Prefix-dependent tables P[prefix], Q[prefix] for every prefix up to length K."""
    rng = np.random.default_rng(seed)
    prefixes = [pre for L in range(K + 1) for pre in itertools.product(range(V), repeat=L)]
    P = dict(zip(prefixes, dyadic_rows(rng, V, len(prefixes))))
    Q = dict(zip(prefixes, dyadic_rows(rng, V, len(prefixes))))
    return P, Q


def exact_law(P, Q, K, V, one_hot_token=None):
    """docs/speculative-decoding.md §1.3 closed forms: {(A, tokens): probability} (one_hot_token: prefix -> draft)."""
    law = {}

    def q_row(prefix):
        if one_hot_token is None:
            return Q[prefix]
        return [F(int(i == one_hot_token(prefix))) for i in range(V)]

    def rec(prefix, j, mass):
        p = P[prefix]
        if j == K:
            for y in range(V):
                law[(K, prefix + (y,))] = law.get((K, prefix + (y,)), 0) + mass * p[y]
            return
        q = q_row(prefix)
        for y in range(V):
            law[(j, prefix + (y,))] = law.get((j, prefix + (y,)), 0) + mass * max(p[y] - q[y], 0)
        for x in range(V):
            if min(p[x], q[x]):
                rec(prefix + (x,), j + 1, mass * min(p[x], q[x]))

    rec((), 0, F(1))
    return law


def chi2_pvalue(counts: Counter, law: dict, N: int) -> float:
    """Pearson chi-square tail probability; cells with expected < 5 pooled into one bin."""
    if any(law.get(cell, 0) == 0 for cell in counts):
        return 0.0  # an impossible outcome was observed
    big = [c for c, pr in law.items() if pr * N >= 5]
    small = [c for c, pr in law.items() if 0 < pr * N < 5]
    obs = [counts.get(c, 0) for c in big]
    exp = [float(law[c]) * N for c in big]
    if small:
        obs.append(sum(counts.get(c, 0) for c in small))
        exp.append(sum(float(law[c]) for c in small) * N)
    obs, exp = np.array(obs, dtype=float), np.array(exp)
    stat = float(np.sum((obs - exp) ** 2 / exp))
    return float(stats.chi2.sf(stat, len(obs) - 1))


def dense(T, K, V):
    """Float arrays per prefix length: level k has shape (V,)*k + (V,), level[k][d_<k] = T[d_<k]."""
    levels = []
    for k in range(K + 1):
        a = np.zeros((V,) * k + (V,))
        for pre in itertools.product(range(V), repeat=k):
            a[pre] = [float(x) for x in T[pre]]
        levels.append(a)
    return levels


def rows_at(levels, k, drafts):
    """(N, V): the level-k row after each request's drafted prefix d_<k."""
    if k == 0:
        return np.broadcast_to(levels[0], (drafts.shape[0], levels[0].shape[-1]))
    return levels[k][tuple(drafts[:, :k].T)]


def sample_step_inputs(P, Q, K, V, N, seed):
    """Drafts d_k ~ Q[d_<k] (inverse CDF on their own uniforms), p/q rows, and RNG-v1 coins (R9)."""
    gen = np.random.Generator(np.random.PCG64(seed))
    Pd, Qd = dense(P, K, V), dense(Q, K, V)
    v_draft = gen.random((N, K))  # (N, K) the drafter's uniforms
    drafts = np.zeros((N, K), dtype=np.int64)
    for k in range(K):
        rows = rows_at(Qd, k, drafts)  # (N, V) q_k given the drafted prefix
        cdf = np.cumsum(rows, axis=1)  # (N, V)
        drafts[:, k] = np.sum(cdf <= (v_draft[:, k] * cdf[:, -1])[:, None], axis=1)  # first cdf > v*S
    p = np.stack([rows_at(Pd, k, drafts) for k in range(K + 1)], axis=1)  # (N, K+1, V)
    q = np.stack([rows_at(Qd, k, drafts) for k in range(K)], axis=1)  # (N, K, V)
    u_accept, u_sample = rng_v1_draws_batch(gen, N, K)
    return p, q, drafts, u_accept, u_sample, v_draft


def outcome_counts(num_accepted, tokens):
    return Counter((int(A), tuple(int(t) for t in row[: A + 1])) for A, row in zip(num_accepted, tokens))


def _batch(bk, *args):
    """verify_drafts_batch on backend ``bk`` (inputs moved there), the verdict back on the host."""
    out = verify_drafts_batch(*[a if a is None or isinstance(a, bool) else bk.asarray(a) for a in args])
    return type(out)(*[bk.to_numpy(x) for x in out])


def test_rng_v1_outcomes_match_exact_law_and_controls_fail(backend):
    """The scalar rule runs on numpy (a Python loop over N); the batched one on ``backend``."""
    V, K, N = 4, 2, 20000
    P, Q = make_tables(V, K, seed=3)
    law = exact_law(P, Q, K, V)
    assert sum(law.values()) == 1
    p, q, drafts, u_accept, u_sample, v_draft = sample_step_inputs(P, Q, K, V, N, seed=10)
    # the audited scalar function, step by step
    scalar = Counter()
    for n in range(N):
        v = verify_drafts(p[n], q[n], drafts[n], u_accept[n], u_sample[n])
        scalar[(v.num_accepted, v.tokens)] += 1
    assert chi2_pvalue(scalar, law, N) > ALPHA
    out = _batch(backend, p, q, drafts, u_accept, u_sample, False)
    assert outcome_counts(out.num_accepted, out.tokens) == scalar  # same coins, same outcomes
    # negative controls, same N and test
    controls = {}
    bad = _batch(backend, p, q, drafts, np.zeros_like(u_accept), u_sample, False)  # coin hard-coded to 0
    controls["accept-all (u=0)"] = outcome_counts(bad.num_accepted, bad.tokens)
    p_A = p[np.arange(N), out.num_accepted][:, None, :]  # (N, 1, V) the target row at the stop
    y = _batch(backend, p_A, None, np.zeros((N, 0), np.int64), np.zeros((N, 0)), u_sample, False).tokens[:, 0]
    resampled = np.where(out.is_bonus, out.tokens[np.arange(N), out.num_accepted], y)  # ICDF(p_j) on rejection
    tok = out.tokens.copy()
    tok[np.arange(N), out.num_accepted] = resampled
    controls["resample-from-p"] = outcome_counts(out.num_accepted, tok)
    shared = _batch(backend, p, q, drafts, v_draft, u_sample, False)  # draft uniform reused as coin
    controls["shared-noise"] = outcome_counts(shared.num_accepted, shared.tokens)
    for name, counts in controls.items():
        pv = chi2_pvalue(counts, law, N)
        assert pv < ALPHA, f"negative control {name} was not rejected (p = {pv})"


def test_batch_one_hot_drafter_k3_matches_exact_law(backend):
    """verify_drafts_batch (kernel path) with a deterministic drafter, K = 3, N = 50 000."""
    V, K, N = 4, 3, 50000
    P, Q = make_tables(V, K, seed=4)
    drafter = {pre: int(np.argmax([float(x) for x in Q[pre]])) for pre in Q}  # argmax drafts
    law = exact_law(P, Q, K, V, one_hot_token=lambda pre: drafter[pre])
    d, pre = [], ()
    for _ in range(K):
        d.append(drafter[pre])
        pre += (d[-1],)
    p_rows = np.array([[float(x) for x in P[tuple(d[:k])]] for k in range(K + 1)])
    gen = np.random.Generator(np.random.PCG64(11))
    u_accept, u_sample = rng_v1_draws_batch(gen, N, K)
    out = _batch(backend, np.broadcast_to(p_rows, (N, K + 1, V)).copy(), None,
                 np.tile(np.array(d), (N, 1)), u_accept, u_sample, False)
    assert chi2_pvalue(outcome_counts(out.num_accepted, out.tokens), law, N) > ALPHA
    # A against prod a_k (docs/speculative-decoding.md §1.3, conditional on the fixed drafts) and E[A]
    a = [min(1.0, p_rows[k, d[k]]) for k in range(K)]
    pA = [np.prod(a[:j]) * (1 - a[j]) for j in range(K)] + [np.prod(a)]
    obs = np.bincount(out.num_accepted, minlength=K + 1)
    keep = np.array(pA) * N >= 5
    stat = np.sum((obs[keep] - N * np.array(pA)[keep]) ** 2 / (N * np.array(pA)[keep]))
    assert stats.chi2.sf(stat, keep.sum() - 1) > ALPHA
    EA = sum(j * pA[j] for j in range(K + 1))
    sd = np.sqrt(sum((j - EA) ** 2 * pA[j] for j in range(K + 1)) / N)
    assert abs(out.num_accepted.mean() - EA) < 5 * sd
    # control with the same N and test: coins hard-coded to 0 accept every draft with p(d) > 0
    assert all(p_rows[k, d[k]] > 0 for k in range(K))
    bad = _batch(backend, np.broadcast_to(p_rows, (N, K + 1, V)).copy(), None, np.tile(np.array(d), (N, 1)),
                 np.zeros((N, K)), u_sample, False)
    assert bad.is_bonus.all()
    assert chi2_pvalue(outcome_counts(bad.num_accepted, bad.tokens), law, N) < ALPHA


@pytest.mark.parametrize("sampler", ["exp_race", "gumbel"])
def test_replay_samplers_draw_w_over_S(sampler):
    """R10: argmax w/E and argmax log w + G are exact draws from w / sum(w)."""
    w = np.array([0.0, 1 / 8, 3 / 8, 1 / 2, 0.0])
    gen = np.random.Generator(np.random.PCG64(5))
    N = 20000
    v = gen.random((N, 5))
    if sampler == "exp_race":
        E = exp_from_uniform(v)
        ys = [exp_race(w, E[n]) for n in range(N)]
    else:
        G = gumbel_from_uniform(np.where(v == 0, 0.5, v))
        ys = [gumbel(w, G[n]) for n in range(N)]
    law = {(i,): F(x) for i, x in enumerate(w)}
    assert chi2_pvalue(Counter((y,) for y in ys), law, N) > ALPHA
    assert chi2_pvalue(Counter((y,) for y in ys), {(i,): F(1, 5) for i in range(5)}, N) < ALPHA
