"""Speculative decoding with an independent draft model (refmtp/inference/draft_model.py), tested
like the MTP path (tests/test_specdecode.py): greedy output equals plain decoding token for token;
the draft and target rows are what the full forwards compute on the committed tokens plus the
drafts, so both caches roll back correctly; q is the draft model's softmax at the temperature;
the output distribution of the WHOLE loop (real models, real caches, real rule) equals the
target's, by exact enumeration of the coin cells (the machinery of
tests/test_speculative_enumeration.py); bad pairs are refused in one line.
"""
from __future__ import annotations

import itertools
from collections import defaultdict
from fractions import Fraction as F
from types import SimpleNamespace

import numpy as np
import pytest

from refmtp.checkpoint import tokenizer_metadata
from refmtp.config import preset
from refmtp.inference.decode import Decoder, generate
from refmtp.inference.draft_model import check_pair
from refmtp.inference.sampling import processed_probs
from refmtp.inference.speculative import spec_metrics, speculative_generate
from refmtp.model import forward, init_params
from tests.test_speculative_enumeration import ONE, ZERO, _cdf_points, _interior, rng_v1_grid
from tests.test_specdecode import _ids, _random_params

TOL = 1e-10


def draft_config(cfg):
    """A one-layer dense draft model with no MTP on the target's tokens."""
    return cfg.replace(num_hidden_layers=1, num_nextn_predict_layers=0, n_routed_experts=0,
                       first_k_dense_replace=1)


def pair(backend=None, seed=0, vocab=None, draft_seed=None):
    """(target Decoder, draft Decoder) with random weights whose lm_heads share one dominant
    direction when ``draft_seed`` is None (tests/test_specdecode.py), so drafts get accepted and
    rejected; with another ``draft_seed`` the draft model's q is far from p."""
    cfg = preset("tiny") if vocab is None else preset("tiny").replace(vocab_size=vocab)
    dcfg = draft_config(cfg)
    return (Decoder(_random_params(cfg, seed=seed, backend=backend), cfg),
            Decoder(_random_params(dcfg, seed=seed if draft_seed is None else draft_seed,
                                   backend=backend), dcfg))


# -------------------------------------------------------------------------------------------
# greedy: speculative with a draft model == plain, token for token
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["absorbed", "naive"])
def test_greedy_equals_plain(backend, mode):
    dec, draft = pair(backend)
    accepted_deep = rejected = 0
    for prompt in ([2], [1, 5, 9, 3, 7]):
        plain = generate(dec, prompt, 20, mode=mode)
        for k in (1, 3):
            res = speculative_generate(dec, prompt, 20, k=k, mode=mode, draft=draft)
            assert res.tokens == plain, (prompt, k)
            assert sum(s.emitted for s in res.steps) == 20
            accepted_deep += sum(1 for s in res.steps if s.A >= 2)
            rejected += sum(1 for s in res.steps if s.A < s.K)
    assert accepted_deep > 0 and rejected > 0  # both paths of the rule, deep acceptances too


def test_greedy_stop_token_and_target_without_mtp(backend):
    """A stop token cuts the emission; a target with no MTP modules (D = 0) can use a draft model."""
    dec, draft = pair(backend, seed=3)
    plain = generate(dec, [4, 4], 30)
    stop = plain[9]
    res = speculative_generate(dec, [4, 4], 30, k=3, stop_token=stop, draft=draft)
    assert res.tokens == plain[: plain.index(stop) + 1]
    cfg0 = dec.cfg.replace(num_nextn_predict_layers=0)
    dec0 = Decoder(_random_params(cfg0, seed=3, backend=backend), cfg0)
    assert speculative_generate(dec0, [1, 2], 20, k=2, draft=draft).tokens == generate(dec0, [1, 2], 20)


# -------------------------------------------------------------------------------------------
# what is drafted and verified is what the full forwards compute; both caches roll back
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_rows_match_full_forwards_and_caches_roll_back(backend, temperature):
    """Draft s's logits = the draft model's full forward on committed + d_1..d_{s-1} at its last
    row; the K+1 verify rows = the target's full forward; after each step the target cache holds
    n+A rows and the draft cache min(n+A, n+K-1) (committed rows only). A stale draft row after a
    rejection would change the next step's draft logits, so the check covers the rollback."""
    dec, draft = pair(backend, seed=1)
    h = backend.to_numpy
    prompt, K = [3, 3, 8], 3
    res = speculative_generate(dec, prompt, 16, k=K, temperature=temperature, seed=5,
                               sample_drafts=temperature > 0, draft=draft, trace=True)
    full = prompt + res.tokens
    checked = rejected = 0
    for step in res.trace:
        n, drafts, A = step["n"], step["drafts"], step["num_accepted"]
        z = full[:n] + drafts + [0]
        tgt, _ = forward(dec.params, dec.cfg, _ids(backend, [z]), need_cache=False)
        drf, _ = forward(draft.params, draft.cfg, _ids(backend, [z]), need_cache=False)
        np.testing.assert_allclose(h(step["logits"]), h(tgt.logits[0, n - 1:n + len(drafts)]), rtol=0, atol=TOL)
        for s, row in enumerate(step["draft_logits"]):
            np.testing.assert_allclose(h(row), h(drf.logits[0, n - 1 + s]), rtol=0, atol=TOL)
            checked += 1
        if temperature > 0 and drafts:  # q passed to the rule = the draft model's softmax at T
            for q, row in zip(step["q"], step["draft_logits"]):
                np.testing.assert_allclose(h(q), h(processed_probs(row, temperature)), rtol=0, atol=1e-15)
        else:
            assert step["q"] is None  # argmax drafts: one-hot q
        assert step["cache_lengths"]["main"] == n + A
        if drafts:
            assert step["cache_lengths"]["draft"] == min(n + A, n + len(drafts) - 1)
        rejected += A < len(drafts)
    assert checked >= 8 and rejected > 0


def test_sampling_seeded_and_k0_equals_plain_sampling(backend):
    dec, draft = pair(backend, seed=4)
    plain = generate(dec, [1, 2, 3], 25, temperature=0.8, seed=7)
    assert speculative_generate(dec, [1, 2, 3], 25, k=0, temperature=0.8, seed=7, draft=draft).tokens == plain
    a = speculative_generate(dec, [1, 2, 3], 25, k=3, temperature=0.8, seed=7, sample_drafts=True, draft=draft)
    b = speculative_generate(dec, [1, 2, 3], 25, k=3, temperature=0.8, seed=7, sample_drafts=True, draft=draft)
    assert a.tokens == b.tokens and a.steps == b.steps and spec_metrics(a.steps)["accepted"] > 0


# -------------------------------------------------------------------------------------------
# the output law of the whole loop, by exact enumeration of the coin cells
# -------------------------------------------------------------------------------------------
class Coins:
    """Every coin the loop draws (draft coins and RNG-v1 coins, in the order drawn) from one
    list; past its end it hands out 0.5. Stands in for the backend's seeded generator."""

    def __init__(self, values):
        self.values, self.used = list(values), 0

    def random(self, size=None):
        n = 1 if size is None else int(size)
        out = [self.values[i] if i < len(self.values) else 0.5 for i in range(self.used, self.used + n)]
        self.used += n
        return out[0] if size is None else np.array(out)

    def spawn(self, n):
        return [self] * n


SLIVER = F(1, 10 ** 13)  # cells this narrow come from float rounding of the rows (a CDF ending at 1 - 1e-16)


def _cells_of(points):
    """The cells of [0, 1) cut at ``points`` (_cells), slivers narrower than SLIVER merged into
    their neighbour: their mass (< 1e-13 each) is within the tolerance of the comparison."""
    cuts = [ZERO]
    for x in sorted({x for x in points if ZERO < x < ONE}):
        if x - cuts[-1] > SLIVER and ONE - x > SLIVER:
            cuts.append(x)
    return list(zip(cuts, cuts[1:] + [ONE]))


def _fr(rows):
    return [[F(float(x)) for x in r] for r in np.asarray(rows)]


def _coin_cuts(trace):
    """Per coin drawn, in order, the points of [0, 1) where the loop's decision can change:
    a sampled draft's inverse-CDF points of q; an accept coin's threshold min(1, p/q); the sample
    coin's CDF points of every row it can be applied to (rng_v1_grid of the enumeration tests)."""
    cuts = []
    for step in trace:
        p = _fr(step["p"])
        q = None if step["q"] is None else _fr(step["q"])
        for row in q if step["u_draft"] else []:
            cuts.append(_cdf_points(row))
        thresholds, rows = rng_v1_grid(p, q, step["drafts"])
        cuts += [[a] for a in thresholds]
        cuts.append([x for w in rows for x in _cdf_points(w)])
    return cuts


def loop_law(dec, draft, prompt, N, K, sample_drafts, monkeypatch):
    """{emitted tokens: exact probability} of speculative_generate over all its coins: a depth-
    first walk over the cells of each coin in the order the loop draws them (a coin's cells
    depend only on the coins before it), one run per node, the mass = the product of the widths."""
    coins = Coins([])
    monkeypatch.setattr(dec.bk, "rng", lambda seed: SimpleNamespace(gen=coins))

    def run(values):
        coins.values, coins.used = values, 0
        res = speculative_generate(dec, prompt, N, k=K, temperature=1.0, sample_drafts=sample_drafts,
                                   draft=draft, trace=True)
        return tuple(res.tokens), res.trace, coins.used

    law, leaves = defaultdict(F), [0]

    def walk(cells, mass):
        tokens, trace, used = run([_interior(lo, hi, F(1, 2)) for lo, hi in cells])
        if used <= len(cells):  # every coin drawn has its cell: a leaf
            again, _, _ = run([_interior(lo, hi, F(1, 3)) for lo, hi in cells])
            assert again == tokens, f"decision not constant on the cells {cells}"
            law[tokens] += mass
            leaves[0] += 1
            return
        for lo, hi in _cells_of(_coin_cuts(trace)[len(cells)]):
            walk(cells + [(lo, hi)], mass * (hi - lo))

    walk([], ONE)
    return dict(law), leaves[0]


def target_law(dec, prompt, N):
    """{x_1..x_N: prod p(x_i | prompt, x_<i)} from the target's full forward at temperature 1."""
    V, out = dec.cfg.vocab_size, {}
    rows = {}
    for x in itertools.product(range(V), repeat=N):
        pr = ONE
        for i in range(N):
            ctx = tuple(x[:i])
            if ctx not in rows:
                o, _ = forward(dec.params, dec.cfg, _ids(dec.bk, [prompt + list(ctx) + [0]]), need_cache=False)
                rows[ctx] = [F(float(v)) for v in dec.bk.to_numpy(processed_probs(o.logits[0, -1], 1.0))]
            pr *= rows[ctx][x[i]]
        out[x] = pr
    return out


@pytest.mark.parametrize("K,N,sample_drafts", [
    (1, 2, True), (1, 2, False), pytest.param(2, 3, False, marks=pytest.mark.slow),
    pytest.param(2, 3, True, marks=pytest.mark.slow)],
    ids=["K1-q-sampled", "K1-q-onehot", "K2-q-onehot", "K2-q-sampled"])
def test_loop_output_law_equals_target_by_enumeration(K, N, sample_drafts, monkeypatch):
    """The law of the first N tokens the loop emits (vocabulary 3, temperature 1) equals the
    target's, up to the float rounding of the probability rows (1e-11): the cells' masses are
    exact fractions and sum to exactly 1. Multi-step paths (a rejection, then a second step from
    the rolled-back caches) are part of the walk."""
    dec, draft = pair(seed=6, vocab=3, draft_seed=8)
    prompt = [0, 2, 1]
    law, leaves = loop_law(dec, draft, prompt, N, K, sample_drafts, monkeypatch)
    assert sum(law.values()) == 1
    want = target_law(dec, prompt, N)
    assert set(law) <= set(want)
    worst = max(abs(float(law.get(x, 0) - pr)) for x, pr in want.items())
    assert worst < 1e-11, worst
    assert leaves > 3 ** N  # not vacuous: paths through rejections and several steps


def test_enumeration_catches_a_lossy_rule(monkeypatch):
    """Negative control with the same walk: a rule that accepts every draft is not lossless, and the
    enumeration sees it (the tolerance 1e-11 is far from its error)."""
    import refmtp.inference.speculative as spec

    dec, draft = pair(seed=6, vocab=3, draft_seed=8)
    prompt = [0, 2, 1]
    real = spec._decide

    def accept_all(rule, logits, q, drafts, temperature, gen, typical_kw, seen=None):
        v = real(rule, logits, q, drafts, temperature, gen, typical_kw, seen)
        return v if not drafts else type(v)(len(drafts), tuple(drafts) + (v.tokens[-1],), False, True)

    monkeypatch.setattr(spec, "_decide", accept_all)  # a broken rule: every draft accepted
    law, _ = loop_law(dec, draft, prompt, 2, 1, True, monkeypatch)
    want = target_law(dec, prompt, 2)
    assert max(abs(float(law.get(x, 0) - pr)) for x, pr in want.items()) > 1e-3


# -------------------------------------------------------------------------------------------
# bad pairs
# -------------------------------------------------------------------------------------------
def test_bad_pairs_refused_in_one_line(tmp_path):
    dec, _ = pair()
    other = draft_config(preset("tiny").replace(vocab_size=32))
    small_vocab = Decoder(init_params(other, seed=0, dtype="float64"), other)
    with pytest.raises(ValueError, match="vocab_size is 32 in the draft model and 64 in the target") as e:
        speculative_generate(dec, [1, 2], 5, k=2, draft=small_vocab)
    assert "\n" not in str(e.value)
    eos = draft_config(dec.cfg).replace(extra={"eos_token_id": 7})
    with pytest.raises(ValueError, match="eos_token_id is 7 in the draft model and None"):
        speculative_generate(dec, [1, 2], 5, k=2, draft=Decoder(init_params(eos, seed=0, dtype="float64"), eos))
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer is"):
        check_pair(tokenizer_metadata(dec.cfg), tokenizer_metadata(dec.cfg, tmp_path))
    check_pair(tokenizer_metadata(dec.cfg, tmp_path), tokenizer_metadata(dec.cfg, tmp_path))  # same files
    with pytest.raises(ValueError, match="integer >= 0"):
        speculative_generate(dec, [1, 2], 5, k=-1, draft=pair()[1])
    short = pair()[1]
    short.cfg = short.cfg.replace(max_position_embeddings=8)
    with pytest.raises(ValueError, match="max_position_embeddings=8"):
        speculative_generate(dec, [1, 2], 5, k=2, draft=short)
