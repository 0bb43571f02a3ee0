"""Acceptance rules other than the lossless RNG-v1 rule: Medusa typical acceptance (lossy) and
block verification (Sun et al. 2024). docs/acceptance-rules.md section 4.
"""
from __future__ import annotations

from typing import Callable

from refmtp.inference.acceptance import Verdict, check_probs, check_single, host_ints, inputs_backend
from refmtp.inference.sampling import check_unit, icdf_unchecked

# Medusa typical acceptance defaults as used by ``medusa_generate`` (docs/speculative-decoding.md §4).
TYPICAL_EPS = 0.09
TYPICAL_DELTA = 0.3
TYPICAL_LOG_FLOOR = 1e-5  # entropy uses log(p + 1e-5), as Medusa and vLLM V0 do


# ----------------------------------------------------------------------------------------------
# Alternative rules (docs/speculative-decoding.md §4); never the golden default
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
    bk = inputs_backend(p)
    xp = bk.xp
    p = xp.asarray(bk.asarray(p), dtype=xp.float64)  # (K+1, V)
    drafts = host_ints(bk, drafts, "drafts")
    K = len(drafts)
    if p.ndim != 2 or p.shape[0] != K + 1:
        raise ValueError(f"verify_typical: p must be (K+1, V) = ({K + 1}, V), got {tuple(p.shape)}")
    if not (eps > 0 and delta > 0):
        raise ValueError(f"verify_typical: eps and delta must be > 0, got eps={eps}, delta={delta}")
    if any(not 0 <= d < p.shape[1] for d in drafts):
        raise ValueError(f"verify_typical: drafts {drafts} outside the vocabulary [0, {p.shape[1]})")
    check_probs(xp, p, "verify_typical: p")
    H = -xp.sum(p * xp.log(p + TYPICAL_LOG_FLOOR), axis=-1)  # (K+1,) entropy per position
    threshold = xp.minimum(eps, delta * xp.exp(-H))  # (K+1,)
    for k, d in enumerate(drafts):
        if not float(p[k, d]) > float(threshold[k]):  # strict >
            return Verdict(k, tuple(drafts[:k]) + (int(xp.argmax(p[k])),), False, False)
    y = int(xp.argmax(p[K])) if u_sample is None else icdf_unchecked(p[K], check_unit(u_sample, "u_sample"))
    return Verdict(K, tuple(drafts) + (y,), False, True)


def verify_block(p, q, drafts, u_accept, u_sample, *, sampler: Callable | None = None) -> Verdict:
    """Block verification (Sun et al., arXiv 2403.10444; vLLM MRV2 ``"block"``; docs/speculative-decoding.md §4). Lossless.

    ``rho_0 = 1``, ``rho_i = min(1, rho_{i-1} p_i(d_i) / q_i(d_i))``,
    ``M_i = sum_y max(rho_i p_{i+1}(y) - q_{i+1}(y), 0)``, ``h_i = M_i / (M_i + 1 - rho_i)``
    (1 if the denominator is not positive), ``h_K = rho_K``; A = the largest i in 1..K with
    ``u_accept[i-1] <= h_i`` (0 if none). A < K: ``y = ICDF(max(rho_A p_{A+1} - q_{A+1}, 0), u_sample)``
    (fallback to p_{A+1} if that is all zero); A = K: ``y = ICDF(p_{K+1}, u_sample)``.
    Positions use the 1-based i of docs/speculative-decoding.md §4; p row i is p_{i+1}. q=None means one-hot q.

    Choice (as R2): a prefix with ``rho_i = 0`` (it contains a token with p = 0) is never
    accepted, even at u = 0.
    """
    xp, p, q, drafts, u_accept, u_sample, _ = check_single(p, q, drafts, u_accept, u_sample, False, None)
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
    draw = sampler if sampler is not None else (lambda w: icdf_unchecked(w, u_sample))
    if A == K:
        return Verdict(K, tuple(drafts) + (int(draw(p[K])),), False, True)
    w = xp.maximum(rhos[A] * p[A] - q_row(A), 0.0)  # (V,) residual at position A+1
    fallback = not bool(xp.any(w > 0))
    y = draw(p[A] if fallback else w)
    return Verdict(A, tuple(drafts[:A]) + (int(y),), fallback, False)


