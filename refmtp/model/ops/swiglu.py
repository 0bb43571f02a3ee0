"""SwiGLU feed-forward: ``y = down( silu(gate(x)) * up(x) )`` (DeepSeek w2(silu(w1 x) * w3 x)).

Gate and up projections are one GEMM when the rows outnumber the 2I weight rows (training):
``[a | b] = x [Wg; Wu]^T`` (N, 2I), one wider product instead of two narrow ones; with few rows
(decoding) the two products are taken apart, since copying the weights into ``[Wg; Wu]`` would
cost more than the product itself. The backward keeps ``[da | db]`` side by
side for the same reason (``[dWg; dWu] = [da | db]^T x``, ``dx = [da | db] [Wg; Wu]``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from refmtp.backends import backend_of
from refmtp.mutation import on
from refmtp.precision import rounded


def swiglu_gate_ref(ab):
    """ab = [a | b] (N, 2I) -> (sig, h), both (N, I): ``sig = sigmoid(a)``, ``h = silu(a) * b``.

    Kernel: ``swiglu_gate`` (backends/numba_swiglu.py).
    """
    xp = backend_of(ab).xp
    I = ab.shape[-1] // 2
    a, b = ab[:, :I], ab[:, I:]
    sig = 1.0 / (1.0 + xp.exp(-a))  # shared by silu and its derivative
    return sig, a * sig * b  # silu(a) * b


def swiglu_gate_backward_ref(dh, ab, sig):
    """dh (N, I), ab = [a | b] (N, 2I), sig (N, I) -> [da | db] (N, 2I).

        db = dh * silu(a),   da = dh * b * silu'(a),   silu'(a) = sig * (1 + a (1 - sig))

    Kernel: ``swiglu_gate_backward`` (backends/numba_swiglu.py).
    """
    xp = backend_of(dh, ab, sig).xp
    I = ab.shape[-1] // 2
    a, b = ab[:, :I], ab[:, I:]
    db = dh * (a * sig)
    da = dh * b * (sig * (1.0 + a * (1.0 - sig)))
    return xp.concat([da, db], axis=-1)


@dataclass(frozen=True, slots=True)
class SwiGLUCache:
    x: Any  # (N, d) input
    ab: Any  # (N, 2I) [gate pre-activation a | up projection b] = x [Wg; Wu]^T
    sig: Any  # (N, I) sigmoid(a), shared by silu and its derivative
    h: Any  # (N, I) silu(a) * b, input of down_proj
    gate_up: Any  # (2I, d) [Wg; Wu], or None when the forward took two products (few rows)
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
    bk = backend_of(x, gate_proj, up_proj, down_proj)
    xp = bk.xp
    d = x.shape[-1]
    if gate_proj.shape[1] != d or up_proj.shape != gate_proj.shape or down_proj.shape != (d, gate_proj.shape[0]):
        raise ValueError(
            f"swiglu: shapes do not fit: x (..., {d}), gate {tuple(gate_proj.shape)}, "
            f"up {tuple(up_proj.shape)}, down {tuple(down_proj.shape)}"
        )
    x2 = xp.reshape(x, (-1, d))  # (N, d)
    I = gate_proj.shape[0]
    if x2.shape[0] >= 2 * I:  # many rows (training): one wider product beats copying the weights
        gate_up = xp.concat([gate_proj, up_proj], axis=0)  # (2I, d)
        ab = rounded(x2 @ gate_up.T)  # (N, 2I) = [x Wg^T | x Wu^T]
    else:  # few rows (decoding): the weight copy would cost more than a second product
        gate_up = None
        ab = rounded(xp.concat([x2 @ gate_proj.T, x2 @ up_proj.T], axis=-1))  # (N, 2I)
    if on("experts.silu_on_up"):
        ab = xp.concat([ab[:, I:], ab[:, :I]], axis=-1)
    sig, h = (bk.kernel("swiglu_gate") or swiglu_gate_ref)(ab)  # (N, I) each
    h = rounded(h)
    y = rounded(h @ down_proj.T)  # (N, d)
    cache = SwiGLUCache(x=x2, ab=ab, sig=sig, h=h, gate_up=gate_up, gate_proj=gate_proj, up_proj=up_proj,
                         down_proj=down_proj)
    return xp.reshape(y, x.shape), cache


def swiglu_backward(dout, cache: SwiGLUCache) -> SwiGLUGrads:
    """forward: ``h = silu(a) * b``, ``y = h Wd^T``; ``silu'(a) = sig * (1 + a (1 - sig))``.

        dWd = dout^T h;  dh = dout Wd
        db  = dh * silu(a);                 dWu = db^T x
        da  = dh * b * silu'(a);            dWg = da^T x
        dx  = da Wg + db Wu = [da | db] [Wg; Wu]
    """
    bk = backend_of(dout)
    xp = bk.xp
    c = cache
    shape = dout.shape
    I = c.h.shape[-1]
    d2 = xp.reshape(dout, (-1, shape[-1]))  # (N, d)
    ddown = d2.T @ c.h  # (d, I)
    dh = d2 @ c.down_proj  # (N, I)
    dab = (bk.kernel("swiglu_gate_backward") or swiglu_gate_backward_ref)(dh, c.ab, c.sig)  # (N, 2I)
    dgate_up = dab.T @ c.x  # (2I, d) = [dWg; dWu]
    dgate, dup = dgate_up[:I, :], dgate_up[I:, :]
    gate_up = c.gate_up if c.gate_up is not None else xp.concat([c.gate_proj, c.up_proj], axis=0)
    dx = rounded(dab @ gate_up)  # (N, d)
    return SwiGLUGrads(dx=xp.reshape(dx, shape), dgate_proj=dgate, dup_proj=dup, ddown_proj=ddown)
