"""Expert parallelism: the DeepSeekMoE layer with its routed experts sharded over the ranks of a
World, tokens sent to the experts' ranks by an all-to-all (``World.alltoallv``) and back for the combine
(docs/distributed.md §3; the layer itself: refmtp.model.moe, docs/deepseek-v3.md §3).

    layer = ExpertShard(cfg, world)                   # rank r owns experts r*E/N .. (r+1)*E/N - 1
    out, aux, cache = ep_moe_forward(x, p, layer)     # x: this rank's (B, T, d) tokens
    dx, grads = ep_moe_backward(dout, daux, cache)    # grads: gate / shared (this rank's part), own experts
    layer.bytes                                       # {"dispatch": ..., "combine": ...} sent so far

``p`` holds the local parameter names of refmtp.model.moe (gate.weight, the bias, the shared
experts) and ``experts.{e}.*`` for the experts this rank owns only. Node-limited routing: the
n_group routing groups are laid over the ranks (group g on rank g // (n_group / N)), so a token
whose top-K lies in ``topk_group`` = M groups reaches at most M ranks (V3 section 3.2.2).

One forward, on rank r (every step in a fixed order)::

    topk_idx, g = router(x)                           the model's router, on r's tokens
    order = stable sort of r's slots by expert        moe_dispatch_plan_ref: also sorted by rank
    xs = x[order // K]                                moe_permute_ref
    alltoallv(xs, expert ids) -> owners               dispatch, source ranks in rank order
    owner: per expert, its rows in (source rank, slot) order = the single process's block
    ys = SwiGLU_e(block)                              the model's swiglu_forward
    alltoallv(ys) -> home ranks                       combine, one row per slot
    y = combine(ys, order, g)                         moe_combine_ref: the single process's order

The backward runs the same plan in reverse: dys = g dy to the owners, the experts' SwiGLU
backward, dxs back, then the permute's transpose. Because every expert sees the block the
single process would build and every token adds its slots in the single process's order, the
routed output, dx and the owned experts' gradients are bit-identical to refmtp.model.moe on the
concatenation of all ranks' tokens; gate.weight and the shared experts' gradients are this
rank's share (a sum over its tokens), which the data-parallel reduction adds up.

In training a rank holds only its own experts (weights, gradients, AdamW moments;
``ExpertShard.held``); evaluation runs the sharded layer too, the ranks without tokens only
serving their experts (:func:`serve_forward`). docs/distributed.md §3.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np  # host buffers for MPI and the row bookkeeping of the exchange

from refmtp.backends import backend_of
from refmtp.model import moe
from refmtp.model.balance import balance_loss_backward, balance_loss_forward
from refmtp.model.moe import (PROJ, moe_combine_backward_ref, moe_combine_ref, moe_dispatch_plan_ref,
                              moe_permute_backward_ref, moe_permute_ref, router_and_shared_backward)
from refmtp.model.router import router_forward
from refmtp.model.ops.swiglu import swiglu_backward, swiglu_forward
from refmtp.params import BIAS, layer_prefix, mtp_layer, param_shapes, routed_expert, sub_params
from refmtp.training.distributed import World

REPLICATED_ENV = "REFMTP_EP_REPLICATED"  # "1": ExpertShard.replicated (comparisons only)


@dataclass
class ExpertShard:
    """Which experts this rank owns (and holds: their weights, gradients and AdamW moments),
    and the bytes its exchanges sent to other ranks.

    ``replicated`` (``REFMTP_EP_REPLICATED=1``, for comparisons only): every rank holds every
    expert and returns zero gradients for the ones it does not own, the layout before the
    memory was sharded; a run writes the same bytes either way (tests/test_distributed.py)."""

    cfg: Any
    world: World
    replicated: bool = False
    bytes: dict = field(default_factory=lambda: {"dispatch": 0, "combine": 0})

    def __post_init__(self):
        E, N, G = self.cfg.n_routed_experts, self.world.size, self.cfg.n_group
        if E % N:
            raise ValueError(f"--expert-parallel {N} must divide n_routed_experts={E} (every rank "
                             "holds the same number of experts)")
        if G > 1 and G % N and N % G:
            raise ValueError(f"n_group={G} and --expert-parallel {N}: one must divide the other "
                             "(routing groups are laid over whole ranks)")
        self.per_rank = E // N

    def owner(self, e):
        """The rank of expert e (also of an array of expert ids)."""
        return e // self.per_rank

    @property
    def experts(self) -> range:
        r = self.world.rank
        return range(r * self.per_rank, (r + 1) * self.per_rank)

    def experts_of(self, rank: int) -> range:
        return range(rank * self.per_rank, (rank + 1) * self.per_rank)

    def held(self, rank: int | None = None):
        """``held(name)``: does ``rank`` (default this one) hold the parameter ``name``? Every
        rank holds everything but the routed experts (refmtp.params.routed_expert), and of
        those its own (all of them when ``replicated``)."""
        mine = self.experts_of(self.world.rank if rank is None else rank)

        def holds(name: str) -> bool:
            e = routed_expert(name)
            return e is None or self.replicated or e in mine
        return holds

    def local(self, name: str) -> bool:
        """A parameter whose gradient stays on its owner: a routed expert when the experts are
        sharded (the data-parallel exchange carries every other gradient)."""
        return not self.replicated and routed_expert(name) is not None


def held_params(cfg, shard: ExpertShard | None, rank: int = 0) -> tuple[int, int]:
    """(replicated, routed-expert) parameter elements that ``rank`` holds (docs/distributed.md
    §3: every rank the replicated P_rep, each E/N experts' P_exp / N)."""
    holds = (lambda name: True) if shard is None else shard.held(rank)
    rep = exp = 0
    for name, shape in param_shapes(cfg).items():
        if holds(name):
            n = math.prod(shape)
            rep, exp = (rep + n, exp) if routed_expert(name) is None else (rep, exp + n)
    return rep, exp


def _exchange(shard: ExpertShard, rows: np.ndarray, counts: np.ndarray, kind: str, what: str):
    """All-to-all: ``rows`` (S, w) sorted by destination, ``counts[q]`` rows for rank q ->
    (received rows in source-rank order, received counts). Bytes to other ranks go to ``kind``."""
    q = shard.world.rank
    out, recv_counts = shard.world.alltoallv(rows, counts, f"the expert-parallel {what}")
    width = int(np.prod(rows.shape[1:])) if rows.ndim > 1 else 1
    shard.bytes[kind] += int((int(np.sum(counts)) - int(counts[q])) * width * rows.itemsize)
    return out, recv_counts


@dataclass(frozen=True)
class EPCache:  # also read by refmtp.model.model like a MoECache: topk_idx, topk_weight, load
    shard: ExpertShard
    router: Any  # RouterCache of this rank's tokens
    balance: Any  # BalanceCache or None
    order: Any  # (S,) this rank's slots sorted by expert (= by owner rank)
    send_counts: np.ndarray  # (N,) slots sent to each rank
    recv_counts: np.ndarray  # (N,) rows received from each rank
    perm: np.ndarray  # received rows -> expert blocks (stable)
    blocks: tuple  # (expert, lo, hi, SwiGLUCache or None) over the permuted received rows
    ys: Any  # (S, d) expert outputs of this rank's slots, in ``order``
    shared: Any  # SwiGLUCache or None
    weight: Any  # (N_tok, K) gate values
    x_shape: tuple  # (B, T, d)
    topk_idx: Any  # (B, T, K) routed experts
    topk_weight: Any  # (B, T, K) gate values
    load: Any  # (E,) int64 this rank's tokens routed to each expert

    def backward(self, dout, daux):
        """:func:`ep_moe_backward`: gradients of this rank's experts only (``replicated``: zero
        gradients for the others' too, which the data-parallel sum adds to the owner's)."""
        dx, grads = ep_moe_backward(dout, daux, self)
        if not self.shard.replicated:
            return dx, grads
        xp = backend_of(dout).xp
        I, d = self.shard.cfg.moe_intermediate_size, self.x_shape[2]
        for e in range(self.shard.cfg.n_routed_experts):
            if e not in self.shard.experts:
                for w, shape in zip(PROJ, ((I, d), (I, d), (d, I))):
                    grads[f"experts.{e}.{w}.weight"] = xp.zeros(shape, dtype=self.ys.dtype)
        return dx, dict(sorted(grads.items()))


def ep_moe_forward(x, p: dict, shard: ExpertShard):
    """x (B, T, d) of this rank -> (out (B, T, d), aux, EPCache); see the module docstring."""
    bk = backend_of(x)
    xp = bk.xp
    cfg = shard.cfg
    B, T, d = x.shape
    N, E, K = B * T, cfg.n_routed_experts, cfg.num_experts_per_tok
    x2 = xp.reshape(x, (N, d))
    topk_idx, topk_weight, rcache = router_forward(x2, p["gate.weight"], p.get(BIAS), cfg)
    aux, bcache = balance_loss_forward(xp.reshape(rcache.s, (B, T, E)),
                                       xp.reshape(topk_idx, (B, T, K)), cfg.refmtp.balance_loss)
    order, offsets = moe_dispatch_plan_ref(topk_idx, E)  # sorted by expert, so by owner rank
    xs = bk.to_numpy(moe_permute_ref(x2, order, K))  # (S, d) host rows to send
    experts = bk.to_numpy(xp.take(xp.reshape(topk_idx, (-1,)), order))  # (S,) expert of each row
    off = bk.to_numpy(offsets)
    send_counts = np.array([off[(q + 1) * shard.per_rank] - off[q * shard.per_rank]
                            for q in range(shard.world.size)], dtype=np.int64)
    xr, recv_counts = _exchange(shard, xs, send_counts, "dispatch", "dispatch of token rows")
    er, _ = _exchange(shard, experts, send_counts, "dispatch", "dispatch of expert ids")  # int64
    perm, blocks, ys_recv = _run_experts(xr, er, p, shard, bk, str(x.dtype))
    ys_home, _ = _exchange(shard, ys_recv, recv_counts, "combine", "combine")  # (S, d) in ``order``
    ys = bk.asarray(ys_home, dtype=str(x.dtype))
    routed = moe_combine_ref(ys, order, topk_weight)  # (N, d) the single process's sums
    if cfg.n_shared_experts > 0:
        shared, scache = swiglu_forward(x2, *(p[f"shared_experts.{w}.weight"] for w in PROJ))
        out = shared + routed
    else:
        scache, out = None, routed
    cache = EPCache(shard=shard, router=rcache, balance=bcache, order=order,
                    send_counts=send_counts, recv_counts=recv_counts, perm=perm,
                    blocks=tuple(blocks), ys=ys, shared=scache, weight=topk_weight,
                    x_shape=(B, T, d), topk_idx=xp.reshape(topk_idx, (B, T, K)),
                    topk_weight=xp.reshape(topk_weight, (B, T, K)),
                    load=xp.astype(offsets[1:] - offsets[:-1], xp.int64))
    return xp.reshape(out, (B, T, d)), aux, cache


def _run_experts(xr, er, p: dict, shard: ExpertShard, bk, dtype: str):
    """The owner's part: rows ``xr`` (R, d) received for experts ``er`` (R,) -> (perm, blocks,
    ys (R, d) in the order the rows arrived). Each expert runs once on its block, the rows in
    (source rank, slot) order: the block the single process builds for it."""
    perm = np.argsort(er, kind="stable")  # expert blocks, rows in (source rank, slot) order
    er_sorted = er[perm]
    ys_sorted = np.empty_like(xr)
    blocks = []
    for e in shard.experts:
        lo, hi = np.searchsorted(er_sorted, e, "left"), np.searchsorted(er_sorted, e, "right")
        if hi == lo:
            blocks.append((e, lo, hi, None))
            continue
        y_e, c_e = swiglu_forward(bk.asarray(xr[perm[lo:hi]], dtype=dtype),
                                  *(p[f"experts.{e}.{w}.weight"] for w in PROJ))  # (n_e, d)
        ys_sorted[lo:hi] = bk.to_numpy(y_e)
        blocks.append((e, lo, hi, c_e))
    ys_recv = np.empty_like(ys_sorted)
    ys_recv[perm] = ys_sorted  # back to the order rows arrived in
    return perm, blocks, ys_recv


def ep_moe_serve(p: dict, shard: ExpertShard, bk, dtype: str) -> None:
    """One forward of the layer on a rank without tokens of its own: it only runs its experts
    on the rows other ranks send (evaluation, where rank 0 holds the whole batch)."""
    d, none = shard.cfg.hidden_size, np.zeros(shard.world.size, dtype=np.int64)
    xr, recv_counts = _exchange(shard, np.empty((0, d), dtype=dtype), none, "dispatch",
                                "dispatch of token rows")
    er, _ = _exchange(shard, np.empty((0,), dtype=np.int64), none, "dispatch",
                      "dispatch of expert ids")
    _, _, ys_recv = _run_experts(xr, er, p, shard, bk, dtype)
    _exchange(shard, ys_recv, recv_counts, "combine", "combine")


def moe_layers(cfg) -> list:
    """The MoE layers in the order one forward calls them: the trunk's, then the MTP modules'."""
    layers = list(range(cfg.num_hidden_layers)) + [mtp_layer(cfg, k) for k in range(1, cfg.D + 1)]
    return [layer for layer in layers if cfg.is_moe_layer(layer)]


def serve_forward(params: dict, shard: ExpertShard, bk, dtype: str) -> None:
    """Every MoE layer of one model forward on a rank without tokens (:func:`ep_moe_serve`), in
    the order the rank with the tokens calls them."""
    for layer in moe_layers(shard.cfg):
        ep_moe_serve(sub_params(params, layer_prefix(layer) + "mlp."), shard, bk, dtype)


def ep_moe_backward(dout, daux, cache: EPCache):
    """dout (B, T, d) -> (dx (B, T, d), grads): the backward of refmtp.model.moe.moe_backward,
    with the experts' part on their owners (module docstring)."""
    bk = backend_of(dout, cache.ys)
    xp = bk.xp
    c, shard = cache, cache.shard
    B, T, d = c.x_shape
    N = B * T
    dy = xp.reshape(dout, (N, d))
    grads = {}
    dys, dweight = moe_combine_backward_ref(dy, c.ys, c.order, c.weight)  # (S, d), (N, K)
    dys_recv, _ = _exchange(shard, bk.to_numpy(dys), c.send_counts, "combine",
                            "backward of the combine")  # to the owners
    dys_sorted = dys_recv[c.perm]
    dxs_sorted = np.zeros_like(dys_sorted)
    I, dt = shard.cfg.moe_intermediate_size, str(c.ys.dtype)
    for e, lo, hi, ce in c.blocks:
        names = [f"experts.{e}.{w}.weight" for w in PROJ]
        if ce is None:  # no token chose the expert: zero gradients
            grads[names[0]] = xp.zeros((I, d), dtype=dt)
            grads[names[1]] = xp.zeros((I, d), dtype=dt)
            grads[names[2]] = xp.zeros((d, I), dtype=dt)
            continue
        g = swiglu_backward(bk.asarray(dys_sorted[lo:hi], dtype=dt), ce)
        dxs_sorted[lo:hi] = bk.to_numpy(g.dx)
        grads[names[0]], grads[names[1]], grads[names[2]] = g.dgate_proj, g.dup_proj, g.ddown_proj
    dxs_recv = np.empty_like(dxs_sorted)
    dxs_recv[c.perm] = dxs_sorted
    dxs, _ = _exchange(shard, dxs_recv, c.recv_counts, "dispatch",
                       "backward of the dispatch")  # back home, in ``order``
    dx = moe_permute_backward_ref(bk.asarray(dxs, dtype=dt), c.order, N)  # (N, d)
    ds = None
    if c.balance is not None and daux is not None:
        ds = xp.reshape(balance_loss_backward(bk.asarray(daux, dtype=dt), c.balance), (N, -1))
    dx = router_and_shared_backward(dy, dweight, ds, c.router, c.shared, dx, grads)  # this rank's tokens only
    return xp.reshape(dx, (B, T, d)), dict(sorted(grads.items()))


class _Layer:
    """What refmtp.model.moe.SHARDED holds while :func:`sharded` is active."""

    def __init__(self, shard: ExpertShard):
        self.shard = shard
        # the routed experts this rank's parameters hold (refmtp.model.forward checks them)
        self.experts = None if shard.replicated else shard.experts

    def forward(self, x, p: dict, cfg):
        if cfg.n_routed_experts != self.shard.cfg.n_routed_experts:
            raise ValueError("expert parallel: the layer's config is not the shard's")
        return ep_moe_forward(x, p, self.shard)


@contextmanager
def sharded(shard: ExpertShard):
    """Every MoE layer of the model runs expert-parallel inside the block (the training steps,
    and the evaluation of a run whose experts are sharded: :func:`serve_forward`)."""
    previous = moe.SHARDED
    moe.SHARDED = _Layer(shard)
    try:
        yield
    finally:
        moe.SHARDED = previous


def active() -> bool:
    """True inside :func:`sharded` (the forward takes part in collectives)."""
    return moe.SHARDED is not None


def current() -> ExpertShard | None:
    """The ExpertShard of the enclosing :func:`sharded`, or None."""
    return None if moe.SHARDED is None else moe.SHARDED.shard


def expected_bytes(topk_idx_per_rank: list, shard: ExpertShard, itemsize: int, d: int) -> dict:
    """docs/distributed.md §3's formula: with S_q the slots of rank q whose expert lives on
    another rank, rank q sends per forward + backward
    ``dispatch = S_q (d itemsize + 8) + S'_q d itemsize`` and ``combine = S'_q d itemsize +
    S_q d itemsize``, S'_q = the rows rank q receives from other ranks (it returns them)."""
    q = shard.world.rank
    owners = [shard.owner(np.asarray(t).reshape(-1)) for t in topk_idx_per_rank]
    s_out = int(np.sum(owners[q] != q))  # q's slots served elsewhere
    s_in = int(sum(np.sum(o == q) for r, o in enumerate(owners) if r != q))  # others' slots q serves
    row = d * itemsize
    return {"dispatch": s_out * (row + 8) + s_in * row, "combine": s_in * row + s_out * row}
