"""The audit's records: :class:`Step` and :class:`Check`, the :class:`Recorder` every auditor
adds its steps through, and the helpers that turn numbers into checks and shown values."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TOL = 1e-10  # identities in float64, relative to max(1, |reference|)


@dataclass
class Check:
    """One independent check of a step."""

    name: str  # what is checked, in words
    passed: bool
    detail: str  # the measured number(s) and the threshold


@dataclass
class Step:
    """One step of a component, in forward order."""

    component: str
    index: int  # 1-based within the component
    title: str
    ref: str  # "eq. 8" / "docs/deepseek-v3.md §3.2 step 4"
    formula: str  # plain text
    shapes: dict  # name -> list of ints
    values: dict  # name -> a few numbers at (b, i)
    checks: list  # Check records

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)


class Recorder:
    """One component's steps in forward order: every auditor records through :meth:`add`."""

    def __init__(self, component: str):
        self.component = component
        self.steps = []

    def add(self, title, ref, formula, shapes, values, checks) -> None:
        """Append the next step (numbered from 1 within the component)."""
        self.steps.append(Step(self.component, len(self.steps) + 1, title, ref, formula, shapes, values,
                               checks))


def num(x):
    """A JSON-safe float (4 significant digits kept by the renderers), or a string for inf/nan."""
    x = float(x)
    if math.isfinite(x):
        return float(f"{x:.6g}")
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def few(a, n: int = 4) -> list:
    """The first ``n`` entries of ``a`` (flattened), JSON-safe."""
    a = np.asarray(a).reshape(-1)
    return [num(v) for v in a[:n]]


def shape(a) -> list:
    """``a.shape`` as a list of ints."""
    return [int(s) for s in a.shape]


def maxdiff(got, want) -> float:
    """max |got - want| (equal infinities count as 0; inf when the shapes differ)."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return math.inf
    same = (got == want)  # equal infinities count as 0
    with np.errstate(invalid="ignore"):
        d = np.where(same, 0.0, np.abs(got - want))
    return float(np.max(d)) if d.size else 0.0


def close(name, got, want, tol=TOL, what="max |diff|") -> Check:
    """got == want up to ``tol * max(1, max|want|)`` (shapes must agree)."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return Check(name, False, f"shape {got.shape} != expected {want.shape}")
    fin = want[np.isfinite(want)]
    scale = max(1.0, float(np.max(np.abs(fin))) if fin.size else 1.0)
    d = maxdiff(got, want)
    return Check(name, d <= tol * scale, f"{what} {d:.2e} (tol {tol * scale:.0e})")


def check(name, cond, detail) -> Check:
    """A check whose condition the caller computed."""
    return Check(name, bool(cond), detail)
