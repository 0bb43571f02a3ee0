"""RNG-v1 acceptance rules (docs/speculative-decoding.md §2.2): worked cases, edge cases,
input checks, and the alternative rules of docs/speculative-decoding.md §4."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from refmtp.backends import HostRNG, get_backend
from refmtp.inference.acceptance import Verdict, verify_drafts, verify_greedy
from refmtp.inference.sampling import (exp_from_uniform, exp_race, gumbel, gumbel_from_uniform, icdf,
                                      processed_probs, rng_v1_draws, rng_v1_draws_batch)
from refmtp.inference.other_rules import TYPICAL_DELTA, TYPICAL_EPS, verify_block, verify_typical
from refmtp.verification.acceptance_cases import dyadic_cases

DYADIC = dyadic_cases()  # the shipped acceptance case's inputs, built once for these tests

P1 = [1 / 8, 1 / 8, 1 / 4, 1 / 2]
Q1 = [1 / 2, 1 / 4, 1 / 8, 1 / 8]
P2 = [1 / 2, 1 / 4, 1 / 8, 1 / 8]
Q2 = [1 / 4] * 4
P3 = [1 / 4] * 4

# The table of docs/speculative-decoding.md §2.4, typed in from that page (the only hand-written expectations).
# case -> (num_accepted, tokens, residual_fallback, is_bonus)
SPEC_TABLE = {
    "A": (0, (3,), False, False),
    "B": (1, (0, 0), False, False),
    "C": (2, (1, 3, 3), False, True),
    "C'": (2, (1, 3, 2), False, True),
    "D": (0, (3,), False, False),
    "E1": (1, (2, 0), False, True),
    "E2": (0, (1,), False, False),
    "F": (0, (1,), False, False),
    "G": (0, (1,), True, False),
}


def _cases_by_name():
    return {c["case"]: c for c in DYADIC}


def _dev(bk, x):
    """Rows (list or numpy) -> a float64 array on backend ``bk``; None stays None."""
    return None if x is None else bk.asarray(np.asarray(x, dtype=np.float64))


def _run(case, bk=None, dtype="float64"):
    def arr(x):
        if x is None or bk is None:
            return x
        return bk.asarray(np.asarray(x, dtype=np.float64).reshape(len(x), -1) if len(x) else
                          np.zeros((0, case["V"])), dtype=dtype)

    return verify_drafts(arr(case["p"]), arr(case["q"]), case["drafts"], case["u_accept"],
                         case["u_sample"], case["greedy"], arr(case["logits"]))


# ------------------------------------------------------------------------------------------------
# (c) the nine worked cases of docs/speculative-decoding.md §2.4
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(SPEC_TABLE))
def test_worked_case_matches_spec_table(backend, name):
    case = _cases_by_name()[name]
    got = _run(case, backend)
    assert tuple(got) == SPEC_TABLE[name], f"case {name}: got {got}"
    # R11: dyadic inputs make identical decisions from float32 storage
    assert tuple(_run(case, backend, dtype="float32")) == SPEC_TABLE[name]


def test_worked_cases_inputs_are_the_spec_rows():
    c = _cases_by_name()
    assert c["A"]["p"] == [P1, P2, P3] and c["A"]["q"] == [Q1, Q2]
    assert c["D"]["p"][0] == [0, 1 / 4, 1 / 4, 1 / 2]
    assert c["E1"]["q"] is None and c["E1"]["p"] == [P1, P2]
    assert c["F"]["greedy"] and c["F"]["logits"][0] == [2, 5, 5, 1]
    assert c["G"]["p"][0] == [0.5, 0.5 - 2.0 ** -20] and c["G"]["u_accept"] == [1 - 2.0 ** -21]


# ------------------------------------------------------------------------------------------------
# The golden-input builder
# ------------------------------------------------------------------------------------------------

def _is_dyadic(x, max_bits=30):
    f = Fraction(x)
    return f.denominator <= 2 ** max_bits


def test_dyadic_cases_are_valid_records():
    cases = dyadic_cases()
    assert len(cases) >= 40
    assert [c["case"] for c in cases[:9]] == list(SPEC_TABLE)
    assert len({c["case"] for c in cases}) == len(cases)
    keys = {"case", "pins", "V", "K", "drafts", "q", "p", "u_accept", "u_sample", "greedy", "logits"}
    spec_non_dyadic_u = {"C'", "E1", "E2"}  # the §2.4 table's u_sample 0.7 and 0.2
    for c in cases:
        assert set(c) == keys, c["case"]
        V, K = c["V"], c["K"]
        assert len(c["drafts"]) == K and len(c["p"]) == K + 1 and all(len(r) == V for r in c["p"])
        rows = list(c["p"]) + (list(c["q"]) if c["q"] else [])
        for r in rows:
            assert all(_is_dyadic(x) and float(np.float32(x)) == x for x in r), c["case"]
            if "deficit" not in c["pins"]:
                assert sum(Fraction(x) for x in r) == 1, c["case"]
        if not c["greedy"]:
            us = list(c["u_accept"]) + [c["u_sample"]]
            assert all(0 <= u < 1 for u in us)
            if c["case"] not in spec_non_dyadic_u:
                assert all(_is_dyadic(u) and float(np.float32(u)) == u for u in us), c["case"]


def test_dyadic_cases_cover_every_rule(backend):
    seen = set()
    for c in DYADIC:
        v = _run(c, backend)
        assert v == verify_drafts(c["p"], c["q"], c["drafts"], c["u_accept"], c["u_sample"], c["greedy"],
                                  c["logits"]), c["case"]  # arrays on the backend == Python lists
        K = c["K"]
        seen.add(("K", K))
        seen.add(("greedy" if c["greedy"] else "stochastic", "bonus" if v.is_bonus else f"reject@{v.num_accepted}"))
        if v.residual_fallback:
            seen.add(("fallback", "onehot" if c["q"] is None else "q", v.num_accepted))
        if not c["greedy"]:
            seen.add(("q", "onehot" if c["q"] is None else "explicit"))
            for k in range(min(v.num_accepted + 1, K)):
                p_d = Fraction(c["p"][k][c["drafts"][k]])
                q_d = Fraction(1) if c["q"] is None else Fraction(c["q"][k][c["drafts"][k]])
                u = Fraction(c["u_accept"][k])
                if p_d > 0 and u * q_d == p_d:
                    seen.add("accept-on-equality")
                if p_d == 0 and u == 0:
                    seen.add("p0-u0-rejected")
                if p_d > q_d:
                    seen.add("ratio>1")
            if c["u_sample"] == 0:
                seen.add("u_sample=0")
    need = {("K", 0), ("K", 1), ("K", 2), ("K", 3), ("q", "onehot"), ("q", "explicit"),
            ("stochastic", "bonus"), ("stochastic", "reject@0"), ("stochastic", "reject@1"),
            ("stochastic", "reject@2"), ("greedy", "bonus"), ("greedy", "reject@0"),
            ("greedy", "reject@1"), ("greedy", "reject@2"), ("fallback", "q", 0), ("fallback", "q", 1),
            ("fallback", "onehot", 0), "accept-on-equality", "p0-u0-rejected", "ratio>1", "u_sample=0"}
    assert need <= seen, f"missing coverage: {need - seen}"


def test_dyadic_cases_is_a_fresh_list():
    a = dyadic_cases()
    a[0]["p"][0][0] = 99.0
    assert dyadic_cases()[0]["p"][0][0] == 1 / 8


# ------------------------------------------------------------------------------------------------
# R2 / R3 / R5 / R6 edge cases
# ------------------------------------------------------------------------------------------------

def test_icdf_rule_r5(backend):
    def a(*w):
        return _dev(backend, w)

    assert icdf(a(0, 0, 1 / 8, 3 / 8), 0.5) == 3  # t = 0.25
    assert icdf(a(0, 0, 1 / 8, 3 / 8), 0.25) == 3  # t = c[2]: strict >
    assert icdf(a(0, 0, 1 / 8, 3 / 8), 0.0) == 2  # zero-weight entries skipped
    assert icdf(a(1 / 2, 1 / 2, 0, 0), 1 - 2 ** -53) == 1  # trailing zeros never chosen
    assert icdf(a(0.5, 0.5), 0.5) == 1
    # rounding fallback: t = u*S rounds up to S (subnormal S), no c > t -> largest positive index
    # (on a GPU this also checks that subnormals are not flushed to zero: no fast-math)
    assert 0.75 * 5e-324 == 5e-324
    assert icdf(a(0.0, 5e-324, 0.0), 0.75) == 1
    # unnormalised weights are fine
    assert icdf(a(2.0, 6.0), 0.25) == 1 and icdf(a(2.0, 6.0), 0.2499) == 0


@pytest.mark.parametrize("w,u,msg", [
    (np.zeros(3), 0.5, "all weights are 0"),
    (np.array([0.5, -0.1]), 0.5, ">= 0"),
    (np.array([0.5, np.nan]), 0.5, ">= 0"),
    (np.array([0.5, 0.5]), 1.0, r"\[0, 1\)"),
    (np.zeros((2, 2)), 0.5, "vector"),
])
def test_icdf_rejects_bad_input(backend, w, u, msg):
    with pytest.raises(ValueError, match=msg):
        icdf(backend.asarray(w), u)


def test_u_sample_used_at_most_once_and_late_coins_ignored(backend):
    """R6 on random inputs: one draw per step; coins after the first rejection are irrelevant."""
    rng = np.random.default_rng(11)
    for trial in range(200 if backend.name == "numpy" else 60):
        K, V = int(rng.integers(0, 4)), int(rng.integers(1, 6))
        p = rng.dirichlet(np.ones(V), size=K + 1)
        q = None if trial % 3 == 0 else rng.dirichlet(np.ones(V), size=K)
        drafts = [int(rng.integers(V)) if q is None else int(rng.choice(V, p=q[k])) for k in range(K)]
        p, q = _dev(backend, p), _dev(backend, q)
        ua, us = rng.random(K), float(rng.random())
        calls = []

        def sampler(w, calls=calls):
            calls.append(1)
            return icdf(w, us)

        v = verify_drafts(p, q, drafts, ua, us, sampler=sampler)
        assert len(calls) == 1
        assert v == verify_drafts(p, q, drafts, ua, us)  # the sampler hook changes nothing
        ua2 = ua.copy()
        ua2[v.num_accepted + 1:] = rng.random(max(K - v.num_accepted - 1, 0))
        assert verify_drafts(p, q, drafts, ua2, us) == v
        assert len(v.tokens) == v.num_accepted + 1 and list(v.tokens[:-1]) == drafts[:v.num_accepted]
        assert v.is_bonus == (v.num_accepted == K)


def test_one_hot_q_equals_explicit_one_hot_rows(backend):
    rng = np.random.default_rng(12)
    for _ in range(100 if backend.name == "numpy" else 40):
        K, V = int(rng.integers(0, 4)), int(rng.integers(1, 6))
        p = rng.dirichlet(np.ones(V), size=K + 1)
        drafts = [int(d) for d in rng.integers(0, V, size=K)]
        q = np.zeros((K, V))
        q[np.arange(K), drafts] = 1.0
        ua, us = rng.random(K), float(rng.random())
        p, q = _dev(backend, p), _dev(backend, q)
        assert verify_drafts(p, None, drafts, ua, us) == verify_drafts(p, q, drafts, ua, us)


def test_fallback_is_flagged_and_draws_from_p_j(backend):
    p = _dev(backend, [[0.5, 0.5 - 2.0 ** -20], [0.5, 0.5]])
    for us, y in [(0.0, 0), (0.49, 0), (0.75, 1)]:
        v = verify_drafts(p, _dev(backend, [[0.5, 0.5]]), [1], [1 - 2.0 ** -21], us)
        assert v == Verdict(0, (y,), True, False)


def test_exact_uniform_coins_at_the_accept_boundary(backend):
    # a = p/q = 1/3 is not dyadic: u just below / above 1/3 decides
    p, q = _dev(backend, [[1 / 8, 7 / 8], [1.0, 0.0]]), _dev(backend, [[3 / 8, 5 / 8]])
    assert verify_drafts(p, q, [0], [1 / 3 - 1e-12], 0.5).num_accepted == 1
    assert verify_drafts(p, q, [0], [1 / 3 + 1e-12], 0.5).num_accepted == 0


# ------------------------------------------------------------------------------------------------
# Input checks: one-line ValueErrors
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,msg", [
    (dict(q=[[0.0, 1.0, 0.0, 0.0], Q2]), r"q\[0\]\[0\] = 0\.0"),
    (dict(drafts=[0, 4]), "outside the vocabulary"),
    (dict(drafts=[0]), r"\(K\+1, V\) = \(2, V\)"),
    (dict(u_accept=[0.5]), "K=2 entries"),
    (dict(u_accept=[0.5, 1.0]), r"u_accept\[1\] = 1\.0 must lie in \[0, 1\)"),
    (dict(u_sample=-0.1), r"u_sample = -0\.1"),
    (dict(u_sample=None), "required unless greedy"),
    (dict(p=[[-0.1, 0.6, 0.25, 0.25], P2, P3]), "finite and >= 0"),
    (dict(p=[[0.0] * 4, P2, P3]), "no positive entry"),
    (dict(q=[Q1]), r"q must be \(K, V\)"),
    (dict(drafts=[0.5, 2]), "integers"),
])
def test_bad_input_raises_one_line_value_error(backend, kwargs, msg):
    args = dict(p=[P1, P2, P3], q=[Q1, Q2], drafts=[0, 2], u_accept=[0.5, 0.5], u_sample=0.5)
    args.update(kwargs)
    args["p"], args["q"] = _dev(backend, args["p"]), _dev(backend, args["q"])
    with pytest.raises(ValueError, match=msg) as err:
        verify_drafts(**args)
    assert "\n" not in str(err.value)


def test_greedy_input_checks(backend):
    with pytest.raises(ValueError, match="NaN"):
        verify_greedy(_dev(backend, [[np.nan, 1.0], [0.0, 1.0]]), [0])
    with pytest.raises(ValueError, match="pass p"):
        verify_drafts(None, None, [0], None, None, greedy=True)
    with pytest.raises(ValueError, match="greedy=True"):
        verify_drafts(None, None, [0], [0.5], 0.5, logits=backend.zeros((2, 2)))


# ------------------------------------------------------------------------------------------------
# R1 greedy and verify_greedy
# ------------------------------------------------------------------------------------------------

def test_greedy_equals_greedy_decoding_and_ignores_u_and_q(backend):
    rng = np.random.default_rng(13)
    for _ in range(100 if backend.name == "numpy" else 40):
        K, V = int(rng.integers(0, 4)), int(rng.integers(1, 6))
        host = rng.integers(-2, 3, size=(K + 1, V)).astype(np.float64)  # many ties
        g = [int(np.flatnonzero(row == row.max())[0]) for row in host]  # lowest maximal index
        drafts = [g[k] if rng.random() < 0.7 else int(rng.integers(V)) for k in range(K)]
        A = next((k for k in range(K) if drafts[k] != g[k]), K)
        expect = Verdict(A, tuple(drafts[:A]) + (g[A],), False, A == K)
        logits = _dev(backend, host)
        assert verify_greedy(logits, drafts) == expect
        p = processed_probs(logits, 1.0)
        q = _dev(backend, rng.dirichlet(np.ones(V), size=K))
        assert verify_drafts(p, q, drafts, rng.random(K), 0.3, greedy=True, logits=logits) == expect
        assert verify_drafts(p, None, drafts, None, None, greedy=True) == expect  # argmax of p


def test_greedy_uses_logits_not_float32_softmax(backend):
    # two logits 1e-8 apart merge into a float32 tie after softmax (docs/speculative-decoding.md §1.4 "mixed batches" trap)
    logits = _dev(backend, [[0.0, 1e-8, -5.0]])
    p32 = backend.asarray(processed_probs(logits, 1.0), dtype="float32")
    assert float(p32[0, 0]) == float(p32[0, 1])
    assert verify_greedy(logits, []).tokens == (1,)
    assert verify_drafts(p32, None, [], None, None, greedy=True).tokens == (0,)


# ------------------------------------------------------------------------------------------------
# Helpers: processed_probs, rng_v1_draws, replay samplers
# ------------------------------------------------------------------------------------------------

def test_processed_probs(backend):
    z = _dev(backend, [[1.0, 2.0, -math.inf], [0.0, 0.0, 0.0]])
    p = processed_probs(z, 0.5)
    assert p.dtype == np.float64
    p = backend.to_numpy(p)
    e = np.exp(np.array([2.0, 4.0]) - 4.0)
    np.testing.assert_allclose(p[0], [e[0] / e.sum(), e[1] / e.sum(), 0.0], rtol=1e-15)
    np.testing.assert_allclose(p[1], [1 / 3] * 3, rtol=1e-15)
    assert p.dtype == np.float64
    assert processed_probs(z, 0) is None
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="temperature"):
            processed_probs(z, bad)
    with pytest.raises(ValueError, match="all -inf"):
        processed_probs(_dev(backend, [[-math.inf, -math.inf]]), 1.0)
    with pytest.raises(ValueError, match="NaN"):
        processed_probs(_dev(backend, [[0.0, math.nan]]), 1.0)


def test_rng_v1_draw_order():
    ua, us = rng_v1_draws(np.random.Generator(np.random.PCG64(7)), 3)
    ref = np.random.Generator(np.random.PCG64(7)).random(4)
    assert ua.tolist() == ref[:3].tolist() and us == ref[3]
    # HostRNG works and the stream position depends only on K, never on the outcome
    h = HostRNG(get_backend("numpy"), 7)
    assert rng_v1_draws(h, 3)[1] == us
    ua0, us0 = rng_v1_draws(h, 0)  # K = 0: only the sample coin
    assert ua0.shape == (0,) and us0 == np.random.Generator(np.random.PCG64(7)).random(5)[4]
    gen_a, gen_b = np.random.Generator(np.random.PCG64(9)), np.random.Generator(np.random.PCG64(9))
    ua_b, us_b = rng_v1_draws_batch(gen_b, 5, 2)
    for n in range(5):
        ua_a, us_a = rng_v1_draws(gen_a, 2)
        assert ua_a.tolist() == ua_b[n].tolist() and us_a == us_b[n]
    assert gen_a.random() == gen_b.random()
    with pytest.raises(ValueError, match="K must be >= 0"):
        rng_v1_draws(gen_a, -1)


def test_replay_samplers(backend):
    def a(*x):
        return _dev(backend, x)

    w = a(0.0, 1.0, 3.0, 0.0)
    assert exp_race(w, a(1.0, 1.0, 1.0, 1.0)) == 2
    assert exp_race(w, a(1.0, 0.25, 1.0, 1.0)) == 1  # 4 > 3
    assert exp_race(w, a(1.0, 1.0, 3.0, 1.0)) == 1  # tie 1 == 1 -> lowest index
    assert gumbel(w, backend.zeros((4,))) == 2
    assert gumbel(w, a(100.0, math.log(3.0), 0.0, 100.0)) == 1  # tie -> lowest index; w=0 never
    v = np.array([0.0, 0.5, 0.9])
    np.testing.assert_allclose(backend.to_numpy(exp_from_uniform(backend.asarray(v))), -np.log(1 - v),
                               rtol=1e-15)
    np.testing.assert_allclose(backend.to_numpy(gumbel_from_uniform(backend.asarray(v[1:]))),
                               -np.log(-np.log(v[1:])), rtol=1e-15)
    with pytest.raises(ValueError, match="E_i > 0"):
        exp_race(w, backend.zeros((4,)))
    # through verify_drafts: case A rejects at position 1, residual [0, 0, 1/8, 3/8]
    c = _cases_by_name()["A"]
    p, q = _dev(backend, c["p"]), _dev(backend, c["q"])
    E = a(1.0, 1.0, 1.0, 0.01)
    v = verify_drafts(p, q, c["drafts"], c["u_accept"], c["u_sample"], sampler=lambda w: exp_race(w, E))
    assert v.tokens == (3,)
    E = a(1.0, 1.0, 0.01, 1.0)
    v = verify_drafts(p, q, c["drafts"], c["u_accept"], c["u_sample"], sampler=lambda w: exp_race(w, E))
    assert v.tokens == (2,)


# ------------------------------------------------------------------------------------------------
# Alternative rules (docs/speculative-decoding.md §4)
# ------------------------------------------------------------------------------------------------

def _typical_oracle(p, drafts, eps, delta):
    """Medusa's evaluate_posterior on one chain, written out independently in numpy."""
    p = np.asarray(p, dtype=np.float64)
    H = -np.sum(p * np.log(p + 1e-5), axis=-1)
    thr = np.minimum(np.full_like(H, eps), np.exp(-H) * delta)
    ok = np.array([p[k, d] > thr[k] for k, d in enumerate(drafts)], dtype=bool)
    A = int(np.cumprod(ok).sum()) if len(drafts) else 0
    return A, tuple(drafts[:A]) + (int(np.argmax(p[A])),)


def test_verify_typical_matches_medusa_formula(backend):
    rng = np.random.default_rng(14)
    for _ in range(200 if backend.name == "numpy" else 60):
        K, V = int(rng.integers(0, 4)), int(rng.integers(2, 8))
        p = rng.dirichlet(np.full(V, 0.3), size=K + 1)
        drafts = [int(np.argmax(r)) if rng.random() < 0.5 else int(rng.integers(V)) for r in p[:K]]
        v = verify_typical(_dev(backend, p), drafts)
        A, tokens = _typical_oracle(p, drafts, TYPICAL_EPS, TYPICAL_DELTA)
        assert (v.num_accepted, v.tokens) == (A, tokens)
        assert v.is_bonus == (A == K) and not v.residual_fallback


def test_verify_typical_strict_threshold_and_default_trap(backend):
    # uniform p over 4 tokens: H ~ log 4 -> threshold min(0.09, 0.3/4) = 0.075 < 0.25
    p = _dev(backend, np.full((2, 4), 0.25))
    assert verify_typical(p, [1]).num_accepted == 1
    # p(d) == threshold exactly (eps = 0.25, delta large so the min is eps): strict > rejects
    assert verify_typical(p, [1], eps=0.25, delta=100.0).num_accepted == 0
    # the default trap: p(d) = 0.08, H(p) ~ 0.279 -> min(0.09, 0.3 e^-H) = 0.09 rejects, while the
    # swapped defaults (eps=0.3, delta=0.09) of evaluate_posterior give 0.09 e^-H ~ 0.068 and accept
    host = np.array([[0.08, 0.92], [0.5, 0.5]])
    p = _dev(backend, host)
    assert verify_typical(p, [0], eps=0.09, delta=0.3).num_accepted == 0
    assert verify_typical(p, [0], eps=0.3, delta=0.09).num_accepted == 1
    assert _typical_oracle(host, [0], 0.09, 0.3)[0] == 0 and _typical_oracle(host, [0], 0.3, 0.09)[0] == 1
    # bonus: argmax, or ICDF with a coin
    assert verify_typical(_dev(backend, [[0.5, 0.5], [0.25, 0.75]]), [0]).tokens == (0, 1)
    assert verify_typical(_dev(backend, [[0.5, 0.5], [0.25, 0.75]]), [0], u_sample=0.0).tokens == (0, 0)
    with pytest.raises(ValueError, match="eps and delta"):
        verify_typical(p, [0], eps=0.0)


def test_verify_block_k1_equals_token_level_rule(backend):
    """For K = 1, h_1 = rho_1 = a_1 and the residual is max(p_1 - q_1, 0): the RNG-v1 rule."""
    rng = np.random.default_rng(15)
    for trial in range(200 if backend.name == "numpy" else 60):
        V = int(rng.integers(1, 6))
        p = rng.dirichlet(np.ones(V), size=2)
        q = None if trial % 2 else rng.dirichlet(np.ones(V), size=1)
        d = [int(rng.integers(V)) if q is None else int(rng.choice(V, p=q[0]))]
        ua, us = rng.random(1), float(rng.random())
        p, q = _dev(backend, p), _dev(backend, q)
        assert verify_block(p, q, d, ua, us) == verify_drafts(p, q, d, ua, us)
    for c in DYADIC:
        if c["K"] <= 1 and not c["greedy"]:
            args = (_dev(backend, c["p"]), _dev(backend, c["q"]), c["drafts"], c["u_accept"], c["u_sample"])
            assert verify_block(*args) == verify_drafts(*args), c["case"]


def test_verify_block_hand_case(backend):
    # docs/speculative-decoding.md §2.4 rows, drafts [0, 2]: rho_1 = 1/4, M_1 = sum max(p_2/4 - q_2, 0) = 0 -> h_1 = 0,
    # rho_2 = min(1, 1/4 * (1/8)/(1/4)) = 1/8 = h_2.
    c = _cases_by_name()["A"]
    p, q = _dev(backend, c["p"]), _dev(backend, c["q"])
    v = verify_block(p, q, [0, 2], [0.0, 0.125], 0.5)  # u_2 <= h_2: whole block accepted
    assert v.num_accepted == 2 and v.is_bonus and v.tokens == (0, 2, 2)
    v = verify_block(p, q, [0, 2], [0.0, 0.126], 0.5)  # u_1 <= h_1 = 0 but u_2 > h_2
    assert v.num_accepted == 1 and v.tokens[:1] == (0,)
    # A = 1 (only at u_1 = 0): residual max(rho_1 p_2 - q_2, 0) is 0 everywhere -> fallback ICDF(p_2, 0.5)
    assert v.residual_fallback and v.tokens == (0, 1)
    v = verify_block(p, q, [0, 2], [0.5, 0.5], 0.5)  # nothing accepted: standard residual
    assert v == Verdict(0, (3,), False, False)
