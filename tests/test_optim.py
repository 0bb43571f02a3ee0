"""AdamW, the warmup+cosine schedule and gradient clipping against hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest

from refmtp.params import decays
from refmtp.training.optim import (AdamW, AdamWSettings, CosineSchedule, clip_grads, clip_scales, first_nonfinite, global_grad_norm, load_optimizer, save_optimizer)


def _host(backend, d):
    return {k: backend.to_numpy(v) for k, v in d.items()}


# -------------------------------------------------------------------------------------------
# schedule
# -------------------------------------------------------------------------------------------
def test_schedule_by_hand():
    s = CosineSchedule(lr=1.0, warmup_steps=4, decay_steps=14, min_lr_ratio=0.1)
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]  # linear warmup, step 3 = peak
    assert s(4) == pytest.approx(1.0)  # cosine starts at the peak
    assert s(9) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: (1 + cos(pi/2)) / 2 = 1/2
    assert s(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    assert s(14) == pytest.approx(0.1) and s(1000) == pytest.approx(0.1)  # holds the minimum
    vals = [s(i) for i in range(4, 15)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))  # monotone decay


def test_schedule_without_warmup_and_bad_values():
    s = CosineSchedule(lr=2.0, warmup_steps=0, decay_steps=10, min_lr_ratio=0.0)
    assert s(0) == 2.0 and s(5) == pytest.approx(1.0) and s(10) == 0.0
    with pytest.raises(ValueError, match="warmup_steps"):
        CosineSchedule(lr=1.0, warmup_steps=20, decay_steps=10)
    with pytest.raises(ValueError, match="learning rate"):
        CosineSchedule(lr=float("nan"), warmup_steps=0, decay_steps=10)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        CosineSchedule(lr=1.0, warmup_steps=0, decay_steps=10, min_lr_ratio=1.5)


# -------------------------------------------------------------------------------------------
# AdamW
# -------------------------------------------------------------------------------------------
def test_adamw_two_steps_by_hand(backend):
    """Two updates of a 2-vector, recomputed with Python floats from the published algorithm."""
    lr1, lr2, b1, b2, eps, wd = 0.1, 0.05, 0.9, 0.99, 1e-8, 0.1
    p0, g1, g2 = [1.0, -2.0], [0.5, -1.0], [-0.25, 2.0]
    expected = []
    for i in range(2):
        # step 1: m = (1-b1) g1, v = (1-b2) g1^2, bias corrections 1-b1, 1-b2
        m1, v1 = (1 - b1) * g1[i], (1 - b2) * g1[i] ** 2
        p1 = p0[i] * (1 - lr1 * wd) - lr1 * (m1 / (1 - b1)) / (math.sqrt(v1 / (1 - b2)) + eps)
        # step 2
        m2, v2 = b1 * m1 + (1 - b1) * g2[i], b2 * v1 + (1 - b2) * g2[i] ** 2
        p2 = p1 * (1 - lr2 * wd) - lr2 * (m2 / (1 - b1 ** 2)) / (math.sqrt(v2 / (1 - b2 ** 2)) + eps)
        expected.append((p1, p2))
    # step 1 of Adam moves each coordinate by lr * sign(g) (up to eps): check the hand numbers
    assert expected[0][0] == pytest.approx(1.0 * 0.99 - 0.1, abs=1e-7)

    params = {"w.weight": backend.asarray(p0, dtype="float64")}
    opt = AdamW(AdamWSettings(beta1=b1, beta2=b2, eps=eps, weight_decay=wd))
    opt.step(params, {"w.weight": backend.asarray(g1, dtype="float64")}, lr1)
    np.testing.assert_allclose(backend.to_numpy(params["w.weight"]), [e[0] for e in expected],
                               rtol=1e-15)
    opt.step(params, {"w.weight": backend.asarray(g2, dtype="float64")}, lr2)
    np.testing.assert_allclose(backend.to_numpy(params["w.weight"]), [e[1] for e in expected],
                               rtol=1e-15)
    assert opt.step_count == 2


def test_adamw_constant_gradient_closed_form(backend):
    """With a constant gradient the bias-corrected moments are exact: m^ = g, v^ = g^2, so
    without decay each step moves p by lr * g / (|g| + eps)."""
    g = np.array([[0.3, -2.0, 1e-3]])
    p0 = np.array([[1.0, 2.0, 3.0]])
    params = {"a.weight": backend.asarray(p0, dtype="float64")}
    opt = AdamW(AdamWSettings(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0))
    for _ in range(7):
        opt.step(params, {"a.weight": backend.asarray(g, dtype="float64")}, 0.01)
    want = p0 - 7 * 0.01 * g / (np.abs(g) + 1e-8)
    np.testing.assert_allclose(backend.to_numpy(params["a.weight"]), want, rtol=1e-12)


def test_no_weight_decay_on_norms_and_biases(backend):
    names = ["model.layers.0.input_layernorm.weight", "model.norm.weight",
             "model.layers.2.enorm.weight", "model.layers.1.mlp.gate.e_score_correction_bias",
             "x.bias"]
    assert not any(decays(n) for n in names)
    assert decays("model.layers.0.self_attn.q_a_proj.weight")
    assert decays("model.embed_tokens.weight") and decays("lm_head.weight")
    # zero gradient: the Adam term is 0, only the decoupled decay can move a parameter
    params = {"model.norm.weight": backend.asarray([1.0, 2.0], dtype="float64"),
              "lin.weight": backend.asarray([1.0, 2.0], dtype="float64"),
              "untouched.bias": backend.asarray([5.0], dtype="float64")}
    grads = {k: backend.zeros((2,), "float64") for k in ("model.norm.weight", "lin.weight")}
    AdamW(AdamWSettings(weight_decay=0.5)).step(params, grads, 0.1)
    np.testing.assert_array_equal(backend.to_numpy(params["model.norm.weight"]), [1.0, 2.0])
    np.testing.assert_allclose(backend.to_numpy(params["lin.weight"]), [0.95, 1.9], rtol=1e-15)
    np.testing.assert_array_equal(backend.to_numpy(params["untouched.bias"]), [5.0])  # no grad


def test_adamw_keeps_float32_and_rejects_mismatch(backend):
    params = {"w": backend.asarray(np.ones((3, 2)), dtype="float32")}
    AdamW().step(params, {"w": backend.asarray(np.ones((3, 2)), dtype="float32")}, 1e-3)
    assert str(params["w"].dtype) == "float32"
    with pytest.raises(ValueError, match="parameter is"):
        AdamW().step(params, {"w": backend.asarray(np.ones((2, 3)), dtype="float32")}, 1e-3)
    with pytest.raises(ValueError, match="no parameter"):
        AdamW().step(params, {"v": backend.asarray(np.ones((3, 2)), dtype="float32")}, 1e-3)


# -------------------------------------------------------------------------------------------
# clipping
# -------------------------------------------------------------------------------------------
def test_global_norm_and_clipping(backend):
    grads = {"a": backend.asarray([3.0, 0.0], dtype="float32"),
             "b": backend.asarray([[4.0]], dtype="float32")}
    assert global_grad_norm(grads) == 5.0
    clipped, norm = clip_grads(grads, 1.0)
    assert norm == 5.0
    scale = 1.0 / (5.0 + 1e-6)
    np.testing.assert_allclose(backend.to_numpy(clipped["a"]), [3 * scale, 0.0], rtol=1e-6)
    np.testing.assert_allclose(backend.to_numpy(clipped["b"]), [[4 * scale]], rtol=1e-6)
    assert str(clipped["a"].dtype) == "float32"
    np.testing.assert_array_equal(backend.to_numpy(grads["a"]), [3.0, 0.0])  # input untouched
    same, _ = clip_grads(grads, 10.0)
    np.testing.assert_array_equal(backend.to_numpy(same["b"]), [[4.0]])
    off, _ = clip_grads(grads, 0.0)  # clipping off
    np.testing.assert_array_equal(backend.to_numpy(off["b"]), [[4.0]])


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "reference"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("max_norm", [0.5, 1e6, 0.0], ids=["clipping", "under-the-norm", "off"])
def test_adamw_reading_clip_scales_is_clip_then_step(backend, dtype, max_norm, kernels):
    """AdamW applying the clipping factors as it reads the gradients (the training step's way)
    takes the same updates, bit for bit, as AdamW on clip_grads' scaled copies."""
    from refmtp.backends import set_kernels_enabled

    rng = np.random.default_rng(3)
    shapes = {"a.weight": (7, 5), "b.norm.weight": (5,), "c.weight": (3, 4, 2)}
    params = {n: backend.asarray(rng.standard_normal(sh), dtype=dtype) for n, sh in shapes.items()}
    steps = [{n: backend.asarray(rng.standard_normal(sh) * (t + 1), dtype=dtype) for n, sh in shapes.items()}
             for t in range(3)]
    prev = set_kernels_enabled(kernels)
    try:
        folded, copied = dict(params), dict(params)
        opt_folded, opt_copied = AdamW(), AdamW()
        for g in steps:
            scales, norm = clip_scales(g, max_norm)
            assert set(scales.values()) == {min(1.0, max_norm / (norm + 1e-6)) if 0 < max_norm < norm else 1.0}
            opt_folded.step(folded, g, 1e-2, scales)
            clipped, _ = clip_grads(g, max_norm)
            opt_copied.step(copied, clipped, 1e-2)
    finally:
        set_kernels_enabled(prev)
    for n in shapes:
        np.testing.assert_array_equal(backend.to_numpy(folded[n]), backend.to_numpy(copied[n]))
        assert not np.array_equal(backend.to_numpy(folded[n]), backend.to_numpy(params[n]))


def test_global_norm_matches_numpy_and_finds_nonfinite(backend):
    rng = np.random.default_rng(0)
    host = {f"t{i}": rng.standard_normal((5, i + 1)) for i in range(4)}
    grads = {k: backend.asarray(v, dtype="float64") for k, v in host.items()}
    want = np.linalg.norm(np.concatenate([v.ravel() for v in host.values()]))
    assert global_grad_norm(grads) == pytest.approx(want, rel=1e-14)
    assert first_nonfinite(grads) is None
    host["t2"][1, 1] = np.nan
    grads["t2"] = backend.asarray(host["t2"], dtype="float64")
    assert first_nonfinite(grads) == "t2"
    assert math.isnan(global_grad_norm(grads))


# -------------------------------------------------------------------------------------------
# serialisation
# -------------------------------------------------------------------------------------------
def test_state_round_trip_is_bit_exact(backend, tmp_path):
    rng = np.random.default_rng(3)
    shapes = {"x.weight": (4, 3), "n.norm.weight": (3,)}
    params = {k: backend.asarray(rng.standard_normal(s), dtype="float32") for k, s in shapes.items()}
    gseq = [{k: backend.asarray(rng.standard_normal(s), dtype="float32") for k, s in shapes.items()}
            for _ in range(3)]
    opt = AdamW(AdamWSettings(beta1=0.8, beta2=0.9, weight_decay=0.05))
    for g in gseq[:2]:
        opt.step(params, g, 1e-2)
    save_optimizer(tmp_path / "opt.safetensors", opt)
    copy = {k: backend.asarray(backend.to_numpy(v).copy(), dtype="float32") for k, v in params.items()}
    loaded = load_optimizer(tmp_path / "opt.safetensors", copy)
    assert loaded.step_count == 2 and loaded.settings == opt.settings
    for k in shapes:
        np.testing.assert_array_equal(backend.to_numpy(loaded.m[k]), backend.to_numpy(opt.m[k]))
        np.testing.assert_array_equal(backend.to_numpy(loaded.v[k]), backend.to_numpy(opt.v[k]))
    opt.step(params, gseq[2], 1e-2)
    loaded.step(copy, gseq[2], 1e-2)
    for k in shapes:
        np.testing.assert_array_equal(backend.to_numpy(copy[k]), backend.to_numpy(params[k]))


def test_load_rejects_mismatched_state(tmp_path):
    from refmtp.backends import get_backend

    bk = get_backend("numpy")
    params = {"x.weight": bk.asarray(np.ones((2, 2)), dtype="float32")}
    opt = AdamW()
    opt.step(params, {"x.weight": bk.asarray(np.ones((2, 2)), dtype="float32")}, 0.1)
    save_optimizer(tmp_path / "o.safetensors", opt)
    with pytest.raises(ValueError, match="shape"):
        load_optimizer(tmp_path / "o.safetensors", {"x.weight": bk.zeros((3, 2), "float32")})
    with pytest.raises(ValueError, match="does not have"):
        load_optimizer(tmp_path / "o.safetensors", {"y.weight": bk.zeros((2, 2), "float32")})
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read"):
        load_optimizer(tmp_path / "bad.safetensors", params)
