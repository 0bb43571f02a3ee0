"""Exact proofs by enumeration (docs/speculative-decoding.md §7, T-ENUM and T-INTEGRATE).

The decision of ``verify_drafts`` is piecewise constant in the random numbers
(u_accept, u_sample): u_accept[k] only meets the threshold a_k = min(1, p_k(d_k)/q_k(d_k)), and
u_sample only the points c_i/S of the cumulative sums of the weight rows it can be applied to.
So we call the IMPLEMENTATION once at an interior point of every cell of that grid (and once
more at a second interior point, to check the decision really is constant there), weight each
outcome by the exact cell volume (``Fraction``), marginalise the drafts drawn from q, and compare
the resulting outcome law EXACTLY (zero tolerance) with the closed forms of docs/speculative-decoding.md §1.3.
Tables are prefix-dependent (p_k = p(.|c, x_<k)) random dyadic distributions with zeros.
"""
from __future__ import annotations

import itertools
from collections import defaultdict
from fractions import Fraction as F

import numpy as np
import pytest

from refmtp.inference.acceptance import verify_drafts
from refmtp.inference.other_rules import verify_block

ZERO, ONE = F(0), F(1)


# ------------------------------------------------------------------------------------------------
# Random prefix-dependent dyadic tables
# ------------------------------------------------------------------------------------------------

class Table:
    """``table[prefix]`` -> a dyadic distribution over V tokens (list of Fractions), drawn lazily."""

    def __init__(self, V, seed, bits=4, sparsity=0.8):
        self.V, self.bits, self.sparsity = V, bits, sparsity
        self.rng = np.random.default_rng(seed)
        self.rows = {}

    def __getitem__(self, prefix):
        if prefix not in self.rows:
            counts = self.rng.multinomial(2 ** self.bits, self.rng.dirichlet(np.full(self.V, self.sparsity)))
            self.rows[prefix] = [F(int(c), 2 ** self.bits) for c in counts]
        return self.rows[prefix]


class OneHotDrafter:
    """A deterministic drafter: the draft after ``prefix`` is a fixed random token (q = one-hot)."""

    def __init__(self, V, seed):
        self.V, self.rng, self.choice = V, np.random.default_rng(seed), {}

    def token(self, prefix):
        if prefix not in self.choice:
            self.choice[prefix] = int(self.rng.integers(self.V))
        return self.choice[prefix]

    def __getitem__(self, prefix):
        return [ONE if i == self.token(prefix) else ZERO for i in range(self.V)]


def _floats(rows):
    return [[float(x) for x in r] for r in rows]


# ------------------------------------------------------------------------------------------------
# Closed forms of docs/speculative-decoding.md §1.3 (marginal over drafts drawn from q)
# ------------------------------------------------------------------------------------------------

def closed_form_step(P, Q, ctx, K, V):
    """{(A, tokens): probability} of one step of the lossless rule at context ``ctx``."""
    law = defaultdict(F)

    def rec(prefix, j, mass):
        p, q = P[ctx + prefix], None if j == K else Q[ctx + prefix]
        if j == K:
            for y in range(V):
                if p[y]:
                    law[(K, prefix + (y,))] += mass * p[y]
            return
        for y in range(V):
            r = max(p[y] - q[y], ZERO)
            if r:
                law[(j, prefix + (y,))] += mass * r
        for x in range(V):
            m = min(p[x], q[x])
            if m:
                rec(prefix + (x,), j + 1, mass * m)

    rec((), 0, ONE)
    return dict(law)


# ------------------------------------------------------------------------------------------------
# T-INTEGRATE: the implementation's exact outcome law
# ------------------------------------------------------------------------------------------------

def _cells(points):
    """Consecutive non-empty intervals of [0, 1) cut at ``points``."""
    cuts = sorted({ZERO, ONE} | {x for x in points if ZERO < x < ONE})
    return [(lo, hi) for lo, hi in zip(cuts, cuts[1:])]


def _interior(lo, hi, frac):
    """A float strictly inside (lo, hi), at about ``frac`` of the way; checked exactly."""
    x = float(lo + (hi - lo) * frac)
    assert lo < F(x) < hi, (lo, hi, x)
    return x


def _cdf_points(w):
    S = sum(w)
    if S == 0:
        return []
    c, out = ZERO, []
    for x in w:
        c += x
        out.append(c / S)
    return out


def rng_v1_grid(p, q, drafts):
    """Accept thresholds a_k and every weight row the one u_sample draw can see (R2-R4)."""
    K, V = len(drafts), len(p[0])
    thresholds, rows = [], [p[K]]
    for k, d in enumerate(drafts):
        q_row = q[k] if q is not None else [ONE if i == d else ZERO for i in range(V)]
        thresholds.append(min(ONE, p[k][d] / q_row[d]))
        rows += [[max(a - b, ZERO) for a, b in zip(p[k], q_row)], p[k]]
    return thresholds, rows


def block_grid(p, q, drafts):
    """Thresholds h_i and residual rows of block verification (docs/speculative-decoding.md §4), exactly."""
    K, V = len(drafts), len(p[0])

    def q_row(i):
        return q[i] if q is not None else [ONE if j == drafts[i] else ZERO for j in range(V)]

    rho, rhos, thresholds = ONE, [ONE], []
    for i in range(1, K + 1):
        rho = min(ONE, rho * p[i - 1][drafts[i - 1]] / q_row(i - 1)[drafts[i - 1]])
        rhos.append(rho)
        if i < K:
            M = sum(max(rho * a - b, ZERO) for a, b in zip(p[i], q_row(i)))
            thresholds.append(M / (M + 1 - rho) if M + 1 - rho > 0 else ONE)
        else:
            thresholds.append(rho)
    rows = [p[K]] + [r for A in range(K) for r in
                     ([max(rhos[A] * a - b, ZERO) for a, b in zip(p[A], q_row(A))], p[A])]
    return thresholds, rows


def integrate(rule, grid, p, q, drafts):
    """{verdict: exact probability over (u_accept, u_sample)} of ``rule`` for fixed drafts."""
    thresholds, rows = grid(p, q, drafts)
    u_cells = [_cells([a]) for a in thresholds]
    s_cells = _cells([x for w in rows for x in _cdf_points(w)])
    pf, qf = _floats(p), None if q is None else _floats(q)
    law = defaultdict(F)
    for combo in itertools.product(*u_cells, s_cells):
        vol = ONE
        for lo, hi in combo:
            vol *= hi - lo
        us = [[_interior(lo, hi, f) for lo, hi in combo] for f in (F(1, 2), F(1, 3))]
        v1 = rule(pf, qf, list(drafts), us[0][:-1], us[0][-1])
        v2 = rule(pf, qf, list(drafts), us[1][:-1], us[1][-1])
        assert v1 == v2, f"decision not constant on a cell: {combo}: {v1} vs {v2}"
        law[v1] += vol
    return law


def step_law(rule, grid, P, Q, ctx, K, V, one_hot):
    """Exact {(A, tokens): prob} of one step, marginalising drafts drawn from Q (or the one-hot drafter)."""
    law = defaultdict(F)
    fallback_mass = ZERO
    if one_hot:
        d, prefix = [], ()
        for _ in range(K):
            d.append(Q.token(ctx + prefix))
            prefix += (d[-1],)
        draft_sets = [(tuple(d), ONE)]
    else:
        draft_sets = []
        for d in itertools.product(range(V), repeat=K):
            mass = ONE
            for k in range(K):
                mass *= Q[ctx + d[:k]][d[k]]
            if mass:
                draft_sets.append((d, mass))
    for d, mass in draft_sets:
        p = [P[ctx + d[:k]] for k in range(K + 1)]
        q = None if one_hot else [Q[ctx + d[:k]] for k in range(K)]
        for v, pr in integrate(rule, grid, p, q, d).items():
            law[(v.num_accepted, v.tokens)] += mass * pr
            assert v.is_bonus == (v.num_accepted == K)
            if v.residual_fallback:
                fallback_mass += mass * pr
    assert fallback_mass == 0  # exact arithmetic: the residual is never empty when reached
    return {k: x for k, x in law.items() if x}


def check_step(law, P, ctx, V):
    assert sum(law.values()) == 1  # (a) total mass 1
    first = [ZERO] * V
    for (A, tokens), pr in law.items():
        first[tokens[0]] += pr
    assert first == P[ctx]  # (b) first-token marginal = p_1


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------

CONFIGS = [  # (V, K, seed)
    (2, 1, 1), (3, 1, 2), (4, 1, 3), (2, 2, 4), (3, 2, 5), (4, 2, 6), (2, 3, 7), (3, 3, 8), (4, 3, 9),
]


@pytest.mark.parametrize("V,K,seed", CONFIGS)
@pytest.mark.parametrize("one_hot", [False, True], ids=["q-sampled", "q-onehot"])
def test_rng_v1_step_law_equals_closed_form(V, K, seed, one_hot):
    P = Table(V, seed)
    Q = OneHotDrafter(V, seed + 100) if one_hot else Table(V, seed + 100)
    law = step_law(verify_drafts, rng_v1_grid, P, Q, (), K, V, one_hot)
    assert law == closed_form_step(P, Q, (), K, V)
    check_step(law, P, (), V)


def test_k0_step_law_is_the_bonus_row():
    P = Table(4, 21)
    law = step_law(verify_drafts, rng_v1_grid, P, Table(4, 22), (), 0, 4, False)
    assert law == {(0, (y,)): P[()][y] for y in range(4) if P[()][y]}


def test_tables_have_zeros_and_non_trivial_residuals():
    """Guard against a vacuous proof: the random tables exercise p(d)=0, q(d)=0 and rejections."""
    seen_p0 = seen_q0 = seen_reject = False
    for V, K, seed in CONFIGS:
        P, Q = Table(V, seed), Table(V, seed + 100)
        law = closed_form_step(P, Q, (), K, V)
        seen_reject |= any(A < K for A, _ in law)
        seen_p0 |= any(x == 0 for r in [P[()]] + [P[(i,)] for i in range(V)] for x in r)
        seen_q0 |= any(x == 0 for r in [Q[()]] + [Q[(i,)] for i in range(V)] for x in r)
    assert seen_p0 and seen_q0 and seen_reject


def stream_law(rule, grid, P, Q, V, K, N, one_hot):
    """Exact law of the first N emitted tokens when steps are repeated (docs/speculative-decoding.md §1.2, check (c))."""
    cache = {}
    out = defaultdict(F)

    def rec(prefix, mass):
        if len(prefix) >= N:
            out[prefix[:N]] += mass
            return
        if prefix not in cache:
            cache[prefix] = step_law(rule, grid, P, Q, prefix, K, V, one_hot)
        for (A, tokens), pr in cache[prefix].items():
            rec(prefix + tokens, mass * pr)

    rec((), ONE)
    return dict(out)


def target_law(P, V, N):
    out = {}
    for x in itertools.product(range(V), repeat=N):
        pr = ONE
        for i in range(N):
            pr *= P[x[:i]][x[i]]
        if pr:
            out[x] = pr
    return out


@pytest.mark.parametrize("rule,grid", [(verify_drafts, rng_v1_grid), (verify_block, block_grid)],
                         ids=["rng-v1", "block"])
@pytest.mark.parametrize("V,K,N,one_hot", [(3, 2, 3, False), (3, 2, 3, True), (2, 3, 4, False)])
def test_truncated_stream_law_equals_target(rule, grid, V, K, N, one_hot):
    P = Table(V, 31 + V + K)
    Q = OneHotDrafter(V, 41) if one_hot else Table(V, 51 + K)
    assert stream_law(rule, grid, P, Q, V, K, N, one_hot) == target_law(P, V, N)


@pytest.mark.parametrize("V,K,seed", [(3, 2, 5), (4, 3, 9), (3, 3, 8)])
def test_block_step_is_lossless_per_step_and_accepts_at_least_as_much(V, K, seed):
    """Block verification: mass 1, first token ~ p_1, and E[A] >= token-level E[A] (Sun et al.)."""
    P, Q = Table(V, seed), Table(V, seed + 100)
    block = step_law(verify_block, block_grid, P, Q, (), K, V, False)
    check_step(block, P, (), V)
    token = closed_form_step(P, Q, (), K, V)
    assert sum(A * x for (A, _), x in block.items()) >= sum(A * x for (A, _), x in token.items())
