"""Independent host recomputations (float64 numpy, ``math.fsum``, complex numbers) the checks
compare the library against; none of them calls the library's code path."""
from __future__ import annotations

import cmath
import math

import numpy as np

from refmtp.verification.audit.steps import TOL, Check, check


def fdot(a, b) -> float:
    """Exactly rounded dot product (math.fsum of the products)."""
    return math.fsum(float(x) * float(y) for x, y in zip(np.reshape(a, -1), np.reshape(b, -1)))


def fmatvec(W, x) -> np.ndarray:
    """W (out, in) times x (in,), every entry an exactly rounded sum."""
    return np.array([fdot(row, x) for row in W])


def rmsnorm_check(name, y, x, w, eps) -> Check:
    """RMSNorm identity without its formula: ``y/w`` is a positive multiple of ``x`` and has
    mean square ``ms/(ms+eps)`` (ms = mean(x^2)); together these pin y down."""
    y, x, w = (np.asarray(a, dtype=np.float64) for a in (y, x, w))
    ok = np.abs(w) > 1e-12
    n = np.where(ok, y / np.where(ok, w, 1.0), 0.0)
    xk = np.where(ok, x, 0.0)
    ms = np.mean(x * x, axis=-1)
    ms_k = np.mean(xk * xk, axis=-1)
    want_ms = ms_k / (ms + eps)  # columns with w = 0 are left out of both sides
    got_ms = np.mean(n * n, axis=-1)
    cos = np.sum(n * xk, axis=-1) / np.maximum(
        np.sqrt(np.sum(n * n, axis=-1) * np.sum(xk * xk, axis=-1)), 1e-300)
    d_ms = float(np.max(np.abs(got_ms - want_ms)))
    d_cos = float(np.max(np.abs(cos - 1.0)))
    return check(name, d_ms <= TOL and d_cos <= TOL,
                 f"max |mean((y/w)^2) - ms/(ms+eps)| {d_ms:.1e}, max |cos(y/w, x) - 1| {d_cos:.1e}")


def logsoftmax(z, axis=-1):
    """log softmax by pairwise ``logaddexp.reduce`` (not the max-subtracted exp of the library)."""
    return z - np.logaddexp.reduce(z, axis=axis, keepdims=True)


def host_ce(logits, targets):
    """Per-row cross-entropy ``logaddexp.reduce(z) - z[y]``, host float64."""
    z = np.asarray(logits, dtype=np.float64)
    lse = np.logaddexp.reduce(z, axis=-1)
    picked = np.take_along_axis(z, np.asarray(targets)[:, None], axis=-1)[:, 0]
    return lse - picked


def silu(a):
    return a / (1.0 + np.exp(-a))


def host_swiglu(x, wg, wu, wd):
    """down(silu(x gate^T) * x up^T), written with silu(a) = a / (1 + e^-a)."""
    return (silu(x @ wg.T) * (x @ wu.T)) @ wd.T


def topk_set(scores, K) -> list:
    """Indices of the K largest scores, ties -> lowest index (sorted by (-score, index))."""
    order = sorted(range(len(scores)), key=lambda e: (-float(scores[e]), e))
    return order[:K]


def get_mscale(s, m):
    return 1.0 if s <= 1.0 else 0.1 * m * math.log(s) + 1.0


def host_rope(cfg):
    """(theta'_j for j < Dr/2, magnitude factor a), from the docs/deepseek-v3.md §2.4 text (independent code)."""
    Dr, base = cfg.qk_rope_head_dim, float(cfg.rope_theta)
    theta = [base ** (-2.0 * j / Dr) for j in range(Dr // 2)]
    rs = cfg.rope_scaling
    if rs is None:
        return theta, 1.0
    s = float(rs["factor"])
    L0 = float(rs["original_max_position_embeddings"])
    bf, bs = float(rs.get("beta_fast", 32)), float(rs.get("beta_slow", 1))

    def corr(r):
        return Dr * math.log(L0 / (2 * math.pi * r)) / (2 * math.log(base))

    low, high = max(math.floor(corr(bf)), 0), min(math.ceil(corr(bs)), Dr - 1)
    if high == low:
        high += 0.001
    out = []
    for j, th in enumerate(theta):
        ramp = min(max((j - low) / (high - low), 0.0), 1.0)
        out.append(th / s * ramp + th * (1 - ramp))
    # HF _compute_yarn_parameters: the ratio only when both fields are truthy, else get_mscale(s)
    m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
    if m and m_all:
        a = get_mscale(s, float(m)) / get_mscale(s, float(m_all))
    else:
        a = get_mscale(s, 1.0)
    return out, a


def host_scale(cfg):
    """Softmax scale of docs/deepseek-v3.md §2.5: (Dn+Dr)^-1/2 * mscale^2 (mscale from mscale_all_dim)."""
    scale = 1.0 / math.sqrt(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    rs = cfg.rope_scaling
    if rs is not None and float(rs["factor"]) > 1.0:
        m = get_mscale(float(rs["factor"]), float(rs.get("mscale_all_dim") or 0.0))
        scale *= m * m
    return scale


def rot_check(name, raw, rot, positions, theta, a):
    """RoPE as complex multiplication: pairs (x[2j] + i x[2j+1]) times a e^{i m theta_j}."""
    zx = raw[..., 0::2] + 1j * raw[..., 1::2]
    zy = rot[..., 0::2] + 1j * rot[..., 1::2]
    phase = np.array([[cmath.exp(1j * m * th) for th in theta] for m in positions])  # (T, Dr/2)
    want = zx * a * phase
    d = float(np.max(np.abs(zy - want))) if zy.size else 0.0
    dn = float(np.max(np.abs(np.abs(zy) - a * np.abs(zx)))) if zy.size else 0.0
    scale = max(1.0, float(np.max(np.abs(want))) if want.size else 1.0)
    return [
        check(f"{name} preserves every pair's norm (times a = {a:.6g})", dn <= TOL * scale,
              f"max ||y_j| - a|x_j|| {dn:.1e}"),
        check(f"{name} rotates pair j by m*theta'_j (complex product, theta' from docs/deepseek-v3.md §2.4)",
              d <= TOL * scale, f"max |y - a e^(i m theta') x| {d:.1e}"),
    ]
