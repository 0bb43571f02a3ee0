"""Kernels: causal attention forward and backward with the masked blocks skipped (numpy backend).

References (same signatures, in ``refmtp.model.ops.attention``): ``causal_attention_ref`` and
``causal_attention_backward_ref``, which form the whole (T, S) score square and mask it. Here the
T query rows are cut into blocks of ``QUERY_BLOCK``; query block ``[i0, i1)`` sees keys
``j < start + i1`` only, so every product runs over the visible keys (the block's last row sees
exactly those) and the keys beyond are never read:

    forward   s_blk = q[i0:i1] k[:L]^T                       (BLAS, L = start + i1)
              p[i0:i1, :L] = softmax_j(scale s_blk), masked   (Numba, row by row)
              o[i0:i1] = p[i0:i1, :L] v[:L]                   (BLAS)
    backward  dp_blk = dout[i0:i1] v[:L]^T,  ds = p (dp - sum_j dp p)   (query blocks)
              dq[i0:i1] = scale ds[i0:i1, :L] k[:L]
              key block [j0, j1) is seen by the queries t >= j0 - start only:
              dv[j0:j1] = p[t0:, j0:j1]^T dout[t0:],  dk[j0:j1] = scale ds[t0:, j0:j1]^T q[t0:]

With ``TRANSPOSE_FROM_ROWS`` (32) query rows or more, ``k^T`` and ``v^T`` are C-contiguous
copies, made once per (batch row, head chunk) while its keys are in cache, so ``q k^T`` and
``dout v^T`` are plain products: OpenBLAS runs these small shapes about twice as fast in that
layout as with a transposed right operand. With fewer rows (decoding) the views are used: there
the copy would cost as much as the product. The two layouts may round a product differently
(another kernel), within the bound below. The outputs o, dq, dk, dv are stored (B, T, H, D)
(``_heads_last_empty``), the layout MLA reads next.

The backward runs both loops for one (batch row, head chunk) before the next, so that chunk's
``ds`` lives in a reused scratch (never a whole (B, H, T, S) array) and its ``p`` rows are
still in cache when the key blocks read them again.

With T = 256 and blocks of 64 the products do 5/8 of the square's work. ``p`` is still returned
as the full (B, H, T, S) matrix, 0 on every masked key (the audit and the backward read it).

Rounding differs from the reference, so parity is to a stated bound (tests/test_kernel_parity.py):
products over fewer keys, row sums in 16 interleaved partial sums, and in float32 the vectorised
``exp`` of backends/numba_expf.py (<= 1.4 ulp; ``x = s - max <= 0``, and below -87 the
probability, < 1.7e-38, is off by less than that); float64 uses libm's ``exp``. Rows are split over Numba's threads by (batch,
head); each row is computed by one thread in a fixed order, so results do not depend on the
thread count.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from refmtp.backends.contracts import check_causal_attention, check_causal_attention_backward
from refmtp.backends.numba_expf import LANES, dot_total, expf32, row_max_f32, row_total

QUERY_BLOCK = 64  # query rows per block (T = 256: 5/8 of the square's products)
HEADS_PER_CHUNK = 4  # (batch, head) rows per product: a block's logits stay in the core's cache
TRANSPOSE_FROM_ROWS = 32  # from this many query rows on, each chunk's k^T and v^T are copied out (_transposed)


@njit(inline="always", cache=True)
def _scaled_row(sr, pr, scale, n):
    """pr[:n] = scale * sr[:n] (rounded as the reference rounds it) -> their max."""
    m = sr[0] * scale
    for j in range(n):
        x = sr[j] * scale
        pr[j] = x
        if x > m:
            m = x
    return m


@njit(inline="always", cache=True)
def _normalised_row(acc, pr, n):
    """pr[:n] /= sum(pr[:n]) (16-lane row sum); pr[n:] = 0 (the masked keys)."""
    total = row_total(acc, pr, n)
    for j in range(n):
        pr[j] = pr[j] / total
    pr[n:] = 0  # a slice fill (a memset), not an element loop


def _softmax_rows_f32_loop(s, scale, i0, start, p):
    """s (R, Tb, L) raw q k^T of query rows i0.. (C-contiguous, read only);
    p (R, T, S): rows i0..i0+Tb written, softmax over keys j <= start + row of scale * s, 0 beyond.

    The row max is taken on the raw logits and scaled after: rounding is monotone and scale > 0,
    so ``round(max_j s_j * scale)`` is ``max_j round(s_j * scale)``, the reference's max, exactly."""
    R, Tb, L = s.shape
    s_bits = s.view(np.int32)
    for r in prange(R):
        acc = np.empty(LANES, np.float32)
        for t in range(Tb):
            row = i0 + t
            n = start + row + 1  # visible keys
            pr, sr = p[r, row], s[r, t]
            m = row_max_f32(s_bits[r, t], n, acc) * scale  # exact, through the int32 view (vectorises)
            for j in range(n):
                pr[j] = expf32(sr[j] * scale - m)  # scale * s rounded as the reference rounds it
            _normalised_row(acc, pr, n)


def _softmax_rows_f64_loop(s, scale, i0, start, p):
    """float64 twin of ``_softmax_rows_f32_loop`` with libm's exp."""
    R, Tb, L = s.shape
    for r in prange(R):
        acc = np.empty(LANES, np.float64)
        for t in range(Tb):
            row = i0 + t
            n = start + row + 1
            pr, sr = p[r, row], s[r, t]
            m = _scaled_row(sr, pr, scale, n)
            for j in range(n):
                pr[j] = math.exp(pr[j] - m)
            _normalised_row(acc, pr, n)


def _softmax_backward_rows_loop(p, dp, i0, start, ds):
    """dp (R, Tb, L) = dout v^T of query rows i0..; ds (R, T, S): rows i0.. written on keys < L,
    ds = p (dp - sum_j dp p) on the visible keys, 0 on the masked ones."""
    R, Tb, L = dp.shape
    for r in prange(R):
        acc = np.empty(LANES, p.dtype)
        for t in range(Tb):
            row = i0 + t
            n = start + row + 1
            pr, dpr, dsr = p[r, row], dp[r, t], ds[r, row]
            dot = dot_total(acc, dpr, pr, n)  # sum_j dp p, 16 lanes
            for j in range(n):
                dsr[j] = pr[j] * (dpr[j] - dot)
            dsr[n:L] = 0


softmax_rows_f32_numba = njit(cache=True, nogil=True, parallel=True)(_softmax_rows_f32_loop)
softmax_rows_f64_numba = njit(cache=True, nogil=True, parallel=True)(_softmax_rows_f64_loop)
softmax_backward_rows_numba = njit(cache=True, nogil=True, parallel=True)(_softmax_backward_rows_loop)


def query_blocks(T: int, start: int) -> list:
    """[(i0, i1, L)]: query rows i0..i1-1 and the keys they see, j < L = start + i1."""
    return [(i0, min(T, i0 + QUERY_BLOCK), start + min(T, i0 + QUERY_BLOCK)) for i0 in range(0, T, QUERY_BLOCK)]


def head_chunks(B: int, H: int) -> list:
    """[(b, h0, h1)]: batch row b, heads h0..h1-1, HEADS_PER_CHUNK heads at a time."""
    return [(b, h0, min(H, h0 + HEADS_PER_CHUNK)) for b in range(B) for h0 in range(0, H, HEADS_PER_CHUNK)]


def key_blocks(T: int, start: int) -> list:
    """[(j0, j1, t0)]: keys j0..j1-1 and the first query that sees them, t0 = max(0, j0 - start)."""
    cached = [(0, start, 0)] if start else []
    return cached + [(start + i0, start + i1, i0) for i0, i1, _ in query_blocks(T, start)]


def _dense(a):
    """``a`` as BLAS can read it in every product: as it is when its last axis has unit stride
    (numpy hands such a matrix, a head's (T, D) rows of a permuted (B, T, H, D) view or
    decoding's broadcast latent key, to BLAS with its row stride, no copy), else one
    C-contiguous copy, made once instead of once per block inside every product."""
    return a if a.strides[-1] == a.itemsize or a.shape[-1] <= 1 else np.ascontiguousarray(a)


def _transposed(a, rows):
    """``a`` (..., S, D), one chunk's keys or values -> its (..., D, S) transpose for the
    ``x @ a^T`` products, made per (batch row, head chunk) just before its products read it.

    OpenBLAS's kernels for a product whose right operand is transposed (``q k^T``, ``dout v^T``)
    run these small shapes (64 x 48 x L) at about half the rate of the plain layout (measured
    on the SkylakeX kernels: 4 heads of 64 x 48 x 128, 30 against 16 us). With ``rows`` >=
    ``TRANSPOSE_FROM_ROWS`` query rows every element of the copy is read by that many rows, so
    one C-contiguous copy of the transpose pays for itself; with fewer (decoding: 1 row, or a
    few drafted tokens) the copy would cost as much as the product, and the view is used."""
    aT = np.swapaxes(a, -1, -2)
    return np.ascontiguousarray(aT) if rows >= TRANSPOSE_FROM_ROWS else aT


def _heads_last_empty(B, H, T, D, dt):
    """An uninitialised (B, H, T, D) array stored as (B, T, H, D): the layout MLA reads and writes
    per token ((B, T, H * D) rows), so its permutes to and from that layout copy nothing or copy
    contiguous pieces. BLAS writes each head's (T, D) block with its row stride H * D."""
    return np.swapaxes(np.empty((B, T, H, D), dt), 1, 2)


def causal_attention(q, k, v, scale, start):
    """Kernel twin of ``causal_attention_ref``: q (B,H,T,Dq), k (B,H,S,Dq), v (B,H,S,Dv) -> (o, p)."""
    check_causal_attention(q, k, v, start)
    q, k, v = _dense(q), _dense(k), _dense(v)
    B, H, T, _ = q.shape
    S, dt = start + T, q.dtype
    p = np.empty((B, H, T, S), dt)
    # o is stored (B, T, H, Dv) and returned as its (B, H, T, Dv) view: MLA's next step reads it
    # as (B, T, H * Dv), so that permute is then free. Every row is written below (0 when no key exists).
    o = _heads_last_empty(B, H, T, v.shape[-1], dt)
    softmax_rows = softmax_rows_f32_numba if dt == np.float32 else softmax_rows_f64_numba
    if not p.size:
        o[...] = 0
    else:
        for b, h0, h1 in head_chunks(B, H):  # a few heads at a time: their logits stay in cache
            kT = _transposed(k[b, h0:h1], T)  # the chunk's k^T, made while it is in cache
            for i0, i1, L in query_blocks(T, start):
                s = q[b, h0:h1, i0:i1] @ kT[:, :, :L]  # raw logits (h1 - h0, i1 - i0, L)
                softmax_rows(s, dt.type(scale), np.int64(i0), np.int64(start), p[b, h0:h1])
                np.matmul(p[b, h0:h1, i0:i1, :L], v[b, h0:h1, :L], out=o[b, h0:h1, i0:i1])
    return o, p


def _scratch(buf, shape):
    """A C-contiguous (shape) view of the first elements of the flat buffer ``buf`` (reused by
    every block, so it stays in cache; a slice of a bigger 3-d buffer would not be C-contiguous,
    and the Numba row loops would compile for, and run at the speed of, strided arrays)."""
    return buf[: math.prod(shape)].reshape(shape)


def causal_attention_backward(dout, q, k, v, p, scale, start):
    """Kernel twin of ``causal_attention_backward_ref`` -> (dq, dk, dv).

    One (batch row, head chunk) at a time: its query blocks write ``ds`` into a scratch of the
    chunk's (heads, T, S) that every chunk reuses, then its key blocks read that ``ds`` and the
    chunk's rows of ``p`` while both are still in the core's cache. No (B, H, T, S) ``ds`` is
    formed, and ``p`` is read from memory once. Each product is the one a whole-batch loop would
    take (same operands, same shapes), so the order of the chunks changes no result bit."""
    check_causal_attention_backward(dout, q, k, v, p, start)
    dout, q, k, v = _dense(dout), _dense(q), _dense(k), _dense(v)
    B, H, T, Dq = q.shape
    S, dt = start + T, q.dtype
    p = np.ascontiguousarray(p)
    # stored (B, T|S, H, D) like o, returned as (B, H, T|S, D) views: MLA gathers them per token
    dq = _heads_last_empty(B, H, T, Dq, dt)  # the query blocks cover every row of dq,
    dk = _heads_last_empty(B, H, S, Dq, dt)  # the key blocks every row of dk and dv
    dv = _heads_last_empty(B, H, S, v.shape[-1], dt)
    if not p.size:
        for a in (dq, dk, dv):
            a[...] = 0
        return dq, dk, dv
    chunk = min(H, HEADS_PER_CHUNK)
    ds_buf = np.empty(chunk * T * S, dt)  # one chunk's ds (heads, T, S)
    dp_buf = np.empty(chunk * min(T, QUERY_BLOCK) * S, dt)  # one query block's dp (heads, rows, L)
    for b, h0, h1 in head_chunks(B, H):
        ds = _scratch(ds_buf, (h1 - h0, T, S))
        vT = _transposed(v[b, h0:h1], T)  # the chunk's v^T, made while it is in cache
        for i0, i1, L in query_blocks(T, start):
            dp = np.matmul(dout[b, h0:h1, i0:i1], vT[:, :, :L], out=_scratch(dp_buf, (h1 - h0, i1 - i0, L)))
            softmax_backward_rows_numba(p[b, h0:h1], dp, np.int64(i0), np.int64(start), ds)
            np.matmul(ds[:, i0:i1, :L], k[b, h0:h1, :L], out=dq[b, h0:h1, i0:i1])
        for j0, j1, t0 in key_blocks(T, start):
            np.matmul(np.swapaxes(p[b, h0:h1, t0:, j0:j1], -1, -2), dout[b, h0:h1, t0:], out=dv[b, h0:h1, j0:j1])
            np.matmul(np.swapaxes(ds[:, t0:, j0:j1], -1, -2), q[b, h0:h1, t0:], out=dk[b, h0:h1, j0:j1])
    dq *= dt.type(scale)
    dk *= dt.type(scale)
    return dq, dk, dv


KERNELS: dict = {"causal_attention": causal_attention, "causal_attention_backward": causal_attention_backward}
