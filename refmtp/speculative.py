"""Speculative-decoding acceptance rules as pure functions (spec speculative-decoding.md).

Nothing here touches a model: every function maps (target distributions p, draft
distributions q, draft tokens, random numbers) to a decision. The decoding loop that calls them
lives in ``refmtp/specdecode.py``.

Notation (spec section 0). One verification step of one request has K drafts. Positions are
0-based in code and 1-based in the spec: ``drafts[k]`` is the spec's ``d_{k+1}``.

    p         (K+1, V)  processed target distributions; row k is p(. | c, d_<k), row K the bonus row
    q         (K, V)    distributions the drafts were drawn from; None = one-hot at the draft
                        (a deterministic / argmax drafter, vLLM's and SGLang's MTP default)
    drafts    (K,)      draft tokens
    u_accept  (K,)      accept coins in [0, 1), one per draft (all K given, R6)
    u_sample  scalar    the one coin for the residual / fallback / bonus draw, in [0, 1)

``verify_drafts`` is the normative RNG-v1 rule (spec section 2.2, rules R1-R8); it is what the
golden files are computed with. The alternatives of spec section 4 are separate, named rules:
``verify_greedy`` (exact match), ``verify_typical`` (Medusa typical acceptance, lossy) and
``verify_block`` (block verification, Sun et al. 2024). ``verify_drafts_batch`` runs the RNG-v1
rule for N requests at once (kernels: backends/numba_accept.py, backends/accept.cu).

All arithmetic is float64 (inputs are upcast). Decisions are per step, so the few scalars they
need (p_k[d_k], q_k[d_k], the sampled index) are pulled to the host; the vector work (residual,
cumulative sums) runs on the inputs' backend.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable, NamedTuple

from refmtp.backends import backend_of, get_backend
from refmtp.mutation import on

# Medusa typical acceptance defaults as used by ``medusa_generate`` (spec section 4).
TYPICAL_EPS = 0.09
TYPICAL_DELTA = 0.3
TYPICAL_LOG_FLOOR = 1e-5  # entropy uses log(p + 1e-5), as Medusa and vLLM V0 do


class Verdict(NamedTuple):
    """Outcome of one verification step (R7)."""

    num_accepted: int  # A: drafts accepted, 0..K
    tokens: tuple  # the A+1 emitted tokens: drafts[:A] then the residual / bonus token
    residual_fallback: bool  # R3: the residual was all zero, the token was drawn from p_j instead
    is_bonus: bool  # all K drafts accepted; the last token came from the bonus row p_{K+1} (R4)


class BatchVerdict(NamedTuple):
    """Outcome of one verification step for N requests (R7, R8)."""

    num_accepted: Any  # (N,) int64
    tokens: Any  # (N, K+1) int64, row n holds num_accepted[n]+1 tokens then -1 padding
    residual_fallback: Any  # (N,) bool
    is_bonus: Any  # (N,) bool


# ----------------------------------------------------------------------------------------------
# Helpers: temperature, inverse CDF (R5), replay samplers (R10), seeded coins (R9)
# ----------------------------------------------------------------------------------------------

def processed_probs(logits, temperature: float):
    """``softmax(logits / T)`` in float64 over the last axis; ``T == 0`` returns None (greedy).

    -inf logits (masked tokens) get probability 0. Top-k / top-p / penalties are the caller's
    job: p must be exactly the distribution the non-speculative sampler would draw from
    (spec section 1.2 precondition iii).
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


def _host_cumsum(w):
    """Inclusive cumsum along the last axis, summed sequentially on the host.

    R5 compares ``c[i] > u * S`` exactly, so the summation order matters at a boundary: a GPU
    scan (cupy's parallel cumsum) may round differently from numpy's left-to-right sum. Summing
    on the host makes every backend take the same decision; the result goes back to w's device.
    """
    bk = backend_of(w)
    host = get_backend("numpy")
    return bk.asarray(host.xp.cumsum(bk.to_numpy(w), axis=-1))


def _icdf(w, u: float):
    """R5 on a float64 weight vector (no validation); -1 when no weight is positive."""
    bk = backend_of(w)
    xp = bk.xp
    c = _host_cumsum(w)  # (V,) inclusive cumulative sum in index order
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
    _check_unit(u, "icdf: u")
    y = _icdf(w, float(u))
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


# ----------------------------------------------------------------------------------------------
# Input checks (one-line ValueErrors, spec section 1.2 preconditions)
# ----------------------------------------------------------------------------------------------

def _is_array(x) -> bool:
    return x is not None and not isinstance(x, (list, tuple, int, float, bool))


def _backend(*objs):
    """Backend of the array-typed inputs; Python lists are converted onto it by the caller."""
    return backend_of(*[o for o in objs if _is_array(o)])


def _check_unit(u, what: str) -> float:
    u = float(u)
    if not 0.0 <= u < 1.0:
        raise ValueError(f"{what} = {u!r} must lie in [0, 1)")
    return u


def _host_ints(bk, x, name: str) -> list:
    a = bk.to_numpy(bk.asarray(x)) if _is_array(x) else x
    if getattr(a, "ndim", 1) != 1:
        raise ValueError(f"{name} must be a 1-d sequence, got shape {tuple(a.shape)}")
    out = [int(v) for v in a]
    if any(o != v for o, v in zip(out, a)):
        raise ValueError(f"{name} must hold integers, got {list(a)}")
    return out


def _check_probs(xp, a, name: str, rows_need_mass: bool = True) -> None:
    if not bool(xp.all(xp.isfinite(a))) or bool(xp.any(a < 0)):
        raise ValueError(f"{name} must be finite and >= 0 (pass processed probabilities, not logits)")
    if rows_need_mass and not bool(xp.all(xp.any(a > 0, axis=-1))):
        raise ValueError(f"{name} has a row with no positive entry; every distribution needs mass")


def _check_single(p, q, drafts, u_accept, u_sample, greedy, logits):
    """Validate and upcast one request's inputs; returns (xp, p64, q64, drafts, u_accept, u_sample, scores)."""
    bk = _backend(p, q, logits)
    xp = bk.xp
    drafts = _host_ints(bk, drafts, "drafts")
    K = len(drafts)
    p = None if p is None else xp.asarray(bk.asarray(p), dtype=xp.float64)  # (K+1, V)
    logits = None if logits is None else xp.asarray(bk.asarray(logits), dtype=xp.float64)
    ref = p if p is not None else logits
    if ref is None:
        raise ValueError("verify_drafts: pass p (K+1, V), or logits (K+1, V) with greedy=True")
    V = int(ref.shape[-1]) if ref.ndim == 2 else -1
    for name, a in (("p", p), ("logits", logits)):
        if a is not None and (a.ndim != 2 or tuple(a.shape) != (K + 1, V) or V < 1):
            raise ValueError(f"verify_drafts: {name} must be (K+1, V) = ({K + 1}, V) for K={K} "
                             f"drafts, got {tuple(a.shape)}")
    bad = [d for d in drafts if not 0 <= d < V]
    if bad:
        raise ValueError(f"verify_drafts: draft tokens {bad} are outside the vocabulary [0, {V})")
    if greedy:
        if logits is not None and bool(xp.any(xp.isnan(logits))):
            raise ValueError("verify_drafts: logits contain NaN; fix the model output")
        if logits is None:
            _check_probs(xp, p, "verify_drafts: p")
        return xp, p, None, drafts, None, None, (logits if logits is not None else p)
    if p is None:
        raise ValueError("verify_drafts: p is required unless greedy=True (pass greedy=True for T=0)")
    _check_probs(xp, p, "verify_drafts: p")
    if q is not None:
        q = xp.asarray(bk.asarray(q), dtype=xp.float64)  # (K, V)
        if K == 0 and q.size == 0:
            q = xp.reshape(q, (0, V))  # an empty q list for K = 0
        if q.ndim != 2 or tuple(q.shape) != (K, V):
            raise ValueError(f"verify_drafts: q must be (K, V) = ({K}, {V}) or None, got {tuple(q.shape)}")
        _check_probs(xp, q, "verify_drafts: q", rows_need_mass=False)
        for k, d in enumerate(drafts):
            if not float(q[k, d]) > 0:  # R2 / precondition iv
                raise ValueError(
                    f"verify_drafts: q[{k}][{d}] = {float(q[k, d])} but draft {k} is token {d}: a draft "
                    "must have positive probability under the q it was drawn from (q=None for argmax drafts)")
    if u_accept is None or u_sample is None:
        raise ValueError("verify_drafts: u_accept (K,) and u_sample are required unless greedy=True")
    u_acc = [float(u) for u in (bk.to_numpy(bk.asarray(u_accept)) if _is_array(u_accept) else u_accept)]
    if len(u_acc) != K:
        raise ValueError(f"verify_drafts: u_accept must have K={K} entries, got {len(u_acc)}")
    for k, u in enumerate(u_acc):
        _check_unit(u, f"verify_drafts: u_accept[{k}]")
    return xp, p, q, drafts, u_acc, _check_unit(u_sample, "verify_drafts: u_sample"), None


# ----------------------------------------------------------------------------------------------
# The RNG-v1 rule (spec section 2.2, R1-R8)
# ----------------------------------------------------------------------------------------------

def verify_drafts(p, q, drafts, u_accept, u_sample, greedy: bool = False, logits=None,
                  *, sampler: Callable | None = None) -> Verdict:
    """One verification step under the RNG-v1 convention (spec section 2.2, R1-R8).

    R1 greedy: ignore q and all u; ``g_k = argmax`` of ``logits[k]`` (else of ``p[k]``), lowest
       index on ties; accept while ``drafts[k] == g_k``; emit ``g`` at the first mismatch, else ``g_K``.
    R2 accept draft k iff ``p_k[d_k] > 0 and u_accept[k] * q_k[d_k] <= p_k[d_k]``
       (``q_k[d_k] = 1`` for q=None; ``q_k[d_k] <= 0`` raises ValueError).
    R3 first rejection at j: ``w = max(p_j - q_j, 0)`` (q=None: ``w = p_j`` with ``w[d_j] = 0``);
       ``y = ICDF(w, u_sample)`` if ``sum(w) > 0``, else ``residual_fallback`` and ``y = ICDF(p_j, u_sample)``.
    R4 all accepted: ``y = ICDF(p_K, u_sample)`` (the bonus row, spec's p_{K+1}).
    R5 ICDF: see :func:`icdf`.  R6: u_sample is used at most once; coins after a rejection are unused.
    R7 returns ``Verdict(num_accepted, tokens, residual_fallback, is_bonus)``.

    ``sampler`` (optional, R10 replay only): a callable ``w -> index`` used instead of
    ``ICDF(w, u_sample)`` for the one residual / fallback / bonus draw, e.g. ``lambda w: exp_race(w, E)``.
    """
    xp, p, q, drafts, u_accept, u_sample, scores = _check_single(
        p, q, drafts, u_accept, u_sample, greedy, logits)
    if greedy:
        return _greedy_verdict(scores, drafts)  # R1
    draw = sampler if sampler is not None else (lambda w: _icdf(w, u_sample))  # R5, once (R6)
    K = len(drafts)
    for k, d in enumerate(drafts):
        p_d = float(p[k, d])
        q_d = 1.0 if q is None or on("acceptance.ignores_q") else float(q[k, d])
        if on("acceptance.strict_less"):
            if p_d > 0.0 and u_accept[k] * q_d < p_d:
                continue
        elif on("acceptance.accepts_zero_p"):
            if u_accept[k] * q_d <= p_d:
                continue
        elif p_d > 0.0 and u_accept[k] * q_d <= p_d:  # R2: accept (<= on equality, p(d)=0 never)
            continue
        # R3: first rejection at position k -> residual r_k = max(p_k - q_k, 0)
        if q is None:
            w = xp.where(xp.arange(p.shape[1]) == d, 0.0, p[k])  # (V,) one-hot q: p_k with d zeroed
            if on("acceptance.one_hot_keeps_draft"):
                w = p[k]
        else:
            w = xp.maximum(p[k] - q[k], 0.0)  # (V,)
        if on("acceptance.residual_is_p"):
            w = p[k]
        if on("acceptance.residual_softmax"):
            w = xp.exp(w - xp.max(w)) / xp.sum(xp.exp(w - xp.max(w)))
        fallback = not bool(xp.any(w > 0))  # the residual is all zero only through rounding
        y = draw(p[k] if fallback else w)
        return Verdict(k, tuple(drafts[:k]) + (int(y),), fallback, False)
    y = draw(p[K - 1 if on("acceptance.bonus_from_last_draft_row") and K > 0 else K])  # R4: bonus from the target row after the last draft
    return Verdict(K, tuple(drafts) + (int(y),), False, True)


def _greedy_verdict(scores, drafts) -> Verdict:
    """R1 on validated (K+1, V) scores (logits or probabilities)."""
    bk = backend_of(scores)
    g = [int(i) for i in bk.to_numpy(bk.xp.argmax(scores, axis=-1))]  # (K+1,) first maximal index
    if on("acceptance.greedy_ties_last"):
        V = scores.shape[-1]
        g = [V - 1 - int(i) for i in bk.to_numpy(bk.xp.argmax(bk.xp.flip(scores, axis=-1), axis=-1))]
    for k, d in enumerate(drafts):
        if d != g[k]:
            return Verdict(k, tuple(drafts[:k]) + (g[k],), False, False)
    K = len(drafts)
    return Verdict(K, tuple(drafts) + (g[K],), False, True)


def verify_greedy(scores, drafts) -> Verdict:
    """Greedy exact match (spec section 4; R1): ``verify_drafts(None, None, drafts, None, None, greedy=True, logits=scores)``.

    ``scores`` (K+1, V) are the target logits (preferred: float32 softmax can merge near-equal
    logits into a tie) or probabilities; ties resolve to the lowest index. The output equals
    greedy decoding given the same scores (Stern et al. 2018 verify step).
    """
    return verify_drafts(None, None, drafts, None, None, greedy=True, logits=scores)


# ----------------------------------------------------------------------------------------------
# Alternative rules (spec section 4); never the golden default
# ----------------------------------------------------------------------------------------------

def verify_typical(p, drafts, eps: float = TYPICAL_EPS, delta: float = TYPICAL_DELTA,
                   *, u_sample: float | None = None) -> Verdict:
    """Medusa typical acceptance (Cai et al. 2024 section 3.3.1; lossy, not distribution-preserving).

    Accept draft k iff ``p_k[d_k] > min(eps, delta * exp(-H(p_k)))`` with
    ``H(p) = -sum p log(p + 1e-5)``; stop at the first failure and emit ``argmax p_j`` (greedy
    replacement, lowest index on ties, as vLLM V0's TypicalAcceptanceSampler). All accepted:
    append the bonus ``argmax p_K``, or ``ICDF(p_K, u_sample)`` when u_sample is given.

    Defaults trap: eps is Medusa's ``posterior_threshold`` (0.09) and delta its ``posterior_alpha``
    (0.3) as ``medusa_generate`` passes them; some versions of ``evaluate_posterior`` default the
    two the other way round (0.3, 0.09). Always pass both explicitly when replaying Medusa.
    """
    bk = _backend(p)
    xp = bk.xp
    p = xp.asarray(bk.asarray(p), dtype=xp.float64)  # (K+1, V)
    drafts = _host_ints(bk, drafts, "drafts")
    K = len(drafts)
    if p.ndim != 2 or p.shape[0] != K + 1:
        raise ValueError(f"verify_typical: p must be (K+1, V) = ({K + 1}, V), got {tuple(p.shape)}")
    if not (eps > 0 and delta > 0):
        raise ValueError(f"verify_typical: eps and delta must be > 0, got eps={eps}, delta={delta}")
    if any(not 0 <= d < p.shape[1] for d in drafts):
        raise ValueError(f"verify_typical: drafts {drafts} outside the vocabulary [0, {p.shape[1]})")
    _check_probs(xp, p, "verify_typical: p")
    H = -xp.sum(p * xp.log(p + TYPICAL_LOG_FLOOR), axis=-1)  # (K+1,) entropy per position
    threshold = xp.minimum(eps, delta * xp.exp(-H))  # (K+1,)
    for k, d in enumerate(drafts):
        if not float(p[k, d]) > float(threshold[k]):  # strict >
            return Verdict(k, tuple(drafts[:k]) + (int(xp.argmax(p[k])),), False, False)
    y = int(xp.argmax(p[K])) if u_sample is None else _icdf(p[K], _check_unit(u_sample, "u_sample"))
    return Verdict(K, tuple(drafts) + (y,), False, True)


def verify_block(p, q, drafts, u_accept, u_sample, *, sampler: Callable | None = None) -> Verdict:
    """Block verification (Sun et al., arXiv 2403.10444; vLLM MRV2 ``"block"``; spec section 4). Lossless.

    ``rho_0 = 1``, ``rho_i = min(1, rho_{i-1} p_i(d_i) / q_i(d_i))``,
    ``M_i = sum_y max(rho_i p_{i+1}(y) - q_{i+1}(y), 0)``, ``h_i = M_i / (M_i + 1 - rho_i)``
    (1 if the denominator is not positive), ``h_K = rho_K``; A = the largest i in 1..K with
    ``u_accept[i-1] <= h_i`` (0 if none). A < K: ``y = ICDF(max(rho_A p_{A+1} - q_{A+1}, 0), u_sample)``
    (fallback to p_{A+1} if that is all zero); A = K: ``y = ICDF(p_{K+1}, u_sample)``.
    Positions use the spec's 1-based i; p row i is p_{i+1}. q=None means one-hot q.

    Choice (as R2): a prefix with ``rho_i = 0`` (it contains a token with p = 0) is never
    accepted, even at u = 0.
    """
    xp, p, q, drafts, u_accept, u_sample, _ = _check_single(p, q, drafts, u_accept, u_sample, False, None)
    K, V = len(drafts), p.shape[1]
    vocab = xp.arange(V)

    def q_row(i):  # q_{i+1} as a dense (V,) row (0-based draft position i)
        return xp.where(vocab == drafts[i], 1.0, 0.0) if q is None else q[i]

    rho, rhos, A = 1.0, [1.0], 0
    for i in range(1, K + 1):
        d = drafts[i - 1]
        q_d = 1.0 if q is None else float(q[i - 1, d])
        rho = min(1.0, rho * float(p[i - 1, d]) / q_d)  # rho_i
        rhos.append(rho)
        if i < K:
            M = float(xp.sum(xp.maximum(rho * p[i] - q_row(i), 0.0)))  # M_i
            h = M / (M + 1.0 - rho) if M + 1.0 - rho > 0 else 1.0  # h_i
        else:
            h = rho  # h_K
        if rho > 0.0 and u_accept[i - 1] <= h:
            A = i  # keep scanning: A is the LARGEST accepted i
    draw = sampler if sampler is not None else (lambda w: _icdf(w, u_sample))
    if A == K:
        return Verdict(K, tuple(drafts) + (int(draw(p[K])),), False, True)
    w = xp.maximum(rhos[A] * p[A] - q_row(A), 0.0)  # (V,) residual at position A+1
    fallback = not bool(xp.any(w > 0))
    y = draw(p[A] if fallback else w)
    return Verdict(A, tuple(drafts[:A]) + (int(y),), fallback, False)


# ----------------------------------------------------------------------------------------------
# Batched RNG-v1 (R8: independent coins per request, nothing shared)
# ----------------------------------------------------------------------------------------------

def _icdf_rows(w, u):
    """R5 on each row of w (N, V) with coins u (N,); -1 where a row has no positive weight."""
    xp = backend_of(w, u).xp
    V = w.shape[-1]
    c = _host_cumsum(w)  # (N, V) sequential per row, as the 1-d cumsum
    t = u * c[:, -1]  # (N,) t = u * S
    hit = (w > 0) & (c > t[:, None])  # (N, V)
    first_hit = xp.argmax(xp.asarray(hit, dtype=xp.int8), axis=-1)  # (N,) first True
    positive = w > 0  # (N, V)
    last_pos = V - 1 - xp.argmax(xp.asarray(xp.flip(positive, axis=-1), dtype=xp.int8), axis=-1)  # (N,)
    y = xp.where(xp.any(hit, axis=-1), first_hit, last_pos)  # rounding fallback of R5
    return xp.where(xp.any(positive, axis=-1), y, -1)  # (N,)


def verify_drafts_batch_ref(p, q, drafts, u_accept, u_sample, greedy, logits=None) -> BatchVerdict:
    """Plain array version of ``verify_drafts`` for N requests (R1-R8, vectorised over n).

    p (N, K+1, V), q (N, K, V) or None (one-hot), drafts (N, K) int, u_accept (N, K),
    u_sample (N,), greedy (N,) bool, logits (N, K+1, V) or None (greedy argmax of p).
    Inputs must be valid (see ``verify_drafts_batch``). Kernels with this signature:
    backends/numba_accept.py, backends/cupy_accept.py.
    """
    bk = backend_of(p, q, drafts, u_accept, u_sample, greedy, logits)
    xp = bk.xp
    p = xp.asarray(p, dtype=xp.float64)  # (N, K+1, V)
    N, K1, V = p.shape
    K = K1 - 1
    drafts = xp.asarray(drafts, dtype=xp.int64)  # (N, K)
    u_accept = xp.asarray(u_accept, dtype=xp.float64)  # (N, K)
    u_sample = xp.asarray(u_sample, dtype=xp.float64)  # (N,)
    greedy = xp.asarray(greedy, dtype=xp.bool)  # (N,)
    vocab = xp.arange(V)
    # R2 accept test at every position (N, K)
    p_d = xp.take_along_axis(p[:, :K, :], drafts[:, :, None], axis=-1)[:, :, 0]  # (N, K) p_k[d_k]
    if q is None:
        q_d = xp.ones_like(p_d)  # (N, K)
    else:
        q = xp.asarray(q, dtype=xp.float64)  # (N, K, V)
        q_d = xp.take_along_axis(q, drafts[:, :, None], axis=-1)[:, :, 0]  # (N, K) q_k[d_k]
    accept_stoch = (p_d > 0) & (u_accept * q_d <= p_d)  # (N, K)
    # R1 greedy: argmax of the logits (or of p), first index on ties
    scores = p if logits is None else logits
    g = xp.argmax(scores, axis=-1)  # (N, K+1)
    accept_greedy = drafts == g[:, :K]  # (N, K)
    accept = xp.where(greedy[:, None], accept_greedy, accept_stoch)  # (N, K)
    # A = first rejected position (K if none): first True of [~accept, True]
    stop = xp.concat([~accept, xp.ones((N, 1), dtype=xp.bool)], axis=1)  # (N, K+1)
    A = xp.argmax(xp.asarray(stop, dtype=xp.int8), axis=1)  # (N,)
    is_bonus = A == K  # (N,)
    # R3/R4: the weight row of the one draw: residual at A (A < K) or the bonus row p_K
    p_A = xp.take_along_axis(p, A[:, None, None], axis=1)[:, 0, :]  # (N, V)
    d_pad = xp.concat([drafts, xp.full((N, 1), -1, dtype=xp.int64)], axis=1)  # (N, K+1)
    d_A = xp.take_along_axis(d_pad, A[:, None], axis=1)[:, 0]  # (N,) rejected draft (-1 for bonus)
    if q is None:
        resid = xp.where(vocab[None, :] == d_A[:, None], 0.0, p_A)  # (N, V) p_A with d_A zeroed
    else:
        q_pad = xp.concat([q, xp.zeros((N, 1, V), dtype=xp.float64)], axis=1)  # (N, K+1, V)
        q_A = xp.take_along_axis(q_pad, A[:, None, None], axis=1)[:, 0, :]  # (N, V)
        resid = xp.maximum(p_A - q_A, 0.0)  # (N, V)
    w = xp.where(is_bonus[:, None], p_A, resid)  # (N, V)
    fallback = ~greedy & ~is_bonus & ~xp.any(w > 0, axis=-1)  # (N,)
    w = xp.where(fallback[:, None], p_A, w)  # (N, V)
    y = _icdf_rows(w, u_sample)  # (N,)
    g_A = xp.take_along_axis(g, A[:, None], axis=1)[:, 0]  # (N,)
    y = xp.where(greedy, g_A, y)  # (N,)
    # tokens: accepted drafts, then y, then -1 padding
    pos = xp.arange(K + 1)[None, :]  # (1, K+1)
    tokens = xp.where(pos < A[:, None], d_pad, xp.where(pos == A[:, None], y[:, None], -1))  # (N, K+1)
    return BatchVerdict(xp.asarray(A, dtype=xp.int64), xp.asarray(tokens, dtype=xp.int64),
                        fallback, is_bonus)


def verify_drafts_batch(p, q, drafts, u_accept, u_sample, greedy=False, logits=None) -> BatchVerdict:
    """``verify_drafts`` for N requests at once (R8), dispatched to a kernel when one is registered.

    p (N, K+1, V) processed target probabilities (may be None when every row is greedy and
    logits are given), q (N, K, V) or None (one-hot drafts for every request), drafts (N, K),
    u_accept (N, K), u_sample (N,) (both may be None when every row is greedy), greedy: bool
    or (N,) bool, logits (N, K+1, V) or None. Returns ``BatchVerdict`` of arrays on the inputs'
    backend; tokens is (N, K+1) padded with -1. Every request has the same K (pad ragged
    batches yourself and cut the outputs at each request's own K).
    """
    bk = _backend(p, q, drafts, u_accept, u_sample, greedy, logits)
    xp = bk.xp
    ref = p if p is not None else logits
    if ref is None:
        raise ValueError("verify_drafts_batch: pass p (N, K+1, V), or logits with greedy=True")
    ref = bk.asarray(ref)
    if ref.ndim != 3 or ref.shape[1] < 1 or ref.shape[2] < 1:
        raise ValueError(f"verify_drafts_batch: p must be (N, K+1, V) with V >= 1, got {tuple(ref.shape)}")
    N, K1, V = ref.shape
    K = K1 - 1
    greedy = xp.asarray(bk.asarray(greedy), dtype=xp.bool)
    if greedy.ndim == 0:
        greedy = xp.full((N,), bool(greedy), dtype=xp.bool)  # (N,)
    if tuple(greedy.shape) != (N,):
        raise ValueError(f"verify_drafts_batch: greedy must be a bool or (N,) = ({N},), got {tuple(greedy.shape)}")
    all_greedy = bool(xp.all(greedy))
    drafts = bk.asarray(drafts)
    if tuple(drafts.shape) != (N, K) or (N * K > 0 and drafts.dtype.kind not in "iu"):
        raise ValueError(f"verify_drafts_batch: drafts must be integer (N, K) = ({N}, {K}), got "
                         f"{tuple(drafts.shape)} {drafts.dtype}")
    drafts = xp.asarray(drafts, dtype=xp.int64)  # (N, K)
    if bool(xp.any((drafts < 0) | (drafts >= V))):
        raise ValueError(f"verify_drafts_batch: draft tokens must lie in [0, {V})")
    if logits is not None:
        logits = bk.asarray(logits)
        if tuple(logits.shape) != (N, K1, V) or bool(xp.any(xp.isnan(logits))):
            raise ValueError(f"verify_drafts_batch: logits must be (N, K+1, V) = {(N, K1, V)} without NaN")
    if p is None:
        if not all_greedy:
            raise ValueError("verify_drafts_batch: p is required for non-greedy rows")
        p = xp.zeros((N, K1, V), dtype=logits.dtype)  # unused: every row takes argmax of logits
    else:
        p = bk.asarray(p)
        _check_probs(xp, p[~greedy], "verify_drafts_batch: p")  # stochastic rows need mass
        if logits is None:
            _check_probs(xp, p[greedy], "verify_drafts_batch: p")
    if q is not None:
        q = bk.asarray(q)
        if tuple(q.shape) != (N, K, V):
            raise ValueError(f"verify_drafts_batch: q must be (N, K, V) = {(N, K, V)} or None, got {tuple(q.shape)}")
        _check_probs(xp, q, "verify_drafts_batch: q", rows_need_mass=False)
        q_d = xp.take_along_axis(q, drafts[:, :, None], axis=-1)[:, :, 0]  # (N, K)
        bad = xp.nonzero((q_d <= 0) & ~greedy[:, None])
        if bad[0].shape[0] > 0:
            n, k = int(bad[0][0]), int(bad[1][0])
            raise ValueError(
                f"verify_drafts_batch: q[{n}, {k}, {int(drafts[n, k])}] = {float(q_d[n, k])}: a draft must have "
                "positive probability under the q it was drawn from (q=None for argmax drafts)")
    if u_accept is None and u_sample is None and all_greedy:
        u_accept, u_sample = xp.zeros((N, K), dtype=xp.float64), xp.zeros((N,), dtype=xp.float64)
    if u_accept is None or u_sample is None:
        raise ValueError("verify_drafts_batch: u_accept (N, K) and u_sample (N,) are required for non-greedy rows")
    u_accept = xp.asarray(bk.asarray(u_accept), dtype=xp.float64)  # (N, K)
    u_sample = xp.asarray(bk.asarray(u_sample), dtype=xp.float64)  # (N,)
    if tuple(u_accept.shape) != (N, K) or tuple(u_sample.shape) != (N,):
        raise ValueError(f"verify_drafts_batch: u_accept must be (N, K) = ({N}, {K}) and u_sample (N,), got "
                         f"{tuple(u_accept.shape)} and {tuple(u_sample.shape)}")
    stoch = ~greedy
    if bool(xp.any((u_accept[stoch] < 0) | (u_accept[stoch] >= 1))) or bool(
            xp.any((u_sample[stoch] < 0) | (u_sample[stoch] >= 1))):
        raise ValueError("verify_drafts_batch: u_accept and u_sample must lie in [0, 1)")
    fast = bk.kernel("verify_drafts_batch")
    return BatchVerdict(*(fast or verify_drafts_batch_ref)(p, q, drafts, u_accept, u_sample, greedy, logits))


# ----------------------------------------------------------------------------------------------
# Dyadic input cases for golden files (inputs only; expected values come from verify_drafts)
# ----------------------------------------------------------------------------------------------

# The rows of spec section 2.4
_P1 = [1 / 8, 1 / 8, 1 / 4, 1 / 2]
_Q1 = [1 / 2, 1 / 4, 1 / 8, 1 / 8]
_P2 = [1 / 2, 1 / 4, 1 / 8, 1 / 8]
_Q2 = [1 / 4] * 4
_P3 = [1 / 4] * 4


def _case(name, pins, drafts, p, q, u_accept, u_sample, greedy=False, logits=None):
    return {"case": name, "pins": pins, "V": len(p[0]), "K": len(drafts), "drafts": list(drafts),
            "q": q, "p": p, "u_accept": u_accept, "u_sample": u_sample, "greedy": greedy,
            "logits": logits}


def dyadic_cases() -> list[dict]:
    """>= 40 RNG-v1 input records with dyadic numbers (R11), covering every rule and edge case.

    Each record: ``{case, pins, V, K, drafts, q (rows or None), p (rows), u_accept, u_sample,
    greedy, logits}`` with Python floats that are exact dyadic rationals, representable in
    float32 too (``decimal.Decimal(x)`` prints the exact decimal string). The first nine are the
    worked cases of spec section 2.4. No expected values: compute them with ``verify_drafts``.
    Every p and q row sums to exactly 1, except rows named "deficit" in ``pins``.
    """
    h20, h21, h24 = 2.0 ** -20, 2.0 ** -21, 2.0 ** -24  # 1 - 2^-24 is the largest float32 below 1
    P, Q = [_P1, _P2, _P3], [_Q1, _Q2]
    c = [
        # spec section 2.4, verbatim
        _case("A", "reject (0.1875 > 0.125); ICDF t=0.25 on cumsum [0,0,.125,.5]", [0, 2], P, Q, [0.375, 0.5], 0.5),
        _case("B", "<= on equality; reject at position 2; u_sample=0 picks the first positive weight",
              [0, 2], P, Q, [0.25, 0.75], 0.0),
        _case("C", "bonus; strict > in ICDF (c[2]=0.75 is not > 0.75)", [1, 3], P, Q, [0.25, 0.25], 0.75),
        _case("C'", "bonus, interior", [1, 3], P, Q, [0.25, 0.25], 0.7),
        _case("D", "p(d)=0 rejected even at u=0", [0, 2], [[0, 1 / 4, 1 / 4, 1 / 2], _P2, _P3], Q, [0.0, 0.5], 0.5),
        _case("E1", "one-hot accept iff u <= p(d)", [2], [_P1, _P2], None, [0.25], 0.2),
        _case("E2", "one-hot residual = p_1 with index 2 zeroed, S=3/4, t=0.15", [2], [_P1, _P2], None, [0.5], 0.2),
        _case("F", "greedy, lowest-index tie-break", [2], [_P1, _P2], None, None, None, True,
              [[2.0, 5.0, 5.0, 1.0], [0.0, 1.0, 2.0, 3.0]]),
        _case("G", "residual all-zero by a rounding deficit of p_1 -> fallback ICDF on p_1",
              [1], [[0.5, 0.5 - h20], [0.5, 0.5]], [[0.5, 0.5]], [1 - h21], 0.75),
        # K = 0: just the bonus
        _case("K0-bonus", "K=0 emits only the bonus; u_sample interior", [], [_P2], None, [], 0.625),
        _case("K0-bonus-u0", "K=0, u_sample=0 -> first positive weight (leading zero skipped)",
              [], [[0, 1 / 2, 1 / 2, 0]], None, [], 0.0),
        _case("K0-greedy", "K=0 greedy -> argmax of the bonus row", [], [_P1], None, None, None, True),
        _case("K0-explicit-q", "K=0 with an empty q", [], [_P3], [], [], 0.25),
        # R2 accept test boundaries
        _case("eq-boundary-accept", "u*q == p exactly -> accept (<=)", [0], [[1 / 4, 3 / 4], [1 / 2, 1 / 2]],
              [[1 / 2, 1 / 2]], [0.5], 0.5),
        _case("eq-boundary-reject", "u*q just above p -> reject; residual [0, 1/4]", [0],
              [[1 / 4, 3 / 4], [1 / 2, 1 / 2]], [[1 / 2, 1 / 2]], [0.5 + 2 ** -10], 0.5),
        _case("ratio-above-1", "p(d) > q(d): accept even at u close to 1", [3], [_P1, _P2], [_Q1], [1 - h24], 0.3125),
        _case("p-equals-q", "p == q: every draft accepted, bonus", [3, 0], [_P1, _P2, _P3], [_P1, _P2],
              [1 - h20, 1 - h21], 0.875),
        _case("p-zero-u-positive", "p(d)=0 with u>0 -> reject", [0], [[0, 1 / 2, 1 / 2, 0], _P2], [_Q2], [0.5], 0.25),
        _case("p-zero-onehot-u0", "one-hot q, p(d)=0, u=0 -> reject (vLLM v1 would accept)", [3],
              [[1 / 2, 1 / 4, 1 / 4, 0], _P3], None, [0.0], 0.5),
        _case("onehot-eq-boundary", "one-hot q, u == p(d) -> accept", [1], [[1 / 4, 1 / 2, 1 / 4], [1 / 2, 0, 1 / 2]],
              None, [0.5], 0.5),
        _case("onehot-pd-1", "one-hot q, p(d)=1 -> accept at any u < 1", [2], [[0, 0, 1], [1 / 4, 1 / 4, 1 / 2]],
              None, [1 - h24], 0.125),
        _case("q-sparse", "q has mass only on the draft (explicit one-hot) == q=None", [2], [_P1, _P2],
              [[0, 0, 1, 0]], [0.5], 0.1875),
        # rejection position and bonus for K = 3
        _case("K3-reject-1", "K=3 reject at position 1", [0, 1, 2], [_P1, _P2, _P3, _P1], [_Q1, _Q2, _Q2],
              [0.5, 0.0, 0.0], 0.125),
        _case("K3-reject-2", "K=3 reject at position 2", [3, 2, 1], [_P1, _P2, _P3, _P1], [_Q1, _Q2, _Q2],
              [0.75, 0.5 + 2 ** -8, 0.0], 0.5),
        _case("K3-reject-3", "K=3 reject at position 3 (last draft)", [3, 0, 1], [_P1, _P2, _P3, _P1],
              [_Q1, _Q2, [1 / 2, 1 / 2, 0, 0]], [0.0, 0.25, 0.75], 0.375),
        _case("K3-bonus", "K=3 all accepted, bonus from the 4th row", [2, 1, 3], [_P1, _P2, _P3, _P1],
              [_Q1, _Q2, _Q2], [0.5, 0.5, 0.5], 0.8125),
        _case("K3-onehot-bonus", "K=3 one-hot, all accepted", [3, 0, 0], [_P1, _P2, _P3, _P2], None,
              [0.5, 0.5, 0.25], 0.5),
        _case("K3-onehot-reject-3", "K=3 one-hot, reject at position 3", [3, 0, 1], [_P1, _P2, _P3, _P2], None,
              [0.25, 0.125, 0.5], 0.5),
        # R5 ICDF edges
        _case("icdf-exact-boundary", "u_sample*S == c[1] exactly -> the next positive index (strict >)", [],
              [[1 / 4, 1 / 4, 0, 1 / 2]], None, [], 0.5),
        _case("icdf-middle-zero", "zero weight between two positives is skipped", [],
              [[1 / 4, 0, 0, 3 / 4]], None, [], 0.25),
        _case("icdf-trailing-zero", "u_sample close to 1: last POSITIVE index, trailing zeros skipped", [],
              [[1 / 2, 1 / 2, 0, 0]], None, [], 1 - h24),
        _case("icdf-leading-zero", "u_sample=0 with leading zeros: first positive index", [],
              [[0, 0, 1 / 4, 3 / 4]], None, [], 0.0),
        _case("icdf-residual-boundary", "residual [0,0,1/8,3/8] (S=1/2), u_sample=1/4: t = c[2] = 1/8 exactly -> token 3",
              [0, 2], P, Q, [0.5, 0.5], 0.25),
        _case("V1", "V=1: the only token is drafted, accepted, and the bonus", [0], [[1.0], [1.0]], [[1.0]], [1 - h20], 0.5),
        _case("V2-last-index", "draft at index V-1, reject, residual picks index 0", [1], [[3 / 4, 1 / 4], [1 / 2, 1 / 2]],
              [[1 / 4, 3 / 4]], [0.5], 1 - 2 ** -10),
        _case("V8-wide", "V=8, K=2, dyadic 1/32 grid", [5, 6],
              [[1 / 32, 3 / 32, 1 / 8, 1 / 16, 3 / 16, 1 / 4, 1 / 8, 1 / 8],
               [1 / 8] * 8, [1 / 16, 1 / 16, 1 / 8, 1 / 8, 1 / 8, 1 / 8, 1 / 8, 1 / 4]],
              [[1 / 8] * 8, [1 / 32, 1 / 32, 1 / 16, 1 / 16, 1 / 8, 1 / 8, 1 / 2, 1 / 16]], [0.75, 0.5], 0.625),
        # R3 residual fallback (rounding deficits)
        _case("fallback-onehot", "one-hot q, p(d)=1-2^-20 (deficit), u above it -> residual empty -> fallback",
              [1], [[0, 1 - h20, 0, 0], _P3], None, [1 - h21], 0.5),
        _case("fallback-pos2", "K=2: accept pos 1, deficit of p_2 at the draft -> fallback at position 2", [2, 1],
              [_P1, [0.5, 0.5 - h20, 0, 0], _P3], [_Q1, [0.5, 0.5, 0, 0]], [0.5, 1 - h21], 0.25),
        _case("fallback-u0", "deficit fallback with u_sample=0 -> first positive index of p_j", [1],
              [[0.5, 0.5 - h20], [0.5, 0.5]], [[0.5, 0.5]], [1 - h21], 0.0),
        # R1 greedy
        _case("greedy-all-accept", "greedy, every draft is the argmax -> bonus argmax", [3, 0],
              [_P1, _P2, _P3], None, None, None, True, [[0, 1, 2, 3], [4, 3, 2, 1], [1, 1, 0, 0]]),
        _case("greedy-mismatch-2", "greedy, mismatch at position 2 emits the argmax there", [3, 1],
              [_P1, _P2, _P3], None, None, None, True, [[0, 1, 2, 3], [4, 3, 2, 1], [0, 0, 0, 0]]),
        _case("greedy-ties-on-p", "greedy without logits: argmax of p, ties -> lowest index", [0],
              [[1 / 4, 1 / 4, 1 / 4, 1 / 4], [1 / 8, 3 / 8, 3 / 8, 1 / 8]], None, None, None, True),
        _case("greedy-neg-inf", "greedy with -inf (masked) logits and a tie at the bonus row", [2],
              [_P1, _P2], None, None, None, True, [[-math.inf, 0.5, 1.5, -2.0], [-math.inf, 7.0, 7.0, 7.0]]),
        _case("greedy-ignores-q-and-u", "greedy ignores q and u (q(d)=0 and u given)", [1],
              [_P1, _P2], [[1, 0, 0, 0]], [1 - 2 ** -10], 1 - 2 ** -10, True, [[0, 2, 1, 0], [1, 0, 0, 0]]),
        _case("greedy-K3", "greedy K=3 mismatch at position 3", [1, 2, 3],
              [_P1, _P2, _P3, _P1], None, None, None, True,
              [[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]]),
    ]
    return copy.deepcopy(c)  # rows are shared above; callers get their own lists


DYADIC_CASES = dyadic_cases()
