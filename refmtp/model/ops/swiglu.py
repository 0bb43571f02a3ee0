"""SwiGLU feed-forward: ``y = down( silu(gate(x)) * up(x) )`` (DeepSeek w2(silu(w1 x) * w3 x))."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from refmtp.backends import backend_of
from refmtp.mutation import on
from refmtp.precision import rounded


@dataclass(frozen=True, slots=True)
class SwiGLUCache:
    x: Any  # (N, d) input
    a: Any  # (N, I) gate pre-activation x Wg^T
    b: Any  # (N, I) up projection x Wu^T
    sig: Any  # (N, I) sigmoid(a), shared by silu and its derivative
    h: Any  # (N, I) silu(a) * b, input of down_proj
    gate_proj: Any  # (I, d)
    up_proj: Any  # (I, d)
    down_proj: Any  # (d, I)


class SwiGLUGrads(NamedTuple):
    dx: Any  # (N, d)
    dgate_proj: Any  # (I, d)
    dup_proj: Any  # (I, d)
    ddown_proj: Any  # (d, I)


def swiglu_forward(x, gate_proj, up_proj, down_proj):
    """x (..., d); gate_proj/up_proj (I, d); down_proj (d, I) -> (..., d)."""
    xp = backend_of(x, gate_proj, up_proj, down_proj).xp
    d = x.shape[-1]
    if gate_proj.shape[1] != d or up_proj.shape != gate_proj.shape or down_proj.shape != (d, gate_proj.shape[0]):
        raise ValueError(
            f"swiglu: shapes do not fit: x (..., {d}), gate {tuple(gate_proj.shape)}, "
            f"up {tuple(up_proj.shape)}, down {tuple(down_proj.shape)}"
        )
    x2 = xp.reshape(x, (-1, d))  # (N, d)
    a = rounded(x2 @ gate_proj.T)  # (N, I)
    b = rounded(x2 @ up_proj.T)  # (N, I)
    if on("experts.silu_on_up"):
        a, b = b, a
    sig = 1.0 / (1.0 + xp.exp(-a))
    h = rounded(a * sig * b)  # silu(a) * b
    y = rounded(h @ down_proj.T)  # (N, d)
    cache = SwiGLUCache(x=x2, a=a, b=b, sig=sig, h=h, gate_proj=gate_proj, up_proj=up_proj,
                        down_proj=down_proj)
    return xp.reshape(y, x.shape), cache


def swiglu_backward(dout, cache: SwiGLUCache) -> SwiGLUGrads:
    """forward: ``h = silu(a) * b``, ``y = h Wd^T``; ``silu'(a) = sig * (1 + a (1 - sig))``.

        dWd = dout^T h;  dh = dout Wd
        db  = dh * silu(a);                 dWu = db^T x
        da  = dh * b * silu'(a);            dWg = da^T x
        dx  = da Wg + db Wu
    """
    xp = backend_of(dout).xp
    c = cache
    shape = dout.shape
    d2 = xp.reshape(dout, (-1, shape[-1]))  # (N, d)
    ddown = d2.T @ c.h  # (d, I)
    dh = d2 @ c.down_proj  # (N, I)
    db = dh * (c.a * c.sig)
    da = dh * c.b * (c.sig * (1.0 + c.a * (1.0 - c.sig)))
    dgate = da.T @ c.x
    dup = db.T @ c.x
    dx = rounded(da @ c.gate_proj + db @ c.up_proj)
    return SwiGLUGrads(dx=xp.reshape(dx, shape), dgate_proj=dgate, dup_proj=dup, ddown_proj=ddown)
