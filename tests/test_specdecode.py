"""Self-speculative decoding (refmtp/inference/speculative.py): greedy speculative output equals plain greedy
decoding token for token (random weights and a checkpoint trained with the training API); the
drafts and target rows are exactly what the training forward computes for the same sequences
(paper-order MTP drafting, parallel heads); stochastic mode is reproducible by seed, K = 0
equals plain sampling, and the emitted tokens / acceptance frequencies follow p and the closed
forms of docs/speculative-decoding.md §1.3; metrics of docs/speculative-decoding.md §5; input validation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from refmtp.config import preset
from refmtp.inference.decode import Decoder, generate
from refmtp.model import forward, init_params
from refmtp.inference.sampling import processed_probs
from refmtp.inference.speculative import StepRecord, spec_metrics, speculative_generate

TOL = 1e-10


# -------------------------------------------------------------------------------------------
# models
# -------------------------------------------------------------------------------------------
def _random_params(cfg, seed=0, backend=None):
    """Random float64 weights whose lm_head is dominated by one rank-1 direction, so main model
    and (random) MTP modules often agree: drafts get accepted AND rejected, at deep positions too.
    Drawn on the host, then moved to ``backend`` (a Backend; numpy when None): same values on both."""
    params = init_params(cfg, seed=seed, dtype="float64", std=0.3, bias_std=0.1)
    rng = np.random.default_rng(seed)
    V, d = params["lm_head.weight"].shape
    u, v = rng.standard_normal(V), rng.standard_normal(d)
    params["lm_head.weight"] = 8.0 * np.outer(u, v) / np.sqrt(d) + 0.3 * rng.standard_normal((V, d))
    if backend is None:
        return params
    return {k: backend.asarray(a, dtype=a.dtype.name) for k, a in params.items()}


def _ids(backend, seqs):
    """Host token lists -> a (B, T) int64 array on the backend."""
    return backend.asarray(np.asarray(seqs, dtype=np.int64), dtype="int64")


def _corpus_text(seed=0, n=400):
    rng = np.random.default_rng(seed)
    nouns = ["the cat", "a dog", "my bird", "one fish"]
    verbs = ["sat on", "ran to", "saw", "ate"]
    return " ".join(f"{rng.choice(nouns)} {rng.choice(verbs)} {rng.choice(nouns)}." for _ in range(n))


def train_tiny_checkpoint(base: Path) -> Path:
    """A tiny-preset checkpoint trained for 40 steps with the training API (float64), cached
    under ``base`` for the whole test session. Returns the checkpoint directory."""
    from refmtp.training.data import load_corpus
    from refmtp.training.rundir import latest_checkpoint
    from refmtp.training.trainer import Trainer, TrainSettings

    run = base / "tiny-mtp-run"
    if run.exists() and latest_checkpoint(run) is not None:
        return latest_checkpoint(run)
    data = base / "tiny-mtp-corpus.txt"
    data.write_text(_corpus_text())
    settings = TrainSettings(preset="tiny", steps=40, batch_size=8, seq_len=32, lr=1e-2,
                             warmup_steps=5, eval_every=0, log_every=10, checkpoint_every=0,
                             dtype="float64")
    result = Trainer.new(settings, preset("tiny"), run, corpus=load_corpus(data)).run()
    return result.checkpoint


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory):
    return train_tiny_checkpoint(tmp_path_factory.getbasetemp())


@pytest.fixture
def trained(trained_ckpt, backend):
    """(cfg, float64 params) of the trained checkpoint, loaded onto each backend."""
    from refmtp.checkpoint import load_checkpoint

    return load_checkpoint(trained_ckpt, backend=backend.name, dtype="float64")


# -------------------------------------------------------------------------------------------
# greedy: speculative == plain, token for token
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["absorbed", "naive"])
def test_greedy_equals_plain_random_weights(backend, mode):
    cfg = preset("tiny")  # D = 2 MTP modules
    dec = Decoder(_random_params(cfg, backend=backend), cfg)
    accepted_deep, rejected = 0, 0
    for prompt in ([2], [4, 4], [1, 5, 9, 3, 7]):
        plain = generate(dec, prompt, 30, mode=mode)
        for k, reuse in ((1, False), (2, False), (4, True)):
            res = speculative_generate(dec, prompt, 30, k=k, reuse_last_module=reuse, mode=mode)
            assert res.tokens == plain, (prompt, k)
            assert sum(s.emitted for s in res.steps) == 30
            accepted_deep += sum(1 for s in res.steps if s.A >= 2)
            rejected += sum(1 for s in res.steps if s.A < s.K)
    assert accepted_deep > 0 and rejected > 0  # both paths of the rule were exercised


def test_greedy_equals_plain_trained_checkpoint(trained):
    cfg, params = trained
    dec = Decoder(params, cfg)
    total_accepted = 0
    for text in (b"the cat sat", b"a dog ", b"one fish ate my"):
        plain = generate(dec, list(text), 40)
        for k, reuse in ((1, False), (2, False), (3, True)):
            res = speculative_generate(dec, list(text), 40, k=k, reuse_last_module=reuse)
            assert res.tokens == plain, (text, k)
            total_accepted += spec_metrics(res.steps)["accepted"]
    assert total_accepted > 0


def test_greedy_stop_token_truncates_emission(backend):
    cfg = preset("tiny")
    dec = Decoder(_random_params(cfg, backend=backend), cfg)
    plain = generate(dec, [4, 4], 30)
    stop = plain[7]
    want = plain[: plain.index(stop) + 1]
    res = speculative_generate(dec, [4, 4], 30, k=2, stop_token=stop)
    assert res.tokens == want
    assert sum(s.emitted for s in res.steps) == len(want)
    assert generate(dec, [4, 4], 30, stop_token=stop) == want


# -------------------------------------------------------------------------------------------
# what is drafted and verified is what the training forward computes
# -------------------------------------------------------------------------------------------
def test_drafts_and_targets_match_training_forward(backend):
    """Module s drafts d_s from row n-2 of the training forward run on seq + [d_1..d_{s-1}]
    (paper order, V3 eqs. 21-23); the verify rows are the main logits at positions n-1..n-1+K."""
    cfg = preset("tiny")
    params = _random_params(cfg, seed=1, backend=backend)
    h = backend.to_numpy
    dec = Decoder(params, cfg)
    prompt = [3, 3, 8]
    res = speculative_generate(dec, prompt, 16, k=cfg.D, trace=True)
    full = prompt + res.tokens
    checked = 0
    for step in res.trace:
        n, drafts = step["n"], step["drafts"]
        z = full[:n] + drafts + [0] * (cfg.D + 1)
        out, _ = forward(params, cfg, _ids(backend, [z]), need_cache=False)
        K = len(drafts)
        np.testing.assert_allclose(h(step["logits"]), h(out.logits[0, n - 1:n + K]), rtol=0, atol=TOL)
        for s in range(1, K + 1):
            np.testing.assert_allclose(h(step["draft_logits"][s - 1]), h(out.mtp_logits[s - 1][0, n - 2]),
                                       rtol=0, atol=TOL)
            checked += 1
    assert checked >= 8


def test_parallel_heads_blockwise_and_typical(backend):
    cfg = preset("tiny").replace(refmtp={"mtp_kind": "parallel"})
    params = _random_params(cfg, seed=2, backend=backend)
    dec = Decoder(params, cfg)
    prompt = [4, 4, 1]
    plain = generate(dec, prompt, 20)
    for rule in ("lossless", "blockwise"):
        res = speculative_generate(dec, prompt, 20, k=2, rule=rule, trace=True)
        assert res.tokens == plain  # greedy verification reproduces greedy decoding
    full = prompt + res.tokens
    for step in res.trace:  # head k's draft logits = its training-forward logits at row n-2
        n = step["n"]
        out, _ = forward(params, cfg, _ids(backend, [full[:n] + [0] * 3]), need_cache=False)
        for k, row in enumerate(step["draft_logits"], start=1):
            np.testing.assert_allclose(backend.to_numpy(row), backend.to_numpy(out.mtp_logits[k - 1][0, n - 2]),
                                       rtol=0, atol=TOL)
    typ = speculative_generate(dec, prompt, 20, k=2, rule="typical", temperature=0.7, seed=3)
    assert len(typ.tokens) == 20 and all(0 <= t < cfg.vocab_size for t in typ.tokens)
    assert typ.tokens == speculative_generate(dec, prompt, 20, k=2, rule="typical", temperature=0.7,
                                              seed=3).tokens
    with pytest.raises(ValueError, match="K <= D=2 parallel heads"):
        speculative_generate(dec, prompt, 5, k=3, reuse_last_module=True)


# -------------------------------------------------------------------------------------------
# stochastic mode
# -------------------------------------------------------------------------------------------
def test_sampling_seeded_and_k0_equals_plain_sampling(backend):
    cfg = preset("tiny")
    dec = Decoder(_random_params(cfg, seed=4, backend=backend), cfg)
    plain = generate(dec, [1, 2, 3], 25, temperature=0.8, seed=7)
    assert speculative_generate(dec, [1, 2, 3], 25, k=0, temperature=0.8, seed=7).tokens == plain
    a = speculative_generate(dec, [1, 2, 3], 25, k=2, temperature=0.8, seed=7, sample_drafts=True, trace=True)
    b = speculative_generate(dec, [1, 2, 3], 25, k=2, temperature=0.8, seed=7, sample_drafts=True)
    assert a.tokens == b.tokens and a.steps == b.steps
    for step in a.trace:  # q passed to the rule = softmax(draft logits / T), the law drafts came from
        assert (step["q"] is None) == (not step["drafts"])
        for q, row in zip(step["q"] or [], step["draft_logits"]):
            np.testing.assert_allclose(backend.to_numpy(q), backend.to_numpy(processed_probs(row, 0.8)),
                                       rtol=0, atol=1e-15)


@pytest.mark.parametrize("sample_drafts", [False, True])
def test_sampling_follows_target_and_acceptance_closed_form(trained, backend, sample_drafts):
    """Over 300 seeds, the first emitted token follows p_1 = softmax(logits/T) (chi-square), and
    draft 1 is accepted with probability p_1(argmax q) (one-hot q) or sum min(p_1, q_1) (docs/speculative-decoding.md §1.3)."""
    cfg, params = trained
    dec = Decoder(params, cfg)
    prompt, T, N = list(b"the quick"), 1.0, 300
    out, _ = forward(params, cfg, _ids(backend, [prompt + [0, 0, 0]]), need_cache=False)
    n = len(prompt)
    p1 = backend.to_numpy(processed_probs(out.logits[0, n - 1], T))
    q1 = backend.to_numpy(processed_probs(out.mtp_logits[0][0, n - 2], T))
    beta = float(np.minimum(p1, q1).sum()) if sample_drafts else float(p1[np.argmax(q1)])
    counts, accepted = np.zeros(cfg.vocab_size), 0
    for seed in range(N):
        res = speculative_generate(dec, prompt, 2, k=1, temperature=T, seed=seed,
                                   sample_drafts=sample_drafts)
        counts[res.tokens[0]] += 1
        accepted += res.steps[0].A
    assert abs(accepted / N - beta) < 5 * np.sqrt(beta * (1 - beta) / N) + 1e-9
    expected = p1 * N
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    assert stats.chi2.sf(chi2, len(exp) - 1) > 1e-4, chi2


# -------------------------------------------------------------------------------------------
# metrics and validation
# -------------------------------------------------------------------------------------------
def test_spec_metrics_by_hand():
    steps = [StepRecord(K=2, A=2, emitted=3), StepRecord(K=2, A=0, emitted=1),
             StepRecord(K=2, A=1, emitted=2), StepRecord(K=1, A=1, emitted=2),  # K capped at the end
             StepRecord(K=2, A=2, emitted=2, fallback=True)]  # a stop token cut the bonus... and d_2
    m = spec_metrics(steps, 2)
    # committed accepted drafts a = min(A, emitted): 2, 0, 1, 1, 2
    assert m["steps"] == 5 and m["tokens"] == 10 and m["drafted"] == 9 and m["accepted"] == 6
    assert m["acceptance_per_position"] == [4 / 5, 2 / 4]
    assert m["conditional_acceptance"] == [4 / 5, (2 / 4) / (4 / 5)]
    assert m["tau"] == 10 / 5 and m["draft_acceptance_rate"] == 6 / 9
    assert m["residual_fallbacks"] == 1
    empty = spec_metrics([], 1)
    assert empty["tau"] is None and empty["acceptance_per_position"] == [None]


def test_validation(backend):
    cfg = preset("tiny")
    dec = Decoder(_random_params(cfg, backend=backend), cfg)
    with pytest.raises(ValueError, match="exceed the D=2 MTP modules"):
        speculative_generate(dec, [1, 2], 5, k=3)
    with pytest.raises(ValueError, match="integer >= 0"):
        speculative_generate(dec, [1, 2], 5, k=-1)
    with pytest.raises(ValueError, match="rule="):
        speculative_generate(dec, [1, 2], 5, k=1, rule="medusa")
    with pytest.raises(ValueError, match="temperature"):
        speculative_generate(dec, [1, 2], 5, k=1, temperature=-0.5)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        speculative_generate(dec, [999], 5, k=1)
    # a one-token prompt has no MTP row yet: the first step drafts nothing, then drafting starts
    res = speculative_generate(dec, [5], 6, k=2)
    assert res.steps[0].K == 0 and res.tokens == generate(dec, [5], 6)
    assert speculative_generate(dec, [5], 0, k=2).tokens == []
