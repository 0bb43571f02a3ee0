"""Reduced-precision emulation: off unless a caller enters :func:`emulate` (docs/precision.md).

While ``with emulate("bf16"):`` (or ``"fp16"``, ``"fp32"``) is active, the ops round their
results to that dtype where inference engines do, computing everything else in float32::

    params = round_weights(params32, "bf16")    # weights stored in the reduced dtype
    with emulate("bf16"):
        out, cache = forward(params, cfg, tokens)   # float32 math, activations rounded between ops

Where rounding happens (each a one-line ``rounded(...)`` call in the op):

* weights: every matrix and RMSNorm weight (:func:`round_weights`); the float32
  ``e_score_correction_bias`` stays float32, as in the released checkpoint;
* forward outputs of ``linear_forward`` (so every projection, the MTP ``eh_proj`` and
  ``lm_head``: the logits), ``rmsnorm_forward``, ``embedding_forward``, ``attention_forward``
  (after ``p @ v``; scores and softmax stay float32), ``swiglu_forward`` (the gate and up
  projections, ``silu(a) * b`` and the down projection) and the decoder block's two residual
  sums;
* backward: the activation gradients ``dx`` of linear, RMSNorm and SwiGLU and ``dq, dk, dv``
  of attention; weight gradients stay float32 (fp32 gradient accumulation).

Matmuls take reduced-precision values held in float32 arrays, so they accumulate in float32.
Not rounded: the router (float32 affinities, as HF and the engines compute it), RoPE, the
losses, the balance terms. When no emulation is active :func:`rounded` returns its argument
itself (one set test), so refmtp's numbers do not move.

The rounding goes through host arrays (``bk.to_numpy``): numpy's float16, and
``ml_dtypes.bfloat16`` for bf16 (the optional ``precision`` extra; asking for bf16 without it is
a one-line ValueError). Round-to-nearest-even in every case.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np  # host-side only: the rounding of host copies

from refmtp.backends import backend_of, set_kernels_enabled
from refmtp.params import is_bias

try:  # optional: only the bf16 emulation needs it (pip install "refmtp[precision]")
    import ml_dtypes
except ImportError:  # pragma: no cover - exercised only without the extra
    ml_dtypes = None

PRECISIONS = ("bf16", "fp16", "fp32")
UNIT_ROUNDOFF = {"bf16": 2.0 ** -8, "fp16": 2.0 ** -11, "fp32": 2.0 ** -24}

_ACTIVE: set[str] = set()  # at most one precision at a time


def check_precision(name) -> str:
    """The precision name, or a one-line ValueError naming the choices."""
    if name not in PRECISIONS:
        raise ValueError(f"precision {name!r}: choose one of {', '.join(PRECISIONS)}")
    if name == "bf16" and ml_dtypes is None:
        raise ValueError("bf16 emulation needs ml_dtypes: pip install \"refmtp[precision]\"")
    return name


def _host_dtype(name: str):
    return {"bf16": ml_dtypes.bfloat16 if ml_dtypes is not None else None,
            "fp16": np.float16, "fp32": np.float32}[name]


def round_to(x, name: str):
    """``x`` rounded to precision ``name`` (nearest even), on its own backend and in its own
    dtype (float32 arrays stay float32, holding reduced-precision values)."""
    bk = backend_of(x)
    h = np.asarray(bk.to_numpy(x))
    r = h.astype(np.float32).astype(_host_dtype(name)).astype(h.dtype)
    return bk.asarray(r, dtype=str(h.dtype))


def rounded(x):
    """Identity unless :func:`emulate` is active; then ``x`` rounded to the active precision."""
    if not _ACTIVE:
        return x
    (name,) = _ACTIVE
    return round_to(x, name)


def round_weights(params: dict, name: str) -> dict:
    """A copy of ``params`` with every matrix and norm weight rounded to ``name`` (the weights
    an engine stores in bf16 / fp16); the float32 e_score_correction_bias is kept as it is."""
    check_precision(name)
    return {n: (v if is_bias(n) else round_to(v, name)) for n, v in params.items()}


@contextmanager
def emulate(name: str):
    """Round the ops' results to ``name`` (bf16, fp16 or fp32) for the duration of the block."""
    check_precision(name)
    if _ACTIVE:
        raise ValueError(f"emulation of {next(iter(_ACTIVE))} is already active: nest none")
    _ACTIVE.add(name)
    # the rounding points are in the plain array path: fused kernels would skip them
    kernels = set_kernels_enabled(False)
    try:
        yield
    finally:
        _ACTIVE.clear()
        set_kernels_enabled(kernels)


def active():
    """The precision being emulated now, or None (normal use)."""
    return next(iter(_ACTIVE), None)
