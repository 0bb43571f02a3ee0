"""Sampling for decoding and speculative verification: temperature, the inverse-CDF draw
(rule R5 of docs/acceptance-rules.md), the replay samplers (R10) and the seeded RNG-v1 coins (R9).

    w = processed_probs(logits, temperature)     # (V,) float64 probabilities
    y = icdf(w, u)                               # smallest i with cumsum(w)[i] > u * sum(w)
    u_accept, u_sample = rng_v1_draws(gen, K)    # the K + 1 coins of one verification step
"""
from __future__ import annotations

import math

from refmtp.backends import backend_of, get_backend
from refmtp.mutation import on

def check_unit(u, what: str) -> float:
    u = float(u)
    if not 0.0 <= u < 1.0:
        raise ValueError(f"{what} = {u!r} must lie in [0, 1)")
    return u


def processed_probs(logits, temperature: float):
    """``softmax(logits / T)`` in float64 over the last axis; ``T == 0`` returns None (greedy).

    -inf logits (masked tokens) get probability 0. Top-k / top-p / penalties are the caller's
    job: p must be exactly the distribution the non-speculative sampler would draw from
    (docs/speculative-decoding.md §1.2 precondition iii).
    """
    T = float(temperature)
    if not math.isfinite(T) or T < 0:
        raise ValueError(f"processed_probs: temperature must be finite and >= 0, got {temperature}")
    if T == 0:
        return None  # greedy: verify with argmax of the logits (R1), no softmax at T -> 0
    bk = backend_of(logits)
    xp = bk.xp
    z = xp.asarray(logits, dtype=xp.float64) / T  # (..., V)
    if bool(xp.any(xp.isnan(z))) or bool(xp.any(z == math.inf)):
        raise ValueError("processed_probs: logits contain NaN or +inf; fix the model output")
    m = xp.max(z, axis=-1, keepdims=True)  # subtract the row max for stability
    if bool(xp.any(m == -math.inf)):
        raise ValueError("processed_probs: a logits row is all -inf; leave at least one token unmasked")
    e = xp.exp(z - m)  # (..., V)
    return e / xp.sum(e, axis=-1, keepdims=True)  # (..., V)


def host_cumsum(w):
    """Inclusive cumsum along the last axis, summed sequentially on the host.

    R5 compares ``c[i] > u * S`` exactly, so the summation order matters at a boundary: a GPU
    scan (cupy's parallel cumsum) may round differently from numpy's left-to-right sum. Summing
    on the host makes every backend take the same decision; the result goes back to w's device.
    """
    bk = backend_of(w)
    host = get_backend("numpy")
    return bk.asarray(host.xp.cumsum(bk.to_numpy(w), axis=-1))


def icdf_unchecked(w, u: float):
    """R5 on a float64 weight vector (no validation); -1 when no weight is positive."""
    bk = backend_of(w)
    xp = bk.xp
    c = host_cumsum(w)  # (V,) inclusive cumulative sum in index order
    t = u * float(c[-1])  # t = u * S
    hit = xp.nonzero((w > 0) & ((c >= t) if on("acceptance.icdf_ge") else (c > t)))[0]  # strict >, zero-weight entries skipped
    if hit.shape[0] > 0:
        return int(hit[0])
    positive = xp.nonzero(w > 0)[0]
    if positive.shape[0] == 0:
        return -1
    return int(positive[-1])  # t >= every c[i] (rounding only): the largest positive index


def icdf(w, u: float) -> int:
    """Inverse-CDF draw of R5: the smallest i with ``w[i] > 0`` and ``cumsum(w)[i] > u * sum(w)``.

    ``w`` (V,) non-negative, unnormalised; ``u`` in [0, 1). If rounding leaves no such i, the
    largest i with ``w[i] > 0``. This is FlashInfer's ``DeviceSamplingFromProb`` as SGLang calls it.
    """
    xp = backend_of(w).xp
    w = xp.asarray(w, dtype=xp.float64)  # (V,)
    if w.ndim != 1 or w.shape[0] == 0:
        raise ValueError(f"icdf: w must be a non-empty vector (V,), got shape {tuple(w.shape)}")
    if not bool(xp.all(xp.isfinite(w))) or bool(xp.any(w < 0)):
        raise ValueError("icdf: weights must be finite and >= 0")
    check_unit(u, "icdf: u")
    y = icdf_unchecked(w, float(u))
    if y < 0:
        raise ValueError("icdf: all weights are 0; give at least one positive weight")
    return y


def exp_race(w, E) -> int:
    """R10 replay sampler (vLLM v1/V0, DeepSeek generate.py): ``argmax_i w_i / E_i``, lowest index on ties.

    ``E`` (V,) > 0 is supplied by the caller (``E_i = -ln(1 - v_i)`` from uniforms, see
    ``exp_from_uniform``). Use it through ``verify_drafts(..., sampler=lambda w: exp_race(w, E))``.
    """
    xp = backend_of(w, E).xp
    w = xp.asarray(w, dtype=xp.float64)  # (V,)
    E = xp.asarray(E, dtype=xp.float64)  # (V,)
    if E.shape != w.shape or not bool(xp.all(E > 0)):
        raise ValueError(f"exp_race: E must be (V,) = {tuple(w.shape)} with every E_i > 0")
    return int(xp.argmax(w / E))  # argmax returns the first maximal index


def gumbel(w, G) -> int:
    """R10 replay sampler (vLLM MRV2): ``argmax_i log(w_i) + G_i`` (log 0 = -inf), lowest index on ties.

    ``G`` (V,) is supplied by the caller (``G_i = -ln(-ln v_i)``, see ``gumbel_from_uniform``).
    """
    xp = backend_of(w, G).xp
    w = xp.asarray(w, dtype=xp.float64)  # (V,)
    G = xp.asarray(G, dtype=xp.float64)  # (V,)
    if G.shape != w.shape or not bool(xp.all(xp.isfinite(G))):
        raise ValueError(f"gumbel: G must be a finite vector of shape {tuple(w.shape)}")
    logw = xp.where(w > 0, xp.log(xp.where(w > 0, w, 1.0)), -math.inf)  # (V,) log 0 = -inf
    return int(xp.argmax(logw + G))


def exp_from_uniform(v):
    """``E = -ln(1 - v)``: Exp(1) variables from uniforms v in [0, 1) (R10)."""
    xp = backend_of(v).xp
    return -xp.log1p(-xp.asarray(v, dtype=xp.float64))


def gumbel_from_uniform(v):
    """``G = -ln(-ln v)``: Gumbel(0, 1) variables from uniforms v in (0, 1) (R10)."""
    xp = backend_of(v).xp
    return -xp.log(-xp.log(xp.asarray(v, dtype=xp.float64)))


def rng_v1_draws(gen, K: int):
    """R9: the coins of one request for one step from ``numpy.random.Generator(PCG64(seed))``.

    Order: K accept coins, then 1 sample coin. All K are drawn even if a rejection comes
    early, so the stream position never depends on the outcome. ``gen`` is a numpy Generator
    or a ``HostRNG``. Returns ``(u_accept (K,) float64 host array, u_sample float)``.
    """
    gen = getattr(gen, "gen", gen)  # HostRNG wraps the numpy Generator
    if int(K) < 0:
        raise ValueError(f"rng_v1_draws: K must be >= 0, got {K}")
    u_accept = gen.random(int(K))  # (K,) float64 in [0, 1)
    u_sample = float(gen.random())
    return u_accept, u_sample


def rng_v1_draws_batch(gen, N: int, K: int):
    """R9 for N requests in request order: identical to N successive ``rng_v1_draws(gen, K)``.

    Returns ``(u_accept (N, K), u_sample (N,))`` host float64 arrays. PCG64 fills ``random``
    arrays in C order, so row n of one (N, K+1) draw is request n's K accept coins + sample coin.
    """
    gen = getattr(gen, "gen", gen)
    if int(N) < 0 or int(K) < 0:
        raise ValueError(f"rng_v1_draws_batch: N and K must be >= 0, got N={N}, K={K}")
    u = gen.random((int(N), int(K) + 1))  # (N, K+1)
    return u[:, : int(K)].copy(), u[:, int(K)].copy()


