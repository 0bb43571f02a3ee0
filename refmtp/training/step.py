"""The one training step: forward -> backward -> clip -> AdamW -> expert-bias update.

    result = train_step(params, cfg, tokens, opt, lr, grad_clip)   # params updated in place
    result.losses, result.grad_norm, result.load
    train_step(..., grad_accum=2)                 # two microbatches of B/2 windows, summed in order
    train_step(..., grad_accum=2, workers=2)      # the same two, side by side on two threads (same bits)
    train_step(..., world=world)                  # under MPI: rank r computes its slice (data parallel)

Every caller takes its steps through :func:`train_step`: the trainer (refmtp.training.trainer),
the golden trajectory case (refmtp.verification.golden.cases) and the training benchmarks. In
order (docs/training.md)::

    out, cache = forward(params, cfg, tokens)        # losses: main, mtp.k, balance, total
    grads = backward(cache)                          # d total / d param
    scales = clip_scales(grads, grad_clip)           # global-norm clipping; the norm before it is kept
    opt.step(params, grads, lr, scales)              # AdamW on g * scale
    update_expert_bias(params, out.load, gamma)      # aux-loss-free balancing (V3 section 2.1.2)

Microbatches (docs/distributed.md): the batch of B windows is cut into M = world.size *
grad_accum equal slices, slice m = rows m*B/M .. (m+1)*B/M - 1; rank r computes slices
r*grad_accum .. (r+1)*grad_accum - 1. Each slice's backward is that of ``total / M`` (every
loss term is a mean over the slice's rows, or over its sequences, so the mean of the M slice
losses is the loss of the batch); the gradients are summed ``((g_0 + g_1) + g_2) + ...`` in slice
order on every rank, after an all-gather when there are several ranks, so a run on N ranks and
a single process with ``grad_accum=N`` take bit-identical steps. The reported losses are the
means of the slices' terms; the expert-bias update uses the summed (global) loads.

Workers (docs/performance.md): with ``workers=W`` a process runs its slices in waves of W, each
wave's forwards side by side on W threads, then its backwards; NumPy's BLAS calls and the Numba
kernels let go of the interpreter lock, so on a CPU the slices share the cores without a second
BLAS pool spinning beside the first (give BLAS cores / W threads). Each slice is computed exactly
as alone and the sums keep slice order, so any W takes the bits of ``workers=1``; a wave holds W
slices' caches at once (the memory of W/M of the batch). W is 1 under expert parallelism (its
exchanges run inside the forward, in order) and where the backend says side by side does not pay
(a GPU) or is unsafe (Numba's "workqueue" layer).

A non-finite loss term or gradient raises :class:`NonFinite` before anything is updated, so the
parameters are those of the last good step. ``commit`` is a context manager around the two
updates (the trainer defers Ctrl-C there); ``mark(phase)`` is called after "forward",
"backward" and "update" (benchmarks time the phases with it); ``on_forward(out, cache)`` sees
the forward's results before the backward (the golden trajectory reads routing margins there).
"""
from __future__ import annotations

import gc
import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np  # host copies of the loads exchanged between ranks

from refmtp.backends import backend_of
from refmtp.model import backward, forward, update_expert_bias
from refmtp.training.distributed import SINGLE, World, flatten, unflatten
from refmtp.training.expert_parallel import active as expert_parallel_active
from refmtp.training.expert_parallel import current as current_expert_shard
from refmtp.training.optim import clip_scales, first_nonfinite, global_grad_norm, sum_squares

LOSS_ORDER = ("main", "mtp", "balance", "total")  # order in which non-finite terms are named


class NonFinite(ArithmeticError):
    """A loss term, a gradient or a parameter is not finite; the message names which."""


@dataclass(frozen=True)
class StepResult:
    out: Any  # ModelOutput of this process's last microbatch forward (logits, routing, ...)
    losses: dict  # {term: host float} of the forward, before the update (mean over microbatches)
    grad_norm: float  # global gradient norm BEFORE clipping
    load: dict  # {MoE layer: (E,) int64} tokens routed to each expert, summed over the batch


def _loss_rank(name: str):
    head = name.split(".")[0]
    return (LOSS_ORDER.index(head) if head in LOSS_ORDER else len(LOSS_ORDER), name)


def check_microbatches(batch_size: int, n: int, what: str = "--grad-accum") -> int:
    """B / n windows per microbatch; ValueError (one line) when n does not divide B."""
    if n < 1 or batch_size % n:
        raise ValueError(f"{what} {n} must divide --batch-size {batch_size} (every microbatch "
                         "has the same number of windows)")
    return batch_size // n


@dataclass
class _Micro:
    error: str | None  # why the microbatch's forward is not usable (NonFinite message)
    losses: dict  # {term: host float}
    load: dict  # {layer: (E,) host int64}
    grads: dict | None  # backward of total / M, None after an error


def _forward(params, cfg, tokens, world) -> tuple[_Micro, Any, Any]:
    """One slice's forward -> (its _Micro without gradients, out, cache); on a failure the
    _Micro names it (and out/cache are what there is)."""
    try:
        out, cache = forward(params, cfg, tokens)
    except ValueError as exc:  # inputs are validated by the caller: this is overflow (e.g. NaN router scores)
        if expert_parallel_active():  # the other ranks wait inside this forward's exchanges
            world.abort(f"the forward pass failed ({exc})", 1)
        bad = first_nonfinite(params)
        return _Micro(f"parameter {bad!r} is not finite ({exc})" if bad
                      else f"the forward pass failed ({exc})", {}, {}, None), None, None
    losses = {k: float(v) for k, v in out.losses.items()}  # one host read per term
    for name in sorted(losses, key=_loss_rank):
        if not math.isfinite(losses[name]):
            return _Micro(f"loss term {name!r} is {losses[name]} (not finite)", losses, {}, None), out, None
    load = {layer: backend_of(c).to_numpy(c) for layer, c in out.load.items()}  # (E,) host
    return _Micro(None, losses, load, None), out, cache


def side_by_side_workers(workers: int, n_slices: int, bk, expert_parallel: bool) -> int:
    """How many of a process's ``n_slices`` microbatches ``workers`` runs side by side: at most
    ``n_slices``, and 1 under expert parallelism (its exchanges run inside each forward, in order)
    or where the backend says side by side does not pay or is unsafe."""
    if expert_parallel or not bk.concurrent_microbatches():
        return 1
    return max(1, min(workers, n_slices))


def _in_waves(slices: list, workers: int):
    """``slices`` in consecutive waves of ``workers`` (the last may be shorter)."""
    return [slices[i:i + workers] for i in range(0, len(slices), workers)]


def _each(fn, items: list, pool) -> list:
    """``[fn(x) for x in items]``, on the pool's threads when there is one (results in order)."""
    if pool is None or len(items) < 2:
        return [fn(x) for x in items]
    return list(pool.map(fn, items))


_POOLS: dict = {}


def _pool(workers: int, bk):
    """The step's thread pool for ``workers`` > 1 (made once per count; its threads ask the backend
    to set them up, e.g. Numba's thread count, which is per thread), else None."""
    if workers < 2:
        return None
    if workers not in _POOLS:
        _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="refmtp-micro",
                                             initializer=bk.prepare_worker_thread)
    return _POOLS[workers]


def _shared_out(pool, workers: int):
    """A drop-in for ``map`` that shares the items out among the pool's ``workers`` threads in
    ``workers`` consecutive runs (one task per thread; results in item order); the builtin
    ``map`` without a pool."""
    if pool is None:
        return map

    def mapped(fn, items):
        items = list(items)
        runs = _in_waves(items, max(1, -(-len(items) // workers)))  # `workers` runs of consecutive items
        results = _each(lambda run: [fn(x) for x in run], runs, pool)  # one list per run
        return [r for part in results for r in part]

    return mapped


def _summed(acc, new: dict, map=map) -> dict:  # noqa: A002 (the builtin's name: a drop-in for it)
    """``acc + new`` per tensor (``new`` alone first): THE order of the accumulation (``map``
    may run the tensors' sums side by side: each is the same operation)."""
    if acc is None:
        return dict(new)
    names = list(acc)
    return dict(zip(names, map(lambda name: acc[name] + new[name], names)))


@contextmanager
def _collector_paused():
    """Python's cyclic garbage collector off for the step, back on after (as it was).

    A step allocates tens of thousands of short-lived objects (caches, tuples, dicts), which
    trigger collections that walk every tracked object of the process (~2% of a small-preset
    step); they are freed by reference counting anyway, and any cycle waits for the next
    automatic collection after the step.
    """
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def _sharded_grad_norm(grads: dict, shard, world: World) -> tuple[float, str | None]:
    """The global gradient norm when each rank holds its own experts' gradients: every rank's
    terms ``sum g^2`` (refmtp.training.optim.sum_squares) added in the sorted order of all names,
    the order and so the bits of global_grad_norm on the whole model. Also the first name (that
    order) whose term is not finite."""
    parts = {n: sum_squares(g) for n, g in grads.items() if not shard.local(n)}
    own = {n: float(sum_squares(g)) for n, g in grads.items() if shard.local(n)}
    for terms in world.allgather(own, "the exchange of the experts' gradient norms"):
        parts.update(terms)
    total = None
    for name in sorted(parts):
        total = parts[name] if total is None else total + parts[name]
    bad = next((n for n in sorted(parts) if not math.isfinite(float(parts[n]))), None)
    return math.sqrt(float(total)), bad


@_collector_paused()  # the step frees its objects by reference counting
def train_step(params: dict, cfg, tokens, opt, lr: float, grad_clip: float, *,
               grad_accum: int = 1, workers: int = 1, world: World = SINGLE,
               commit: Callable = nullcontext, mark: Callable | None = None,
               on_forward: Callable | None = None) -> StepResult:
    """Take one update of ``params`` (in place) on ``tokens`` (B, T+1); see the module docstring.

    Under MPI every rank passes the same global batch and the same parameters; each computes
    its own slices and every rank takes the same update. ``workers`` only schedules this
    process's slices (side by side, in waves); it never changes a bit of the step."""
    n_micro = world.size * grad_accum
    bk = backend_of(tokens)
    bk.prepare_training()  # numpy: freed memory stays in the heap for the next step
    shard = current_expert_shard()  # expert parallel: this rank holds its own experts only
    b = check_microbatches(int(tokens.shape[0]), n_micro, "ranks x --grad-accum")
    mine = [tokens[m * b:(m + 1) * b] for m in range(world.rank * grad_accum, (world.rank + 1) * grad_accum)]
    workers = side_by_side_workers(workers, len(mine), bk, expert_parallel_active())
    pool = _pool(workers, bk)
    side_by_side = _shared_out(pool, workers)  # the gradient sums, shared out among the workers
    micros, out = [], None
    grads = None
    for wave in _in_waves(mine, workers):  # one wave = ``workers`` slices side by side
        fwd = _each(lambda t: _forward(params, cfg, t, world), wave, pool)
        todo = []  # (micro, cache) of the wave's slices up to its first failure, in slice order
        for mb, out_m, cache in fwd:
            out = out_m if out_m is not None else out
            micros.append(mb)
            if mb.error is not None:
                break
            if on_forward is not None:
                on_forward(out_m, cache)
            todo.append((mb, cache))
        del fwd
        if mark is not None and todo:
            mark("forward")
        gs = _each(lambda job: backward(job[1], {"total": 1.0 / n_micro}), todo, pool)  # d (total / M) / d params
        done = [mb for mb, _ in todo]
        del todo  # the caches
        for mb, g in zip(done, gs):
            if world.size == 1:  # accumulate at once, in slice order
                grads = _summed(grads, g, side_by_side)
            else:
                mb.grads = g
        del gs
        if mark is not None and micros[-1].error is None:
            mark("backward")
        if micros[-1].error is not None:
            break
    if world.size == 1:
        if micros[-1].error is not None:
            raise NonFinite(micros[-1].error)
        everyone = micros
    else:  # every rank learns every microbatch's losses, loads and errors, in slice order
        meta = world.allgather([(mb.error, mb.losses, mb.load) for mb in micros])
        everyone = [_Micro(e, lo, ld, None) for rank in meta for e, lo, ld in rank]
        for mb in everyone:
            if mb.error is not None:
                raise NonFinite(mb.error)  # the same message on every rank: nobody waits
        names = sorted(n for n in micros[0].grads if shard is None or not shard.local(n))
        rows = world.allgather_rows(np.stack([flatten(mb.grads, names) for mb in micros]))
        for row in rows:  # slice order 0 .. M-1
            grads = _summed(grads, unflatten(row, micros[0].grads, names, bk))
        if shard is not None and not shard.replicated:  # the experts' gradients stay on their owner
            own = None
            for mb in micros:  # this rank's slices, in order
                own = _summed(own, {n: g for n, g in mb.grads.items() if shard.local(n)})
            # + 0.0: the bits of the replicated sum, which adds the other ranks' zero rows
            # (x + 0.0 is x, except that -0.0 becomes +0.0)
            grads.update({n: g + 0.0 for n, g in own.items()})
    losses = {name: sum(mb.losses[name] for mb in everyone) / n_micro for name in everyone[0].losses}
    layers = sorted(everyone[0].load)
    load_host = {layer: sum(mb.load[layer] for mb in everyone) for layer in layers}  # exact integers
    load = {layer: bk.asarray(load_host[layer], dtype="int64") for layer in layers}
    if shard is None or shard.replicated:
        norm = global_grad_norm(grads)
        bad = None if math.isfinite(norm) else first_nonfinite(grads)
    else:
        norm, bad = _sharded_grad_norm(grads, shard, world)
    if not math.isfinite(norm):
        raise NonFinite(f"gradient of {bad!r} is not finite (grad norm {norm})")
    scales, norm = clip_scales(grads, grad_clip, norm)  # AdamW reads g * scale (no clipped copies)
    with commit():
        opt.step(params, grads, lr, scales)
        update_expert_bias(params, load, cfg.refmtp.bias_update_gamma)
    if mark is not None:
        mark("update")
    return StepResult(out=out, losses=losses, grad_norm=norm, load=load)
