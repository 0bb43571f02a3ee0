"""The float64 central-difference gradient checker used by every op, layer and model test.

    report = check_grad(forward, backward, inputs, seed=0)

``forward(**inputs) -> (out, cache)`` and ``backward(dout, cache) -> {name: grad}`` are the
function under test and its hand-derived backward. The checker

1. refuses anything but float64 (finite differences in float32 are noise);
2. draws a random upstream gradient ``dout`` (never ones: the gradient of ``sum(softmax)`` is 0,
   so a ones-``dout`` test cannot fail);
3. differentiates the scalar ``L = sum(out * dout)`` by centred differences
   ``(L(x + h e_i) - L(x - h e_i)) / 2h`` for EVERY float input (all coordinates, or a random
   sample of ``max_coords`` per tensor);
4. compares with the analytic gradient by
   ``rel_i = |a_i - n_i| / max(|a_i| + |n_i|, 1e-3 * max_j |n_j|, 1e-12)``
   (the floor ignores coordinates a million times smaller than the tensor's largest gradient,
   which finite differences cannot resolve), and reports the worst coordinate per tensor.

Piecewise functions (MoE routing, top-k): pass ``selection(cache) -> array`` returning the
discrete choices made by the forward. If a perturbation changes them, :class:`SelectionFlip` is
raised ("selection changed under perturbation") instead of a false gradient error.

Inputs are copied; the caller's arrays are never modified.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refmtp.backends import backend_of


class SelectionFlip(AssertionError):
    """A finite-difference perturbation changed a discrete selection (e.g. routed experts)."""


class GradientMismatch(AssertionError):
    """Analytic and numeric gradients disagree beyond the tolerance."""


@dataclass(frozen=True)
class TensorReport:
    name: str
    max_rel_error: float
    worst_index: tuple
    analytic: float
    numeric: float
    n_checked: int

    def __str__(self):
        return (f"{self.name}: max rel err {self.max_rel_error:.2e} at {self.worst_index} "
                f"(analytic {self.analytic:.6e}, numeric {self.numeric:.6e}, "
                f"{self.n_checked} coords)")


def _flatten_out(out):
    if isinstance(out, dict):
        return [out[k] for k in sorted(out)]
    if isinstance(out, (tuple, list)):
        return list(out)
    return [out]


def _like_out(out, flat):
    if isinstance(out, dict):
        return dict(zip(sorted(out), flat))
    if isinstance(out, (tuple, list)):
        return type(out)(flat)
    return flat[0]


def check_grad(forward, backward, inputs: dict, *, seed: int = 0, h: float = 1e-5,
               tol: float = 1e-6, max_coords: int | None = None, selection=None,
               names=None, raise_on_fail: bool = True) -> dict[str, TensorReport]:
    """Check ``backward`` against centred differences of ``forward``; see the module docstring.

    ``names`` restricts the check to some inputs (default: every float input). Returns the
    per-tensor reports; raises GradientMismatch if any exceeds ``tol`` (unless told not to).
    """
    bk = backend_of(*[v for v in inputs.values() if hasattr(v, "shape")])
    xp = bk.xp
    work = {}
    for k, v in inputs.items():
        if hasattr(v, "dtype") and v.dtype in (xp.float32, xp.float16):
            raise TypeError(
                f"check_grad: input {k!r} is {v.dtype}; gradient checks need float64 "
                "(finite differences in float32 are noise)"
            )
        work[k] = xp.asarray(v, copy=True) if hasattr(v, "shape") else v
    if names is None:
        names = [k for k, v in work.items() if hasattr(v, "dtype") and v.dtype == xp.float64]

    rng = np.random.default_rng(seed)
    out, cache = forward(**work)
    flat = _flatten_out(out)
    douts = [bk.asarray(rng.standard_normal(size=tuple(o.shape)), dtype="float64") for o in flat]
    dout = _like_out(out, douts)
    sel0 = None if selection is None else bk.to_numpy(selection(cache)).copy()
    grads = backward(dout, cache)

    def loss():
        o, c = forward(**work)
        if selection is not None:
            sel = bk.to_numpy(selection(c))
            if sel.shape != sel0.shape or not np.array_equal(sel, sel0):
                raise SelectionFlip(
                    "selection changed under perturbation: the gradient is undefined here; "
                    "use inputs with a larger score gap"
                )
        return float(sum(float(xp.sum(a * b)) for a, b in zip(_flatten_out(o), douts)))

    reports = {}
    failures = []
    for name in names:
        if name not in grads:
            raise GradientMismatch(f"backward returned no gradient for input {name!r}")
        x = work[name]
        a = bk.to_numpy(grads[name])
        if a.shape != tuple(x.shape):
            raise GradientMismatch(
                f"gradient of {name!r} has shape {a.shape}, input has {tuple(x.shape)}"
            )
        size = int(np.prod(x.shape)) if x.shape else 1
        if max_coords is not None and size > max_coords:
            coords = rng.choice(size, size=max_coords, replace=False)
        else:
            coords = np.arange(size)
        flat_x = xp.reshape(x, (-1,))  # a view: perturbing it perturbs work[name]
        numeric = np.zeros(len(coords))
        for j, c in enumerate(coords):
            c = int(c)
            old = float(flat_x[c])
            try:
                flat_x[c] = old + h
                lp = loss()
                flat_x[c] = old - h
                lm = loss()
            finally:
                flat_x[c] = old
            numeric[j] = (lp - lm) / (2 * h)
        analytic = a.reshape(-1)[coords]
        scale = max(float(np.max(np.abs(numeric))) if len(coords) else 0.0, 0.0)
        denom = np.maximum(np.abs(analytic) + np.abs(numeric), max(1e-3 * scale, 1e-12))
        rel = np.abs(analytic - numeric) / denom
        w = int(np.argmax(rel)) if len(rel) else 0
        worst = tuple(int(i) for i in np.unravel_index(int(coords[w]), x.shape)) if len(rel) else ()
        rep = TensorReport(name, float(rel[w]) if len(rel) else 0.0, worst,
                           float(analytic[w]) if len(rel) else 0.0,
                           float(numeric[w]) if len(rel) else 0.0, len(coords))
        reports[name] = rep
        if rep.max_rel_error > tol:
            failures.append(str(rep))
    if failures and raise_on_fail:
        raise GradientMismatch("gradient check failed:\n  " + "\n  ".join(failures))
    return reports
