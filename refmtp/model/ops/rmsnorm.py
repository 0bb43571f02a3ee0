"""RMSNorm: ``y = w * x / sqrt(mean(x^2) + eps)`` over the last axis; no bias, no centring."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from refmtp.backends import backend_of
from refmtp.precision import rounded


def rmsnorm_rows_ref(x, weight, eps: float):
    """x (..., d), weight (d,) -> (y, rstd): ``rstd = (mean(x^2, -1) + eps)^(-1/2)`` (..., 1),
    ``y = w * (x * rstd)``. Kernel: ``rmsnorm_rows`` (backends/numba_rmsnorm.py)."""
    xp = backend_of(x, weight).xp
    rstd = 1.0 / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + eps)  # (..., 1)
    return weight * (x * rstd), rstd


def rmsnorm_rows_backward_ref(dout, x, weight, rstd):
    """With ``r = rstd``, ``n = x * r`` and ``g = dout * w`` -> (dx, dweight):

        dx = r * (g - n * mean(g * n, -1))          (= g/r' - x * sum(g x) / (d r'^3), r' = 1/r)
        dw = sum over rows of dout * n

    Kernel: ``rmsnorm_rows_backward`` (backends/numba_rmsnorm.py).
    """
    xp = backend_of(dout, x).xp
    n = x * rstd  # (..., d) normalised input
    g = dout * weight  # (..., d)
    dx = rstd * (g - n * xp.mean(g * n, axis=-1, keepdims=True))
    dweight = xp.sum(xp.reshape(dout * n, (-1, x.shape[-1])), axis=0)
    return dx, dweight


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
    bk = backend_of(x, weight)
    if x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rmsnorm: input has {x.shape[-1]} features, weight has {weight.shape[0]}")
    y, rstd = (bk.kernel("rmsnorm_rows") or rmsnorm_rows_ref)(x, weight, eps)
    return rounded(y), RMSNormCache(x=x, weight=weight, rstd=rstd)


def rmsnorm_backward(dout, cache: RMSNormCache) -> RMSNormGrads:
    """See :func:`rmsnorm_rows_backward_ref` for the equations."""
    bk = backend_of(dout)
    c = cache
    dx, dweight = (bk.kernel("rmsnorm_rows_backward") or rmsnorm_rows_backward_ref)(dout, c.x, c.weight, c.rstd)
    return RMSNormGrads(dx=rounded(dx), dweight=dweight)
