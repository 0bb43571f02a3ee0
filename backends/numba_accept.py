"""Numba kernel: ``verify_drafts_batch`` (RNG-v1 acceptance for N requests, docs/speculative-decoding.md §2.2).

Twin of ``refmtp.inference.acceptance.verify_drafts_batch_ref`` with the same signature and
bit-identical results: one sequential pass per request, float64 arithmetic (inputs upcast
element by element), the same operation order as the numpy reference (``cumsum`` is a
sequential accumulation in numpy too), no fastmath. Inputs are assumed valid; the public
``verify_drafts_batch`` checks them before dispatching here.

    _verify_drafts_batch_loop      plain Python (``verify_drafts_batch_numba.py_func``)
    verify_drafts_batch_numba      njit(cache=True) of the loop
    verify_drafts_batch            wrapper with the reference's signature -> KERNELS
"""
from __future__ import annotations

import numpy as np
from numba import njit

# Weight modes of one ICDF draw (R3-R5)
W_P = 0  # w = p_j                        (bonus row, or the residual fallback)
W_RESIDUAL = 1  # w = max(p_j - q_j, 0)    (explicit q)
W_ONEHOT = 2  # w = p_j with w[d_j] = 0     (q = None, deterministic drafter)


def _weight(p, q, n, j, i, d, mode):
    """w_i of the weight row at request n, position j (float64)."""
    p_i = np.float64(p[n, j, i])
    if mode == W_RESIDUAL:
        r = p_i - np.float64(q[n, j, i])
        return r if r > 0.0 else 0.0
    if mode == W_ONEHOT and i == d:
        return 0.0
    return p_i


_weight_numba = njit(cache=True, nogil=True)(_weight)


def _icdf_row(p, q, n, j, d, mode, u):
    """R5 on the weight row (n, j, mode): first i with w_i > 0 and c_i > u*S; -1 if no w_i > 0."""
    V = p.shape[2]
    S = 0.0
    for i in range(V):  # S = c[-1], summed in index order like numpy's cumsum
        S += _weight_numba(p, q, n, j, i, d, mode)
    t = u * S
    c = 0.0
    last_positive = -1
    for i in range(V):
        w = _weight_numba(p, q, n, j, i, d, mode)
        c += w
        if w > 0.0:
            if c > t:  # strict > on the inclusive cumsum
                return i
            last_positive = i
    return last_positive  # rounding only: the largest positive index (or -1: no mass)


_icdf_row_numba = njit(cache=True, nogil=True)(_icdf_row)


def _verify_drafts_batch_loop(p, q, has_q, drafts, u_accept, u_sample, greedy, scores,
                              num_accepted, tokens, residual_fallback, is_bonus):
    """Fill the four outputs for every request n (R1-R8); see the module docstring."""
    N, K1, V = p.shape
    K = K1 - 1
    for n in range(N):
        for k in range(K1):
            tokens[n, k] = -1
        residual_fallback[n] = False
        if greedy[n]:  # R1: argmax of the scores, first index on ties
            A = K
            for k in range(K1):
                g = 0
                for i in range(1, V):
                    if scores[n, k, i] > scores[n, k, g]:
                        g = i
                if k < K and drafts[n, k] == g:
                    tokens[n, k] = g
                    continue
                tokens[n, k] = g
                A = k
                break
            num_accepted[n] = A
            is_bonus[n] = A == K
            continue
        A = K
        for k in range(K):  # R2 accept test
            d = drafts[n, k]
            p_d = np.float64(p[n, k, d])
            q_d = np.float64(q[n, k, d]) if has_q else 1.0
            if p_d > 0.0 and u_accept[n, k] * q_d <= p_d:
                tokens[n, k] = d
                continue
            A = k
            break
        if A < K:  # R3 residual at the first rejection
            mode = W_RESIDUAL if has_q else W_ONEHOT
            y = _icdf_row_numba(p, q, n, A, drafts[n, A], mode, u_sample[n])
            if y < 0:  # residual all zero (rounding only): fallback to p_j
                residual_fallback[n] = True
                y = _icdf_row_numba(p, q, n, A, -1, W_P, u_sample[n])
        else:  # R4 bonus row
            y = _icdf_row_numba(p, q, n, K, -1, W_P, u_sample[n])
        tokens[n, A] = y
        num_accepted[n] = A
        is_bonus[n] = A == K


verify_drafts_batch_numba = njit(cache=True, nogil=True)(_verify_drafts_batch_loop)


def _prepare(p, q, drafts, u_accept, u_sample, greedy, logits):
    """Contiguous host arrays and fresh outputs for the loop (shared by the jit and py_func paths)."""
    p = np.ascontiguousarray(p)  # (N, K+1, V) float32 or float64, upcast inside the loop
    if p.dtype not in (np.float32, np.float64):
        p = p.astype(np.float64)
    N, K1, V = p.shape
    has_q = q is not None
    q = np.ascontiguousarray(q) if has_q else np.zeros((1, 1, 1), dtype=p.dtype)  # (N, K, V) or dummy
    if q.dtype not in (np.float32, np.float64):
        q = q.astype(np.float64)
    drafts = np.ascontiguousarray(drafts, dtype=np.int64).reshape(N, K1 - 1)  # (N, K)
    u_accept = np.ascontiguousarray(u_accept, dtype=np.float64).reshape(N, K1 - 1)  # (N, K)
    u_sample = np.ascontiguousarray(u_sample, dtype=np.float64).reshape(N)  # (N,)
    greedy = np.ascontiguousarray(np.broadcast_to(np.asarray(greedy, dtype=np.bool_), (N,)))  # (N,)
    scores = p if logits is None else np.ascontiguousarray(logits)  # (N, K+1, V)
    outs = (np.zeros(N, dtype=np.int64), np.full((N, K1), -1, dtype=np.int64),
            np.zeros(N, dtype=np.bool_), np.zeros(N, dtype=np.bool_))
    return (p, q, has_q, drafts, u_accept, u_sample, greedy, scores) + outs


def verify_drafts_batch(p, q, drafts, u_accept, u_sample, greedy, logits=None, *, jit=True):
    """Same signature and result as ``verify_drafts_batch_ref`` (numpy inputs).

    Returns ``(num_accepted (N,), tokens (N, K+1), residual_fallback (N,), is_bonus (N,))``.
    ``jit=False`` runs the plain-Python loop (tests compare both).
    """
    args = _prepare(p, q, drafts, u_accept, u_sample, greedy, logits)
    (verify_drafts_batch_numba if jit else _verify_drafts_batch_loop)(*args)
    return args[-4], args[-3], args[-2], args[-1]


KERNELS: dict = {"verify_drafts_batch": verify_drafts_batch}
