"""Linear layer without bias: ``y = x @ W.T`` with ``W`` stored ``[out_features, in_features]``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from refmtp.backends import backend_of
from refmtp.precision import rounded


@dataclass(frozen=True, slots=True)
class LinearCache:
    x: Any  # (..., in) input, needed for dW
    weight: Any  # (out, in), needed for dx


class LinearGrads(NamedTuple):
    dx: Any  # (..., in)
    dweight: Any  # (out, in)


def linear_forward(x, weight):
    """``y = x @ W.T``.   x (..., in), W (out, in) -> (..., out)."""
    xp = backend_of(x, weight).xp  # refuse mixed backends
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear: input has {x.shape[-1]} features but weight is {tuple(weight.shape)} "
            "([out, in])"
        )
    if x.ndim > 2 and x.shape[0] > 1:  # (B, T, in), B > 1: one 2-D product, not one per leading index
        x2 = xp.reshape(x, (-1, x.shape[-1]))  # (N, in)
        y = xp.reshape(x2 @ weight.T, (*x.shape[:-1], weight.shape[0]))  # (..., out)
    else:  # one matrix already (decoding: B = 1): no reshapes on the per-token path
        y = x @ weight.T
    return rounded(y), LinearCache(x=x, weight=weight)


def linear_backward(dout, cache: LinearCache) -> LinearGrads:
    """forward ``y = x W^T``  ->  ``dx = dout W``,  ``dW = sum over rows of dout^T x``."""
    xp = backend_of(dout).xp
    x, w = cache.x, cache.weight
    x2 = xp.reshape(x, (-1, x.shape[-1]))  # (N, in)
    d2 = xp.reshape(dout, (-1, dout.shape[-1]))  # (N, out)
    dx = rounded(xp.reshape(d2 @ w, x.shape))  # (N, out) @ (out, in) -> (..., in)
    dweight = d2.T @ x2  # (out, in)
    return LinearGrads(dx=dx, dweight=dweight)
