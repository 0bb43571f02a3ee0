"""RoPE / YaRN (docs/deepseek-v3.md §2.4, §2.5): frequencies, scales, the interleaved rotation, its backward,
and the Numba / CUDA kernels against the plain-array reference."""
from __future__ import annotations

import math
import shutil
import subprocess

import numpy as np
import pytest

from refmtp.backends import get_backend, set_kernels_enabled
from refmtp.backends import numba_rope
from refmtp.backends.cupy_kernels import INCLUDE_OPTION, cu_source
from refmtp.config import preset
from refmtp.verification.gradcheck import check_grad
from refmtp.model.ops.rope import (
    check_positions, check_rope_args, rope_apply_ref, rope_attention_factor, rope_backward, rope_forward,
    rope_freqs, rope_tables, softmax_scale, yarn_correction_range,
)


def yarn_cfg(Dr=8, L0=64, factor=8.0, mscale=1.0, mscale_all_dim=0.8, **extra):
    """A small YaRN config where the ramp is partial (low=0, high=2 for Dr=8, L0=64)."""
    rs = {"type": "yarn", "factor": factor, "original_max_position_embeddings": L0,
          "beta_fast": 32, "beta_slow": 1, "mscale": mscale, "mscale_all_dim": mscale_all_dim}
    rs.update(extra)
    return preset("tiny").replace(qk_rope_head_dim=Dr, rope_scaling=rs)


def _rand(bk, rng, *shape, dtype="float64"):
    return bk.asarray(rng.standard_normal(shape), dtype=dtype)


def _pos(bk, T, offset=0):
    return bk.asarray(np.arange(T) + offset, dtype="int64")


# ------------------------------------------------------------------------------------------
# frequencies and scales
# ------------------------------------------------------------------------------------------
def test_v3_yarn_numbers():
    cfg = preset("deepseek-v3")
    assert yarn_correction_range(cfg) == (10, 23)  # docs/deepseek-v3.md §2.4 (computed 10.47 and 22.51)
    assert softmax_scale(cfg) == pytest.approx(0.1352338, abs=5e-8)  # docs/deepseek-v3.md §2.5
    assert rope_attention_factor(cfg) == 1.0  # get_mscale(40, 1) / get_mscale(40, 1)
    th = [10000.0 ** (-2 * j / 64) for j in range(32)]
    f = rope_freqs(cfg)
    assert len(f) == 32
    for j in range(32):
        ramp = min(max((j - 10) / 13, 0.0), 1.0)
        assert f[j] == pytest.approx(th[j] / 40 * ramp + th[j] * (1 - ramp), rel=1e-14)
    assert f[:11] == pytest.approx(th[:11], rel=1e-15)  # high-frequency pairs kept
    assert f[23:] == pytest.approx([t / 40 for t in th[23:]], rel=1e-15)  # low ones divided by s


def test_freqs_and_scale_without_rope_scaling():
    cfg = preset("tiny")
    assert cfg.rope_scaling is None
    assert rope_freqs(cfg) == pytest.approx([10000.0 ** (-2 * j / 4) for j in range(2)], rel=1e-15)
    assert softmax_scale(cfg) == pytest.approx(8 ** -0.5, rel=1e-15)
    assert rope_attention_factor(cfg) == 1.0
    assert yarn_correction_range(cfg) is None


def test_yarn_factor_one_changes_nothing():
    cfg = yarn_cfg(factor=1.0)
    plain = preset("tiny").replace(qk_rope_head_dim=8)
    assert rope_freqs(cfg) == pytest.approx(rope_freqs(plain), rel=1e-15)
    assert softmax_scale(cfg) == softmax_scale(plain)
    assert rope_attention_factor(cfg) == 1.0


def test_small_yarn_config_has_a_partial_ramp_and_both_mscales():
    cfg = yarn_cfg()
    assert yarn_correction_range(cfg) == (0, 2)
    th = [10000.0 ** (-2 * j / 8) for j in range(4)]
    assert rope_freqs(cfg) == pytest.approx([th[0], th[1] * (0.5 / 8 + 0.5), th[2] / 8, th[3] / 8],
                                            rel=1e-14)
    m_all = 0.1 * 0.8 * math.log(8) + 1
    assert softmax_scale(cfg) == pytest.approx(12 ** -0.5 * m_all ** 2, rel=1e-14)
    assert rope_attention_factor(cfg) == pytest.approx((0.1 * math.log(8) + 1) / m_all, rel=1e-14)
    # mscale_all_dim omitted -> 0 (HF default): plain YaRN factor on cos/sin, no softmax mscale
    cfg0 = preset("tiny").replace(rope_scaling={"type": "yarn", "factor": 8,
                                                "original_max_position_embeddings": 64})
    assert rope_attention_factor(cfg0) == pytest.approx(0.1 * math.log(8) + 1, rel=1e-14)
    assert softmax_scale(cfg0) == pytest.approx(8 ** -0.5, rel=1e-15)


def _v3_like(**ms):
    rs = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
          "beta_fast": 32, "beta_slow": 1, **ms}
    return preset("tiny").replace(rope_scaling=rs)


G40 = 0.1 * math.log(40) + 1  # get_mscale(40) = 1.3688879...
G40_707 = 0.1 * 0.707 * math.log(40) + 1  # get_mscale(40, 0.707) = 1.2608037...


@pytest.mark.parametrize("ms, factor, m_softmax", [
    # V3: both 1 -> ratio 1; softmax mscale get_mscale(40, 1)
    ({"mscale": 1.0, "mscale_all_dim": 1.0}, 1.0, G40),
    # V2 / V2-Lite: both 0.707 -> ratio 1
    ({"mscale": 0.707, "mscale_all_dim": 0.707}, 1.0, G40_707),
    # mscale without mscale_all_dim: HF falls back to get_mscale(s) = 1.3689 (hub/vLLM: 1.2608)
    ({"mscale": 0.707}, G40, 1.0),
    ({"mscale": 0.707, "mscale_all_dim": 0}, G40, 1.0),
    # both present and non-zero: the ratio, 1.3689 / 1.2608 = 1.0857
    ({"mscale": 1.0, "mscale_all_dim": 0.707}, G40 / G40_707, G40_707),
    # mscale 0 or missing with mscale_all_dim set: HF ignores the ratio -> get_mscale(s)
    ({"mscale": 0, "mscale_all_dim": 1.0}, G40, G40),
    ({"mscale_all_dim": 1.0}, G40, G40),
    # neither: plain YaRN factor, no softmax mscale
    ({}, G40, 1.0),
])
def test_yarn_magnitudes_follow_hf(ms, factor, m_softmax):
    # HF transformers _compute_yarn_parameters: attention_factor = get_mscale(s, mscale) /
    # get_mscale(s, mscale_all_dim) only when both are truthy, else get_mscale(s); HF
    # DeepseekV3Attention: softmax scale * get_mscale(s, mscale_all_dim)^2 only when
    # mscale_all_dim is truthy. docs/math-decisions.md.
    cfg = _v3_like(**ms)
    assert rope_attention_factor(cfg) == pytest.approx(factor, rel=1e-14)
    assert softmax_scale(cfg) == pytest.approx(cfg.qk_head_dim ** -0.5 * m_softmax ** 2, rel=1e-14)


def test_yarn_magnitudes_pinned_numbers():
    assert rope_attention_factor(preset("deepseek-v3")) == 1.0
    assert rope_attention_factor(_v3_like(mscale=0.707)) == pytest.approx(1.3688879, abs=5e-8)
    assert rope_attention_factor(_v3_like(mscale=1.0, mscale_all_dim=0.707)) == pytest.approx(
        1.0857, abs=5e-5)


def test_yarn_high_equals_low_guard():
    # L0 = 6 < 2*pi: corr(beta_slow) is in (-1, 0], so low = high = 0 and HF adds 0.001.
    cfg = yarn_cfg(Dr=4, L0=6, factor=4.0)
    low, high = yarn_correction_range(cfg)
    assert (low, high) == (0, 0.001)
    f = rope_freqs(cfg)
    assert all(math.isfinite(v) for v in f)
    assert f == pytest.approx([1.0, 10000.0 ** -0.5 / 4], rel=1e-15)


def test_yarn_high_is_clamped_to_dr_minus_one():
    # HF clamps high at dim-1 (not dim/2-1); with a huge L0 the clamp shapes the ramp slope.
    cfg = yarn_cfg(Dr=8, L0=10 ** 8, factor=4.0, beta_fast=100000)
    corr = lambda r: 8 * math.log(10 ** 8 / (2 * math.pi * r)) / (2 * math.log(10000))  # noqa: E731
    assert math.floor(corr(100000)) == 2 and math.ceil(corr(1)) > 7
    assert yarn_correction_range(cfg) == (2, 7)
    th3 = 10000.0 ** (-6 / 8)
    assert rope_freqs(cfg)[3] == pytest.approx(th3 / 4 * 0.2 + th3 * 0.8, rel=1e-14)  # (3-2)/(7-2)


def test_rope_tables_values_dtype_and_errors(backend):
    cfg = yarn_cfg()
    pos = _pos(backend, 5, offset=100)
    for dtype in ("float32", "float64"):
        like = backend.zeros((1,), dtype=dtype)
        cos, sin = rope_tables(cfg, pos, like)
        assert cos.shape == sin.shape == (5, 4)
        assert cos.dtype == like.dtype and sin.dtype == like.dtype
        ang = (np.arange(5) + 100)[:, None] * np.array(rope_freqs(cfg))[None, :]
        a = rope_attention_factor(cfg)
        tol = 1e-15 if dtype == "float64" else 1e-6
        np.testing.assert_allclose(backend.to_numpy(cos), a * np.cos(ang), rtol=0, atol=tol)
        np.testing.assert_allclose(backend.to_numpy(sin), a * np.sin(ang), rtol=0, atol=tol)
    like = backend.zeros((1,))
    with pytest.raises(ValueError, match="integer"):
        check_positions(backend.asarray(np.arange(3.0)), like)
    with pytest.raises(ValueError, match=">= 0"):
        check_positions(backend.asarray(np.array([0, -1]), dtype="int64"), like)
    with pytest.raises(ValueError, match="1-D"):
        check_positions(backend.asarray(np.zeros((2, 2)), dtype="int64"), like)


# ------------------------------------------------------------------------------------------
# the rotation
# ------------------------------------------------------------------------------------------
SHAPES = [(1, 2), (3, 4), (2, 3, 5, 8), (2, 1, 1, 8)]  # (..., T, Dr) incl. one token, odd T


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", ["plain", "yarn"])
def test_rope_equals_complex_form(backend, shape, variant):
    rng = np.random.default_rng(11)
    Dr, T = shape[-1], shape[-2]
    cfg = preset("tiny").replace(qk_rope_head_dim=Dr) if variant == "plain" else yarn_cfg(Dr=Dr)
    x = _rand(backend, rng, *shape)
    pos = _pos(backend, T, offset=37)
    cos, sin = rope_tables(cfg, pos, x)
    y, _ = rope_forward(x, cos, sin)
    # (x[2j] + i x[2j+1]) * a * e^{i m th'_j}, written with numpy complex numbers
    xn = backend.to_numpy(x)
    z = xn[..., 0::2] + 1j * xn[..., 1::2]
    m = (np.arange(T) + 37)[:, None]
    w = z * rope_attention_factor(cfg) * np.exp(1j * m * np.array(rope_freqs(cfg))[None, :])
    ref = np.stack([w.real, w.imag], axis=-1).reshape(xn.shape)
    np.testing.assert_allclose(backend.to_numpy(y), ref, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("shape", SHAPES)
def test_rope_preserves_norms_and_backward_inverts(backend, shape):
    rng = np.random.default_rng(12)
    cfg = preset("deepseek-v3").replace(qk_rope_head_dim=shape[-1])  # YaRN on, factor a = 1
    x = _rand(backend, rng, *shape)
    cos, sin = rope_tables(cfg, _pos(backend, shape[-2], offset=5000), x)
    y, cache = rope_forward(x, cos, sin)
    xn, yn = backend.to_numpy(x), backend.to_numpy(y)
    pair = lambda a: np.hypot(a[..., 0::2], a[..., 1::2])  # noqa: E731
    np.testing.assert_allclose(pair(yn), pair(xn), rtol=1e-13)
    # orthogonal: R^T R x = x
    np.testing.assert_allclose(backend.to_numpy(rope_backward(y, cache).dx), xn, rtol=1e-12,
                               atol=1e-14)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", ["plain", "yarn"])
def test_rope_grad(backend, shape, variant):
    rng = np.random.default_rng(13)
    Dr, T = shape[-1], shape[-2]
    cfg = preset("tiny").replace(qk_rope_head_dim=Dr) if variant == "plain" else yarn_cfg(Dr=Dr)
    x = _rand(backend, rng, *shape)
    cos, sin = rope_tables(cfg, _pos(backend, T, offset=3), x)
    check_grad(lambda x: rope_forward(x, cos, sin),
               lambda d, c: {"x": rope_backward(d, c).dx}, {"x": x})


def test_rope_rejects_bad_input(backend):
    x = backend.zeros((2, 3, 4))
    cos, sin = rope_tables(preset("tiny"), _pos(backend, 3), x)
    with pytest.raises(ValueError, match=r"cos/sin must be \(T, Dr/2\)"):
        check_rope_args(x, cos[:2], sin[:2])
    with pytest.raises(ValueError, match="Dr even"):
        check_rope_args(backend.zeros((3, 5)), cos, sin)
    with pytest.raises(ValueError, match="dtype"):
        check_rope_args(backend.zeros((2, 3, 4), dtype="float32"), cos, sin)


# ------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------
KERNEL_SHAPES = [(1, 2), (1, 1, 2), (3, 7, 6), (2, 3, 5, 8), (4, 1, 64), (2, 0, 4)]


def _kernel_inputs(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    T, half = shape[-2], shape[-1] // 2
    ang = rng.uniform(-50, 50, size=(T, half))
    return x, np.cos(ang).astype(dtype), np.sin(ang).astype(dtype)


@pytest.mark.parametrize("shape", KERNEL_SHAPES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numba_rope_parity(shape, dtype):
    x, cos, sin = _kernel_inputs(shape, dtype, seed=sum(shape))
    N = int(np.prod(shape[:-2]))
    x3 = x.reshape(N, *shape[-2:])
    y_jit, y_py = np.empty_like(x3), np.empty_like(x3)
    numba_rope.rope_apply_numba(x3, cos, sin, y_jit)
    numba_rope.rope_apply_numba.py_func(x3, cos, sin, y_py)
    np.testing.assert_array_equal(y_jit, y_py)  # compiled == interpreted, bit for bit
    ref = rope_apply_ref(x, cos, sin)
    y = numba_rope.rope_apply(x, cos, sin)
    assert y.shape == x.shape and y.dtype == x.dtype
    if dtype == "float64":
        np.testing.assert_allclose(y, ref, rtol=0, atol=1e-15)
    # same IEEE operations in the same order, no FMA contraction: identical in both dtypes
    np.testing.assert_array_equal(y, ref)
    np.testing.assert_array_equal(y.reshape(y_jit.shape), y_jit)
    # backward = the same kernel with -sin
    np.testing.assert_array_equal(numba_rope.rope_apply(x, cos, -sin), rope_apply_ref(x, cos, -sin))


def test_numba_rope_noncontiguous_input_and_errors():
    x, _, _ = _kernel_inputs((2, 5, 3, 12), "float64", seed=3)
    _, cos, sin = _kernel_inputs((3, 8), "float64", seed=4)
    view = x[:, :, :, 4:]  # (2, 5, 3, 8), T=3, not contiguous
    assert not view.flags.c_contiguous
    np.testing.assert_array_equal(numba_rope.rope_apply(view, cos, sin), rope_apply_ref(view, cos, sin))
    with pytest.raises(ValueError, match="share one float dtype"):
        numba_rope.rope_apply(view, cos.astype(np.float32), sin)
    with pytest.raises(ValueError, match=r"cos/sin \(T, Dr/2\)"):
        numba_rope.rope_apply(view, cos[:2], sin[:2])


def test_rope_kernel_is_registered_and_dispatched(backend):
    from refmtp.backends import cupy_rope

    bk = backend
    want = numba_rope.rope_apply if bk.name == "numpy" else cupy_rope.rope_apply
    previous = set_kernels_enabled(True)
    try:
        assert bk.kernel("rope_apply") is want
        rng = np.random.default_rng(5)
        x = _rand(bk, rng, 2, 3, 4, 8)
        cos, sin = rope_tables(yarn_cfg(), _pos(bk, 4, 9), x)
        y_fast, c = rope_forward(x, cos, sin)
        d_fast = rope_backward(y_fast, c).dx
        set_kernels_enabled(False)
        assert bk.kernel("rope_apply") is None
        y_ref, c = rope_forward(x, cos, sin)
        d_ref = rope_backward(y_ref, c).dx
    finally:
        set_kernels_enabled(previous)
    np.testing.assert_array_equal(bk.to_numpy(y_fast), bk.to_numpy(y_ref))
    np.testing.assert_array_equal(bk.to_numpy(d_fast), bk.to_numpy(d_ref))


def test_cupy_rope_registered():
    from refmtp.backends import cupy_rope, cupy_table

    assert cupy_table.collect()["rope_apply"] is cupy_rope.rope_apply
    assert "template <typename scalar_t>" in cu_source("rope")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_rope_cu_compiles(tmp_path):
    # Explicit instantiations force nvcc to compile both template bodies (NVRTC gets them
    # through name_expressions in cupy_rope.py).
    src = tmp_path / "rope_inst.cu"
    src.write_text(
        cu_source("rope")
        + "\ntemplate __global__ void rope_apply<float>(const float*, const float*, const float*,"
        " float*, long long, long long, long long);\n"
        "template __global__ void rope_apply<double>(const double*, const double*, const double*,"
        " double*, long long, long long, long long);\n"
    )
    ptx = tmp_path / "rope.ptx"
    res = subprocess.run(["nvcc", "-std=c++17", INCLUDE_OPTION, "--ptx", str(src), "-o", str(ptx)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    text = ptx.read_text()
    assert "rope_apply" in text
    assert "fma" not in text  # products are rounded separately, as in the CPU reference
    assert "mul.rn.f64" in text and "mul.rn.f32" in text


@pytest.mark.gpu
@pytest.mark.parametrize("shape", KERNEL_SHAPES + [(3, 1001, 6)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("max_blocks", [65535, 2])  # 2 blocks: the grid-stride loop must wrap
def test_cupy_rope_parity(shape, dtype, max_blocks, monkeypatch):
    from refmtp.backends import cupy_kernels, cupy_rope, cupy_table

    monkeypatch.setattr(cupy_kernels, "MAX_BLOCKS", max_blocks)

    bk = get_backend("cupy")
    x, cos, sin = _kernel_inputs(shape, dtype, seed=sum(shape))
    xd, cd, sd = (bk.asarray(a) for a in (x, cos, sin))
    kern = cupy_table.collect()["rope_apply"]
    y = kern(xd, cd, sd)
    assert y.shape == xd.shape and y.dtype == xd.dtype
    # _rn intrinsics: IEEE products and sums, identical to the host reference
    np.testing.assert_array_equal(bk.to_numpy(y), rope_apply_ref(x, cos, sin))
    np.testing.assert_array_equal(bk.to_numpy(y), bk.to_numpy(rope_apply_ref(xd, cd, sd)))
    np.testing.assert_array_equal(bk.to_numpy(kern(xd, cd, -sd)), rope_apply_ref(x, cos, -sin))
    # a non-contiguous view goes through the same wrapper
    if len(shape) == 4:
        v = xd[:, :, :, ::-1]
        np.testing.assert_array_equal(bk.to_numpy(kern(v, cd, sd)),
                                      rope_apply_ref(x[:, :, :, ::-1], cos, sin))
