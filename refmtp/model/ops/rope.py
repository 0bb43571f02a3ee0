"""Rotary position embedding on the decoupled Dr-dim sub-vector, with YaRN (docs/deepseek-v3.md §2.4, §2.5).

DeepSeek-V3 applies RoPE only to ``q_pe`` (per head) and the shared ``k_pe`` (report eqs. 3, 8),
in the INTERLEAVED pair layout of the checkpoint (pair ``j`` = components ``2j, 2j+1``), so
weights load without any permutation:

    y[2j]   = x[2j] cos(m th'_j) - x[2j+1] sin(m th'_j)
    y[2j+1] = x[2j] sin(m th'_j) + x[2j+1] cos(m th'_j)

i.e. ``(x[2j] + i x[2j+1]) * e^{i m th'_j}`` (DeepSeek ``view_as_complex``, vLLM
``is_neox_style=False``). ``m`` is the token position.

Frequencies: ``th_j = base^(-2j/Dr)``, ``j = 0..Dr/2-1``. With ``rope_scaling`` (YaRN, factor s,
original context L0):

    corr(r) = Dr ln(L0 / (2 pi r)) / (2 ln base)
    low  = max(floor(corr(beta_fast)), 0),  high = min(ceil(corr(beta_slow)), Dr - 1)
    ramp_j = clip((j - low) / (high - low), 0, 1)      (high == low -> high += 0.001, as HF)
    th'_j  = th_j / s * ramp_j + th_j * (1 - ramp_j)

Two YaRN magnitudes, both applied whenever ``rope_scaling`` is set and s > 1 (HF / vLLM semantics,
docs/deepseek-v3.md §2.4 "DISAGREE (YaRN gating)"):

* softmax scale ``qk_head_dim^-1/2 * mscale^2`` with ``mscale = 0.1 mscale_all_dim ln(s) + 1``
  (:func:`softmax_scale`; 0.1352338 for V3);
* a factor on cos/sin (:func:`rope_attention_factor`; HF ``attention_factor``), HF
  transformers' ``_compute_yarn_parameters`` rule: ``get_mscale(s, mscale) /
  get_mscale(s, mscale_all_dim)`` when BOTH are given and non-zero, otherwise the plain YaRN
  factor ``get_mscale(s) = 0.1 ln(s) + 1``. It is 1.0 for V3 (mscale = mscale_all_dim = 1) and
  for V2 (both 0.707). With it, RoPE is a rotation TIMES that factor, so the ``y`` norm is the
  ``x`` norm times the factor, and backward still is the transposed map.

A missing ``mscale`` or ``mscale_all_dim`` reads as 0 (``cfg.yarn``), which is how HF treats it
(both ``None`` and 0 are falsy). So a config with ``mscale`` 0.707 and no ``mscale_all_dim`` gets
the factor ``0.1 ln(s) + 1`` (1.3689 for s = 40) and mscale 1 in the softmax, as HF does. The
DeepSeek hub ``modeling_deepseek.py`` and vLLM default ``mscale_all_dim`` to 0 and always take the
ratio (1.2608 there); they agree with HF whenever both fields are set, as in every released
DeepSeek config. docs/math-decisions.md.

Layout used by every function here: ``x (..., T, Dr)`` (any leading dims: ``(B, H, T, Dr)`` for
``q_pe``, ``(B, T, Dr)`` for ``k_pe``) and tables ``cos, sin (T, Dr/2)``.

Backward (RoPE is linear, ``y = R x`` with ``R`` block-diagonal 2x2 ``a [[c, -s], [s, c]]``):
``dx = R^T dy``, i.e. the same map with ``-sin`` (rotation by ``-m th'``). See
docs/derivations/rope.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from refmtp.backends import backend_of
from refmtp.mutation import on


# ------------------------------------------------------------------------------------------
# frequencies and scales (host-side Python floats: a handful of numbers per config)
# ------------------------------------------------------------------------------------------
def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """``0.1 * mscale * ln(scale) + 1`` for scale > 1, else 1 (HF/vLLM ``yarn_get_mscale``)."""
    if scale <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_correction_range(cfg) -> tuple[float, float] | None:
    """``(low, high)`` of the YaRN ramp (docs/deepseek-v3.md §2.4), or None without rope_scaling.

    ``high`` gets +0.001 when it equals ``low`` (HF ``linear_ramp_factor`` guard), so it may be
    a float. V3: (10, 23).
    """
    y = cfg.yarn
    if y is None:
        return None
    Dr, base, L0 = cfg.qk_rope_head_dim, float(cfg.rope_theta), y["original_max_position_embeddings"]

    def corr(r):  # the pair index whose wavelength makes r full turns over L0
        return Dr * math.log(L0 / (2.0 * math.pi * r)) / (2.0 * math.log(base))

    fast, slow = y["beta_fast"], y["beta_slow"]
    if on("rope.yarn_betas_swapped"):
        fast, slow = slow, fast
    if on("rope.yarn_no_floor_ceil"):
        low, high = max(corr(fast), 0), min(corr(slow), Dr - 1)
    else:
        low = max(math.floor(corr(fast)), 0)
        high = min(math.ceil(corr(slow)), Dr - 1)
    if high == low:
        high = high + 0.001  # avoid 0/0 in the ramp, as HF does
    return low, high


def rope_freqs(cfg) -> tuple[float, ...]:
    """YaRN-corrected inverse frequencies ``th'_j``, j = 0..Dr/2-1, as Python floats (docs/deepseek-v3.md §2.4).

    Without rope_scaling (or with factor 1) these are ``th_j = rope_theta^(-2j/Dr)``.
    """
    Dr, base = cfg.qk_rope_head_dim, float(cfg.rope_theta)
    theta = [base ** (-2.0 * j / Dr) for j in range(Dr // 2)]  # th_j
    if on("rope.inv_freq_exponent"):
        theta = [base ** (-1.0 * j / Dr) for j in range(Dr // 2)]
    y = cfg.yarn
    if y is None:
        return tuple(theta)
    s = y["factor"]
    low, high = yarn_correction_range(cfg)
    out = []
    for j, th in enumerate(theta):
        ramp = min(max((j - low) / (high - low), 0.0), 1.0)  # 0: keep th_j, 1: th_j / s
        if on("rope.yarn_ramp_inverted"):
            ramp = 1.0 - ramp
        out.append(th / s * ramp + th * (1.0 - ramp))
    return tuple(out)


def rope_attention_factor(cfg) -> float:
    """Magnitude factor on cos/sin (HF transformers ``_compute_yarn_parameters``).

    ``get_mscale(s, mscale) / get_mscale(s, mscale_all_dim)`` when both fields are non-zero,
    else ``get_mscale(s)`` (mscale 1); a missing field reads as 0. 1.0 without rope_scaling and
    for V3 (mscale = mscale_all_dim = 1). DeepSeek's inference/model.py applies no such factor
    (identical for V3); the hub modeling_deepseek.py and vLLM always take the ratio.
    """
    y = cfg.yarn
    if y is None:
        return 1.0
    s, m, m_all = y["factor"], y["mscale"], y["mscale_all_dim"]
    if on("rope.yarn_cos_sin_factor_dropped"):
        return 1.0
    if on("rope.yarn_cos_sin_plain_mscale"):
        return yarn_get_mscale(s)
    if m and m_all:
        if on("rope.yarn_cos_sin_factor_inverted"):
            return yarn_get_mscale(s, m_all) / yarn_get_mscale(s, m)
        return yarn_get_mscale(s, m) / yarn_get_mscale(s, m_all)
    return yarn_get_mscale(s)


def softmax_scale(cfg) -> float:
    """``qk_head_dim^-1/2 * mscale^2``, ``mscale = 0.1 mscale_all_dim ln(s) + 1`` (docs/deepseek-v3.md §2.5).

    mscale is 1 without rope_scaling, when factor <= 1, and when ``mscale_all_dim`` is missing
    or 0 (HF DeepseekV3Attention applies mscale^2 only when mscale_all_dim is truthy; the
    ``mscale`` field never enters the softmax scale). V3: 192^-1/2 * 1.368888^2 = 0.1352338.
    The same value is used in absorbed (latent-space) attention: still 1/sqrt(qk_head_dim).
    """
    scale = cfg.qk_head_dim ** -0.5
    if on("mla.scale_nope_dim"):
        scale = cfg.qk_nope_head_dim ** -0.5
    if on("mla.scale_v_dim"):
        scale = cfg.v_head_dim ** -0.5
    y = cfg.yarn
    if y is not None and y["factor"] > 1.0 and not on("rope.yarn_softmax_mscale_dropped"):
        m = yarn_get_mscale(y["factor"], y["mscale" if on("rope.yarn_softmax_mscale_from_mscale")
                                          else "mscale_all_dim"])
        scale = scale * m * (1.0 if on("rope.yarn_softmax_mscale_once") else m)
    return scale


def check_positions(positions, like) -> None:
    """The contract of :func:`rope_tables` (one-line ValueErrors): positions (T,) integers >= 0,
    ``like`` a float array. Checked once at an entry point (check_mla); the hot path assumes it
    (the >= 0 test reads the device)."""
    xp = backend_of(positions, like).xp
    if positions.ndim != 1:
        raise ValueError(
            f"rope_tables: positions must be 1-D (T,), got shape {tuple(positions.shape)}"
        )
    if not xp.isdtype(positions.dtype, "integral"):
        raise ValueError(
            f"rope_tables: positions must be an integer array (int64), got {positions.dtype}"
        )
    if positions.shape[0] and int(xp.min(positions)) < 0:
        raise ValueError("rope_tables: positions must be >= 0 (token index plus cache offset)")
    if not xp.isdtype(like.dtype, "real floating"):
        raise ValueError(f"rope_tables: like must be a float array, got {like.dtype}")


def rope_tables(cfg, positions, like):
    """cos/sin tables for ``positions``: ``cos[t, j] = a cos(positions[t] th'_j)``, same for sin.

    positions (T,) integer array (token index m, plus any cache offset); ``like`` is any array
    whose backend and float dtype the tables take. ``a`` = :func:`rope_attention_factor`.
    The angle ``m th'_j`` is formed in float64 and only the cos/sin are rounded to ``like``'s
    dtype (HF forms it in float32; identical in float64). Returns ``(cos, sin)``, each (T, Dr/2).
    """
    bk = backend_of(positions, like)
    xp = bk.xp
    inv = bk.asarray(list(rope_freqs(cfg)), dtype="float64")  # (Dr/2,)
    ang = xp.astype(positions, xp.float64)[:, None] * inv[None, :]  # (T, Dr/2)  m * th'_j
    a = rope_attention_factor(cfg)
    cos = xp.astype(xp.cos(ang) * a, like.dtype)  # (T, Dr/2)
    sin = xp.astype(xp.sin(ang) * a, like.dtype)  # (T, Dr/2)
    return cos, sin


# ------------------------------------------------------------------------------------------
# the rotation (reference), forward and backward
# ------------------------------------------------------------------------------------------
def rope_apply_ref(x, cos, sin):
    """Interleaved-pair rotation.  x (..., T, Dr), cos/sin (T, Dr/2) -> y (..., T, Dr).

    ``y[2j] = x[2j] c - x[2j+1] s``, ``y[2j+1] = x[2j] s + x[2j+1] c``. Plain-array reference of
    the ``rope_apply`` kernels (backends/numba_rope.py, backends/rope.cu).
    """
    xp = backend_of(x, cos, sin).xp
    if on("rope.neox_pairs"):  # pairs (j, j + Dr/2), halves concatenated back
        h = x.shape[-1] // 2
        x0, x1 = x[..., :h], x[..., h:]
        return xp.concat([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    x0 = x[..., 0::2]  # (..., T, Dr/2) real parts
    x1 = x[..., 1::2]  # (..., T, Dr/2) imaginary parts
    y0 = x0 * cos - x1 * sin  # (..., T, Dr/2)
    y1 = x0 * sin + x1 * cos  # (..., T, Dr/2)
    return xp.reshape(xp.stack([y0, y1], axis=-1), x.shape)  # (..., T, Dr/2, 2) -> (..., T, Dr)


def check_rope_args(x, cos, sin, who="rope_forward"):
    """The contract of rope_forward / rope_backward (x (..., T, Dr), tables (T, Dr/2) of x's dtype),
    checked once at an entry point; the kernels check theirs (backends/contracts.py)."""
    if x.ndim < 2 or x.shape[-1] % 2:
        raise ValueError(
            f"{who}: x must be (..., T, Dr) with Dr even, got shape {tuple(x.shape)}"
        )
    want = (x.shape[-2], x.shape[-1] // 2)
    if tuple(cos.shape) != want or tuple(sin.shape) != want:
        raise ValueError(
            f"{who}: cos/sin must be (T, Dr/2) = {want} for x {tuple(x.shape)}, got "
            f"{tuple(cos.shape)} and {tuple(sin.shape)}; build them with rope_tables(cfg, positions, x)"
        )
    if cos.dtype != x.dtype or sin.dtype != x.dtype:
        raise ValueError(
            f"{who}: cos/sin dtype {cos.dtype}/{sin.dtype} differs from x dtype {x.dtype}; "
            "build them with rope_tables(cfg, positions, like=x)"
        )


@dataclass(frozen=True, slots=True)
class RopeCache:
    cos: Any  # (T, Dr/2) a*cos(m th'), the only thing backward needs (RoPE is linear in x)
    sin: Any  # (T, Dr/2) a*sin(m th')


class RopeGrads(NamedTuple):
    dx: Any  # (..., T, Dr)


def rope_forward(x, cos, sin):
    """``y = R(m) x`` per interleaved pair (docs/deepseek-v3.md §2.4; report eqs. 3, 8).

    x (..., T, Dr), cos/sin (T, Dr/2) from :func:`rope_tables` -> (y (..., T, Dr), RopeCache).
    Runs the ``rope_apply`` kernel of x's backend when there is one, else :func:`rope_apply_ref`.
    """
    bk = backend_of(x, cos, sin)
    fast = bk.kernel("rope_apply")
    y = (fast or rope_apply_ref)(x, cos, sin)  # (..., T, Dr)
    return y, RopeCache(cos=cos, sin=sin)


def rope_backward(dout, cache: RopeCache) -> RopeGrads:
    """forward ``y = R x`` (per pair ``R = [[c, -s], [s, c]]``)  ->  ``dx = R^T dout``.

    ``R^T = [[c, s], [-s, c]]`` is the same map with ``sin -> -sin`` (rotation by ``-m th'``):

        dx[2j]   =  dout[2j] c + dout[2j+1] s
        dx[2j+1] = -dout[2j] s + dout[2j+1] c
    """
    bk = backend_of(dout, cache.cos)
    fast = bk.kernel("rope_apply")
    dx = (fast or rope_apply_ref)(dout, cache.cos, -cache.sin)  # (..., T, Dr)
    return RopeGrads(dx=dx)
