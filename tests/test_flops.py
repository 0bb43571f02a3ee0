"""refmtp.verification.flops against the matmuls the model actually runs.

The count is taken by running ``refmtp.model.forward`` / ``backward`` on parameters wrapped in
a numpy subclass whose ``__array_ufunc__`` sees every ``np.matmul`` (the ``@`` operator) and adds
``2 * batch * m * n * k`` FLOPs. Subclass-ness propagates through every array derived from the
parameters; a product between two plain arrays would be missed, and would make the count
disagree with the formula, so the comparison can fail in both directions. Other contraction
routines (dot, einsum, tensordot, ...) are not counted: if the model ever calls one on a
parameter-derived array the test fails and asks for the counter to be extended.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from refmtp.backends import set_kernels_enabled
from refmtp.config import preset
from refmtp.verification.flops import FlopCount, block_flops, model_flops, train_step_flops
from refmtp.model import backward, forward, init_params

_UNCOUNTED_FUNCS = {np.dot, np.einsum, np.tensordot, np.inner, np.vdot, np.outer, np.kron,
                    np.linalg.multi_dot}
_UNCOUNTED_UFUNCS = {getattr(np, n) for n in ("vecdot", "matvec", "vecmat") if hasattr(np, n)}


class _Tally:
    def __init__(self):
        self.flops = 0
        self.products = 0
        self.uncounted: list[str] = []

    def matmul(self, a_shape, b_shape):
        a, b = tuple(a_shape), tuple(b_shape)
        m, k = (1, a[0]) if len(a) == 1 else a[-2:]
        k2, n = (b[0], 1) if len(b) == 1 else b[-2:]
        assert k == k2, (a, b)
        batch = np.broadcast_shapes(a[:-2] if len(a) > 1 else (), b[:-2] if len(b) > 1 else ())
        self.flops += 2 * math.prod(batch) * m * n * k
        self.products += 1


TALLY = _Tally()


def _plain(x):
    return x.view(np.ndarray) if isinstance(x, Counting) else x


def _wrap(x):
    if isinstance(x, np.ndarray) and not isinstance(x, Counting):
        return x.view(Counting)
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    return x


class Counting(np.ndarray):
    """An ndarray that reports every matmul it takes part in to ``TALLY``."""

    # refmtp.backends.backend_of recognises numpy arrays by the module of their type
    __module__ = "numpy"

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        args = [_plain(x) for x in inputs]
        if out is not None:
            kwargs["out"] = tuple(_plain(o) for o in out)
        if ufunc is np.matmul and method == "__call__":
            TALLY.matmul(args[0].shape, args[1].shape)
        elif ufunc in _UNCOUNTED_UFUNCS:
            TALLY.uncounted.append(ufunc.__name__)
        result = getattr(ufunc, method)(*args, **kwargs)
        if method == "at":
            return None
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _wrap(result)

    def __array_function__(self, func, types, args, kwargs):
        if func in _UNCOUNTED_FUNCS:
            TALLY.uncounted.append(func.__name__)
        return _wrap(super().__array_function__(func, types, args, kwargs))  # e.g. concat


def measured(cfg, B, T, seed=0):
    """(forward FLOPs, backward FLOPs, products) counted while running the model."""
    params = {k: v.view(Counting) for k, v in init_params(cfg, seed=seed, dtype="float64").items()}
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(B, T + 1)).astype(np.int64)
    prev = set_kernels_enabled(False)  # Numba kernels take plain arrays (and run no matmul)
    try:
        TALLY.__init__()
        out, cache = forward(params, cfg, tokens)
        fwd, n_fwd = TALLY.flops, TALLY.products
        assert np.isfinite(float(out.losses["total"]))
        TALLY.flops = TALLY.products = 0
        grads = backward(cache)
        bwd, n_bwd = TALLY.flops, TALLY.products
        assert set(grads) and all(np.isfinite(np.asarray(g)).all() for g in grads.values())
    finally:
        set_kernels_enabled(prev)
    assert not TALLY.uncounted, (
        f"the model called {sorted(set(TALLY.uncounted))}: extend the counter in tests/test_flops.py"
    )
    return fwd, bwd, n_fwd + n_bwd


def _tiny(**changes):
    refmtp = changes.pop("refmtp", None)
    cfg = preset("tiny")
    if refmtp:
        changes["refmtp"] = refmtp
    return cfg.replace(**changes) if changes else cfg


CASES = [
    pytest.param(_tiny(), 2, 7, id="tiny-causal-D2"),
    pytest.param(_tiny(), 1, 3, id="tiny-shortest-window"),  # depth 2 has a single row
    pytest.param(_tiny(refmtp={"mtp_kind": "parallel"}), 3, 5, id="tiny-parallel-heads"),
    pytest.param(_tiny(q_lora_rank=None, n_shared_experts=0, first_k_dense_replace=0,
                       num_experts_per_tok=3, n_group=1, topk_group=1), 2, 6, id="no-q-lora-no-shared"),
    pytest.param(_tiny(n_routed_experts=0, num_nextn_predict_layers=1), 2, 5, id="dense-only"),
    pytest.param(preset("small"), 1, 9, id="small"),
]


@pytest.mark.parametrize("cfg,B,T", CASES)
def test_formula_matches_counted_matmuls(cfg, B, T):
    fwd, bwd, products = measured(cfg, B, T)
    assert products > 0
    count = model_flops(cfg, B, T)
    assert count.forward == fwd
    assert count.backward == bwd
    assert train_step_flops(cfg, B, T) == fwd + bwd


def test_counter_counts_a_known_product_and_flags_einsum():
    TALLY.__init__()
    a = np.ones((3, 4, 5)).view(Counting)
    _ = a @ np.ones((5, 6))
    assert TALLY.flops == 2 * 3 * 4 * 5 * 6 and TALLY.products == 1
    np.einsum("ijk,kl->ijl", a, np.ones((5, 6)))
    assert TALLY.uncounted == ["einsum"]
    TALLY.__init__()


def test_parts_add_up_and_backward_is_twice_forward():
    cfg = preset("small")
    c = model_flops(cfg, 16, 128)
    assert isinstance(c, FlopCount)
    assert sum(c.parts.values()) == c.forward
    assert c.backward == 2 * c.forward and c.total == 3 * c.forward
    assert 0 < c.attention_useful < c.parts["attention_scores"]
    # every block's parts are in the model's, and MoE appears only on MoE layers
    assert "dense_mlp" in block_flops(cfg, 0, 1, 4) and "moe_routed" in block_flops(cfg, 1, 1, 4)
    # doubling the batch doubles every term (all are linear in B)
    c2 = model_flops(cfg, 32, 128)
    assert c2.forward == 2 * c.forward


@pytest.mark.parametrize("batch,seq", [(0, 8), (2, 0), (2, 2), (1.5, 8)])
def test_bad_shapes_raise(batch, seq):
    with pytest.raises(ValueError, match="flops"):
        model_flops(preset("tiny"), batch, seq)  # tiny has D=2: seq must be >= 3


def test_useful_flops_drop_the_masked_half_of_the_attention_products():
    """useful_train_step_flops = the full-square count minus 3 x the masked pairs' q k^T and p v work,
    the masked pairs counted here from the rows of every main layer and MTP depth."""
    from refmtp.verification.flops import useful_train_step_flops

    cfg = preset("small")
    B, T = 2, 9
    H, Dq, Dv = cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    rows = [T] * cfg.num_hidden_layers + [T - k for k in range(1, cfg.D + 1)]
    masked = sum(2 * B * H * (r * (r - 1) // 2) * (Dq + Dv) for r in rows)  # pairs j > t
    assert useful_train_step_flops(cfg, B, T) == train_step_flops(cfg, B, T) - 3 * masked
