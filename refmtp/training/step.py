"""The one training step: forward -> backward -> clip -> AdamW -> expert-bias update.

    result = train_step(params, cfg, tokens, opt, lr, grad_clip)   # params updated in place
    result.losses, result.grad_norm, result.out.load

Every caller takes its steps through :func:`train_step`: the trainer (refmtp.training.trainer),
the golden trajectory case (refmtp.verification.golden.cases) and the training benchmarks. In
order (docs/training.md)::

    out, cache = forward(params, cfg, tokens)        # losses: main, mtp.k, balance, total
    grads = backward(cache)                          # d total / d param
    grads = clip(grads, grad_clip)                   # global-norm clipping; the norm before it is kept
    opt.step(params, grads, lr)                      # AdamW
    update_expert_bias(params, out.load, gamma)      # aux-loss-free balancing (V3 section 2.1.2)

A non-finite loss term or gradient raises :class:`NonFinite` before anything is updated, so the
parameters are those of the last good step. ``commit`` is a context manager around the two
updates (the trainer defers Ctrl-C there); ``mark(phase)`` is called after "forward",
"backward" and "update" (benchmarks time the phases with it); ``on_forward(out, cache)`` sees
the forward's results before the backward (the golden trajectory reads routing margins there).
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

from refmtp.model import backward, forward, update_expert_bias
from refmtp.training.optim import clip_grads, first_nonfinite, global_grad_norm

LOSS_ORDER = ("main", "mtp", "balance", "total")  # order in which non-finite terms are named


class NonFinite(ArithmeticError):
    """A loss term, a gradient or a parameter is not finite; the message names which."""


@dataclass(frozen=True)
class StepResult:
    out: Any  # ModelOutput of the forward (losses as arrays, load, routing, logits)
    losses: dict  # {term: host float} of the forward, before the update
    grad_norm: float  # global gradient norm BEFORE clipping


def _loss_rank(name: str):
    head = name.split(".")[0]
    return (LOSS_ORDER.index(head) if head in LOSS_ORDER else len(LOSS_ORDER), name)


def train_step(params: dict, cfg, tokens, opt, lr: float, grad_clip: float, *,
               commit: Callable = nullcontext, mark: Callable | None = None,
               on_forward: Callable | None = None) -> StepResult:
    """Take one update of ``params`` (in place) on ``tokens`` (B, T+1); see the module docstring."""
    try:
        out, cache = forward(params, cfg, tokens)
    except ValueError as exc:  # inputs are validated by the caller: this is overflow (e.g. NaN router scores)
        bad = first_nonfinite(params)
        raise NonFinite(f"parameter {bad!r} is not finite ({exc})" if bad
                        else f"the forward pass failed ({exc})") from None
    losses = {k: float(v) for k, v in out.losses.items()}  # one host read per term
    for name in sorted(losses, key=_loss_rank):
        if not math.isfinite(losses[name]):
            raise NonFinite(f"loss term {name!r} is {losses[name]} (not finite)")
    if on_forward is not None:
        on_forward(out, cache)
    if mark is not None:
        mark("forward")
    grads = backward(cache)
    del cache
    if mark is not None:
        mark("backward")
    norm = global_grad_norm(grads)
    if not math.isfinite(norm):
        raise NonFinite(f"gradient of {first_nonfinite(grads)!r} is not finite (grad norm {norm})")
    grads, norm = clip_grads(grads, grad_clip, norm)
    with commit():
        opt.step(params, grads, lr)
        update_expert_bias(params, out.load, cfg.refmtp.bias_update_gamma)
    if mark is not None:
        mark("update")
    return StepResult(out=out, losses=losses, grad_norm=norm)
