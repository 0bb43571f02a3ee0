"""RMSNorm: ``y = w * x / sqrt(mean(x^2) + eps)`` over the last axis; no bias, no centring."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from refmtp.backends import backend_of
from refmtp.precision import rounded


@dataclass(frozen=True, slots=True)
class RMSNormCache:
    x: Any  # (..., d) input
    weight: Any  # (d,)
    rstd: Any  # (..., 1) 1/sqrt(mean(x^2)+eps): cheap to keep, saves a reduction in backward


class RMSNormGrads(NamedTuple):
    dx: Any  # (..., d)
    dweight: Any  # (d,)


def rmsnorm_forward(x, weight, eps: float):
    """``y = w * x * rstd``, ``rstd = (mean(x^2, -1) + eps)^(-1/2)``.   x (..., d) -> (..., d)."""
    xp = backend_of(x, weight).xp
    if x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rmsnorm: input has {x.shape[-1]} features, weight has {weight.shape[0]}")
    rstd = 1.0 / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + eps)  # (..., 1)
    return rounded(weight * (x * rstd)), RMSNormCache(x=x, weight=weight, rstd=rstd)


def rmsnorm_backward(dout, cache: RMSNormCache) -> RMSNormGrads:
    """With ``r = rstd``, ``n = x * r`` and ``g = dout * w``:

        dx = r * (g - n * mean(g * n, -1))          (= g/r' - x * sum(g x) / (d r'^3), r' = 1/r)
        dw = sum over rows of dout * n
    """
    xp = backend_of(dout).xp
    x, w, r = cache.x, cache.weight, cache.rstd
    n = x * r  # (..., d) normalised input
    g = dout * w  # (..., d)
    dx = rounded(r * (g - n * xp.mean(g * n, axis=-1, keepdims=True)))
    dweight = xp.sum(xp.reshape(dout * n, (-1, x.shape[-1])), axis=0)
    return RMSNormGrads(dx=dx, dweight=dweight)
