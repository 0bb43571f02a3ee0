"""Token embedding: a plain lookup ``h = E[ids]`` (no sqrt(d) scaling; docs/deepseek-v3.md §1)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from refmtp.backends import backend_of
from refmtp.precision import rounded


@dataclass(frozen=True, slots=True)
class EmbeddingCache:
    ids: Any  # (B, T) int64 token ids, kept to route the gradient back to rows of E
    vocab_size: int  # V, rows of E
    dtype: Any  # dtype of E


class EmbeddingGrads(NamedTuple):
    dweight: Any  # (V, d)


def embedding_forward(ids, weight):
    """``out[b, t] = weight[ids[b, t]]``.   ids (B, T) int, weight (V, d) -> (B, T, d)."""
    xp = backend_of(ids, weight).xp
    V = weight.shape[0]
    if ids.size and (int(xp.min(ids)) < 0 or int(xp.max(ids)) >= V):
        raise ValueError(
            f"embedding: token ids must be in [0, {V}); got min {int(xp.min(ids))}, "
            f"max {int(xp.max(ids))}"
        )
    out = xp.take(weight, xp.reshape(ids, (-1,)), axis=0)  # (B*T, d)
    out = xp.reshape(out, tuple(ids.shape) + (weight.shape[1],))  # (B, T, d)
    return rounded(out), EmbeddingCache(ids=ids, vocab_size=V, dtype=weight.dtype)


def embedding_backward(dout, cache: EmbeddingCache) -> EmbeddingGrads:
    """forward: ``out[b,t] = E[ids[b,t]]``  ->  ``dE[v] = sum over (b,t) with ids[b,t]=v of dout[b,t]``.

    Repeated ids must be summed, hence scatter-add (never ``dE[ids] += dout``).
    """
    bk = backend_of(dout)
    d = dout.shape[-1]
    dweight = bk.xp.zeros((cache.vocab_size, d), dtype=cache.dtype)
    bk.scatter_add(dweight, bk.xp.reshape(cache.ids, (-1,)), bk.xp.reshape(dout, (-1, d)))
    return EmbeddingGrads(dweight=dweight)
