"""Speculative-decoding acceptance rules as pure functions (docs/speculative-decoding.md).

Nothing here touches a model: every function maps (target distributions p, draft
distributions q, draft tokens, random numbers) to a decision. The decoding loop that calls them
lives in ``refmtp/inference/speculative.py``.

Notation (docs/speculative-decoding.md §0). One verification step of one request has K drafts. Positions are
0-based in code and 1-based in docs/speculative-decoding.md §0: ``drafts[k]`` is its ``d_{k+1}``.

    p         (K+1, V)  processed target distributions; row k is p(. | c, d_<k), row K the bonus row
    q         (K, V)    distributions the drafts were drawn from; None = one-hot at the draft
                        (a deterministic / argmax drafter, vLLM's and SGLang's MTP default)
    drafts    (K,)      draft tokens
    u_accept  (K,)      accept coins in [0, 1), one per draft (all K given, R6)
    u_sample  scalar    the one coin for the residual / fallback / bonus draw, in [0, 1)

``verify_drafts`` is the normative RNG-v1 rule (docs/speculative-decoding.md §2.2, rules R1-R8); it is what the
golden files are computed with. The alternatives of docs/speculative-decoding.md §4 are separate, named rules:
``verify_greedy`` (exact match), ``verify_typical`` (Medusa typical acceptance, lossy) and
``verify_block`` (block verification, Sun et al. 2024). ``verify_drafts_batch`` runs the RNG-v1
rule for N requests at once (kernels: backends/numba_accept.py, backends/accept.cu).

All arithmetic is float64 (inputs are upcast). Decisions are per step, so the few scalars they
need (p_k[d_k], q_k[d_k], the sampled index) are pulled to the host; the vector work (residual,
cumulative sums) runs on the inputs' backend.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

from refmtp.backends import backend_of
from refmtp.inference.sampling import check_unit, host_cumsum, icdf_unchecked
from refmtp.mutation import on


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
# Input checks (one-line ValueErrors, docs/speculative-decoding.md §1.2 preconditions)
# ----------------------------------------------------------------------------------------------

def is_array(x) -> bool:
    return x is not None and not isinstance(x, (list, tuple, int, float, bool))


def inputs_backend(*objs):
    """Backend of the array-typed inputs; Python lists are converted onto it by the caller."""
    return backend_of(*[o for o in objs if is_array(o)])



def host_ints(bk, x, name: str) -> list:
    a = bk.to_numpy(bk.asarray(x)) if is_array(x) else x
    if getattr(a, "ndim", 1) != 1:
        raise ValueError(f"{name} must be a 1-d sequence, got shape {tuple(a.shape)}")
    out = [int(v) for v in a]
    if any(o != v for o, v in zip(out, a)):
        raise ValueError(f"{name} must hold integers, got {list(a)}")
    return out


def check_probs(xp, a, name: str, rows_need_mass: bool = True) -> None:
    if not bool(xp.all(xp.isfinite(a))) or bool(xp.any(a < 0)):
        raise ValueError(f"{name} must be finite and >= 0 (pass processed probabilities, not logits)")
    if rows_need_mass and not bool(xp.all(xp.any(a > 0, axis=-1))):
        raise ValueError(f"{name} has a row with no positive entry; every distribution needs mass")


def check_single(p, q, drafts, u_accept, u_sample, greedy, logits):
    """Validate and upcast one request's inputs; returns (xp, p64, q64, drafts, u_accept, u_sample, scores)."""
    bk = inputs_backend(p, q, logits)
    xp = bk.xp
    drafts = host_ints(bk, drafts, "drafts")
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
            check_probs(xp, p, "verify_drafts: p")
        return xp, p, None, drafts, None, None, (logits if logits is not None else p)
    if p is None:
        raise ValueError("verify_drafts: p is required unless greedy=True (pass greedy=True for T=0)")
    check_probs(xp, p, "verify_drafts: p")
    if q is not None:
        q = xp.asarray(bk.asarray(q), dtype=xp.float64)  # (K, V)
        if K == 0 and q.size == 0:
            q = xp.reshape(q, (0, V))  # an empty q list for K = 0
        if q.ndim != 2 or tuple(q.shape) != (K, V):
            raise ValueError(f"verify_drafts: q must be (K, V) = ({K}, {V}) or None, got {tuple(q.shape)}")
        check_probs(xp, q, "verify_drafts: q", rows_need_mass=False)
        for k, d in enumerate(drafts):
            if not float(q[k, d]) > 0:  # R2 / precondition iv
                raise ValueError(
                    f"verify_drafts: q[{k}][{d}] = {float(q[k, d])} but draft {k} is token {d}: a draft "
                    "must have positive probability under the q it was drawn from (q=None for argmax drafts)")
    if u_accept is None or u_sample is None:
        raise ValueError("verify_drafts: u_accept (K,) and u_sample are required unless greedy=True")
    u_acc = [float(u) for u in (bk.to_numpy(bk.asarray(u_accept)) if is_array(u_accept) else u_accept)]
    if len(u_acc) != K:
        raise ValueError(f"verify_drafts: u_accept must have K={K} entries, got {len(u_acc)}")
    for k, u in enumerate(u_acc):
        check_unit(u, f"verify_drafts: u_accept[{k}]")
    return xp, p, q, drafts, u_acc, check_unit(u_sample, "verify_drafts: u_sample"), None


# ----------------------------------------------------------------------------------------------
# The RNG-v1 rule (docs/speculative-decoding.md §2.2, R1-R8)
# ----------------------------------------------------------------------------------------------

def verify_drafts(p, q, drafts, u_accept, u_sample, greedy: bool = False, logits=None,
                  *, sampler: Callable | None = None) -> Verdict:
    """One verification step under the RNG-v1 convention (docs/speculative-decoding.md §2.2, R1-R8).

    R1 greedy: ignore q and all u; ``g_k = argmax`` of ``logits[k]`` (else of ``p[k]``), lowest
       index on ties; accept while ``drafts[k] == g_k``; emit ``g`` at the first mismatch, else ``g_K``.
    R2 accept draft k iff ``p_k[d_k] > 0 and u_accept[k] * q_k[d_k] <= p_k[d_k]``
       (``q_k[d_k] = 1`` for q=None; ``q_k[d_k] <= 0`` raises ValueError).
    R3 first rejection at j: ``w = max(p_j - q_j, 0)`` (q=None: ``w = p_j`` with ``w[d_j] = 0``);
       ``y = ICDF(w, u_sample)`` if ``sum(w) > 0``, else ``residual_fallback`` and ``y = ICDF(p_j, u_sample)``.
    R4 all accepted: ``y = ICDF(p_K, u_sample)`` (the bonus row, p_{K+1} of docs/speculative-decoding.md §0).
    R5 ICDF: see :func:`icdf`.  R6: u_sample is used at most once; coins after a rejection are unused.
    R7 returns ``Verdict(num_accepted, tokens, residual_fallback, is_bonus)``.

    ``sampler`` (optional, R10 replay only): a callable ``w -> index`` used instead of
    ``ICDF(w, u_sample)`` for the one residual / fallback / bonus draw, e.g. ``lambda w: exp_race(w, E)``.
    """
    xp, p, q, drafts, u_accept, u_sample, scores = check_single(
        p, q, drafts, u_accept, u_sample, greedy, logits)
    if greedy:
        return _greedy_verdict(scores, drafts)  # R1
    draw = sampler if sampler is not None else (lambda w: icdf_unchecked(w, u_sample))  # R5, once (R6)
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
            w = xp.where(xp.arange(p.shape[1]) == d, 0.0, p[k, :])  # (V,) one-hot q: p_k with d zeroed
            if on("acceptance.one_hot_keeps_draft"):
                w = p[k]
        else:
            w = xp.maximum(p[k, :] - q[k, :], 0.0)  # (V,)
        if on("acceptance.residual_is_p"):
            w = p[k]
        if on("acceptance.residual_softmax"):
            w = xp.exp(w - xp.max(w)) / xp.sum(xp.exp(w - xp.max(w)))
        fallback = not bool(xp.any(w > 0))  # the residual is all zero only through rounding
        y = draw(p[k, :] if fallback else w)
        return Verdict(k, tuple(drafts[:k]) + (int(y),), fallback, False)
    y = draw(p[K - 1 if on("acceptance.bonus_from_last_draft_row") and K > 0 else K, :])  # R4: bonus from the target row after the last draft
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
    """Greedy exact match (docs/speculative-decoding.md §4; R1): ``verify_drafts(None, None, drafts, None, None, greedy=True, logits=scores)``.

    ``scores`` (K+1, V) are the target logits (preferred: float32 softmax can merge near-equal
    logits into a tie) or probabilities; ties resolve to the lowest index. The output equals
    greedy decoding given the same scores (Stern et al. 2018 verify step).
    """
    return verify_drafts(None, None, drafts, None, None, greedy=True, logits=scores)


# ----------------------------------------------------------------------------------------------
# Batched RNG-v1 (R8: independent coins per request, nothing shared)
# ----------------------------------------------------------------------------------------------

def _icdf_rows(w, u):
    """R5 on each row of w (N, V) with coins u (N,); -1 where a row has no positive weight."""
    xp = backend_of(w, u).xp
    V = w.shape[-1]
    c = host_cumsum(w)  # (N, V) sequential per row, as the 1-d cumsum
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
    bk = inputs_backend(p, q, drafts, u_accept, u_sample, greedy, logits)
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
        check_probs(xp, p[~greedy], "verify_drafts_batch: p")  # stochastic rows need mass
        if logits is None:
            check_probs(xp, p[greedy], "verify_drafts_batch: p")
    if q is not None:
        q = bk.asarray(q)
        if tuple(q.shape) != (N, K, V):
            raise ValueError(f"verify_drafts_batch: q must be (N, K, V) = {(N, K, V)} or None, got {tuple(q.shape)}")
        check_probs(xp, q, "verify_drafts_batch: q", rows_need_mass=False)
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


