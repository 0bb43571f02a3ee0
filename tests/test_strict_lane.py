"""The strict lane: the math of refmtp/ on ``array_api_strict`` arrays agrees with numpy.

``array_api_strict`` (backends/strict_backend.py, ``get_backend("strict")``) raises on anything
outside the array-API standard: fancy-index assignment, ``.T`` on >2-D arrays, numpy-only
functions and methods, mixed python-scalar/array promotion the standard forbids. Each case below
runs one piece of the math on numpy (plain path, kernels off) and on strict, from the same host
inputs, and compares every output and gradient to 1e-12 relative in float64 (integers, e.g. the
routing, exactly). The strict backend has no kernels and does its scatter-add as a one-hot
matmul, so it also checks the plain ``_ref`` paths against numpy's ``np.add.at``.

Code behind ``on("...")`` mutation switches only runs under a mutation and is not covered.
"""
from __future__ import annotations

import numpy as np
import pytest

from refmtp.backends import BackendUnavailable, get_backend
from tests.test_ops import OPS, _op_case, assert_parity, run_on

try:
    STRICT = get_backend("strict")
    _REASON = None
except BackendUnavailable as exc:  # pragma: no cover - array-api-strict is in the test extra
    STRICT, _REASON = None, str(exc)

pytestmark = pytest.mark.skipif(STRICT is None, reason=f"{_REASON}")

RTOL = 1e-12


def _both(fn, what):
    """fn(bk) on plain numpy and on strict; compare."""
    want = run_on(get_backend("numpy"), fn, kernels=False)
    got = run_on(STRICT, fn, kernels=False)
    assert_parity(got, want, rtol=RTOL, what=f"strict {what}: ")
    return got


def test_strict_backend_is_strict():
    xp = STRICT.xp
    a = STRICT.asarray(np.arange(24.0).reshape(2, 3, 4))
    assert type(a).__module__.startswith("array_api_strict")
    with pytest.raises((AttributeError, ValueError)):
        a.T  # noqa: B018 - .T is only defined for 2-D arrays in the standard
    with pytest.raises(AttributeError):
        a.astype  # noqa: B018 - not a standard method
    assert STRICT.kernel("rope_apply") is None
    out = STRICT.zeros((3, 2))
    STRICT.scatter_add(out, STRICT.asarray(np.array([0, 2, 0])), STRICT.asarray(np.ones((3, 2))))
    np.testing.assert_array_equal(STRICT.to_numpy(out), [[2, 2], [0, 0], [1, 1]])
    idx, val = STRICT.topk(STRICT.asarray(np.array([[1.0, 3.0, 3.0, 0.0]])), 2)
    assert STRICT.to_numpy(idx).tolist() == [[1, 2]] and STRICT.to_numpy(val).tolist() == [[3, 3]]
    assert xp.__name__ == "array_api_strict"


@pytest.mark.parametrize("op", OPS)
def test_ops_forward_backward(op):
    _both(_op_case(op), op)


@pytest.mark.parametrize("variant", ["tiny", "no_q_lora", "yarn"])
def test_mla_forward_backward(variant):
    from tests.test_mla import _cfg, mla_parity_outputs

    cfg = _cfg(variant)
    _both(lambda bk: mla_parity_outputs(bk, cfg), f"mla {variant}")


def _moe_names():
    from tests.test_moe import CONFIGS

    return list(CONFIGS)


@pytest.mark.parametrize("name", _moe_names())
def test_moe_forward_backward(name):
    from refmtp.model.moe import moe_backward, moe_forward
    from tests.test_moe import gapped_fixture, make_cfg

    cfg = make_cfg(name)
    x0, p0 = gapped_fixture(get_backend("numpy"), cfg, 3, 5, seed=11)  # no routing tie
    p0 = {k: np.asarray(v) for k, v in p0.items()}
    x0 = np.asarray(x0)
    d0 = np.random.default_rng(12).standard_normal(x0.shape)

    def fn(bk):
        h = bk.to_numpy
        p = {k: bk.asarray(v) for k, v in p0.items()}  # the float32 bias stays float32
        out, aux, cache = moe_forward(bk.asarray(x0), p, cfg)
        dx, grads = moe_backward(bk.asarray(d0), 0.7, cache)
        return {"out": h(out), "aux": h(aux), "topk_idx": h(cache.topk_idx), "load": h(cache.load),
                "topk_weight": h(cache.topk_weight), "order": h(cache.order), "dx": h(dx),
                **{f"grad.{k}": h(v) for k, v in grads.items()}}

    _both(fn, f"moe {name}")


def _model_variants():
    from tests.test_model import VARIANTS

    return list(VARIANTS)


@pytest.mark.parametrize("variant", _model_variants())
def test_model_forward_backward(variant):
    from tests.test_model import _model_case

    got = _both(_model_case(variant), f"model {variant}")
    assert any(k.startswith("routing/") for k in got) and any(k.startswith("grad/") for k in got)


@pytest.mark.parametrize("mode", ["absorbed", "naive"])
def test_cached_decoding_matches_full_forward(mode):
    """Main-model logits through the cache (absorbed latent cache, or the naive per-head k/v
    cache; prompt, then one token at a time, growing the buffers) equal the full forward's
    logits, on strict as on numpy."""
    from refmtp.config import preset
    from refmtp.inference.decode import Decoder
    from refmtp.model import forward, init_params

    cfg = preset("tiny")
    toks = np.random.default_rng(3).integers(0, cfg.vocab_size, size=(2, 8))

    def fn(bk):
        params = init_params(cfg, seed=5, backend=bk, std=0.2, bias_std=0.1)
        out, _ = forward(params, cfg, bk.asarray(toks, dtype="int64"), need_cache=False)
        dec = Decoder(params, cfg)
        cache = dec.new_cache(batch=2, mode=mode, capacity=4)  # the prompt grows it
        rows = [dec.main(bk.asarray(toks[:, :5], dtype="int64"), cache).logits]
        for t in range(5, 7):
            rows.append(dec.main(bk.asarray(toks[:, t:t + 1], dtype="int64"), cache).logits)
        cached = bk.xp.concat(rows, axis=1)  # (2, 7, V)
        return {"full": bk.to_numpy(out.logits), "cached": bk.to_numpy(cached)}

    got = _both(fn, f"decode {mode}")
    np.testing.assert_allclose(got["cached"], got["full"], rtol=1e-10, atol=1e-12)


def _strict_or_none(a, dtype=None):
    return None if a is None else STRICT.asarray(np.asarray(a), dtype=dtype)


def test_acceptance_rule_on_records():
    """verify_drafts on every dyadic golden acceptance record, with p, q and logits as strict
    arrays: the same Verdict as on numpy."""
    from refmtp.inference.acceptance import verify_drafts
    from refmtp.verification.acceptance_cases import dyadic_cases

    cases = dyadic_cases()
    for c in cases:
        want = verify_drafts(c["p"], c["q"], c["drafts"], c["u_accept"], c["u_sample"], c["greedy"],
                             c["logits"])
        q = c["q"]
        if q is not None and len(q) == 0:
            q = np.zeros((0, c["V"]))  # an empty q list for K = 0
        got = verify_drafts(_strict_or_none(c["p"]), _strict_or_none(q), c["drafts"],
                            c["u_accept"], c["u_sample"], c["greedy"], _strict_or_none(c["logits"]))
        assert tuple(got) == tuple(want), c["case"]
    assert len(cases) >= 40


def test_acceptance_batch_ref_on_records():
    """verify_drafts_batch_ref on the dyadic records (grouped by shape) and on random batches
    with every kind of row: the same verdict arrays as on numpy."""
    from refmtp.inference.acceptance import verify_drafts_batch_ref
    from tests.test_accept_kernels import _dyadic_groups, _stack_cases, random_batch

    batches = [_stack_cases(cases) for cases in _dyadic_groups().values()]
    batches += [random_batch(7, 40, 3, 6), random_batch(8, 30, 2, 5, one_hot=True)]
    for i, args in enumerate(batches):
        want = verify_drafts_batch_ref(*args)
        got = verify_drafts_batch_ref(*(_strict_or_none(a) for a in args))
        for name, w, g in zip(want._fields, want, got):
            np.testing.assert_array_equal(STRICT.to_numpy(g), np.asarray(w), err_msg=f"batch {i} {name}")
