"""The DeepSeekMoE layer (V3 eq. 12, docs/deepseek-v3.md §3): shared + routed SwiGLU experts.

    out_t = SharedMLP(u_t) + sum_{i in S_t} g_{i,t} Expert_i(u_t)          (eq. 12 without the residual)

u = x is the post_attention_layernorm output; the router (:mod:`refmtp.model.router`) picks S_t and
g_{i,t}; the balance loss (:mod:`refmtp.model.balance`) is returned as ``aux`` WITHOUT alpha.

Dispatch and combine (docs/derivations/moe-combine.md). The N*K token-slots are numbered
``j = n*K + k`` (token n, its k-th choice)::

    order   = stable argsort of topk_idx.flat          (S,) slot ids grouped by expert, each expert's
                                                        slots in token order: deterministic
    offsets = start of each expert's block in order    (E+1,), load = diff(offsets)
    xs[p]   = x[order[p] // K]                         permute: expert e owns rows offsets[e]:offsets[e+1]
    ys[p]   = Expert_e(xs[p])                          one SwiGLU call per contiguous block
    y[n]   += w.flat[order[p]] * ys[p]                 combine: a scatter-add over p = 0..S-1 in order
                                                        (never ``y[idx] += v``: tokens repeat)

Backward: ``dys[p] = w.flat[order[p]] dy[n]``, ``dw.flat[order[p]] = <dy[n], ys[p]>``, the experts'
SwiGLU backward on each block, then ``dx[n] += dxs[p]`` (the permute's transpose, a scatter-add).

The five dispatch functions ``moe_*_ref`` are the plain array references; the numpy backend has
Numba twins (backends/numba_moe.py) and the cupy backend RawKernels (backends/moe_dispatch.cu,
backends/cupy_moe.py), with the same signatures, found through ``bk.kernel(name)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from refmtp.backends import backend_of
from refmtp.backends.contracts import check_moe_dispatch_plan
from refmtp.mutation import on
from refmtp.params import BIAS, moe_param_shapes
from refmtp.model.balance import balance_loss_backward, balance_loss_forward
from refmtp.model.router import RouterCache, router_backward, router_forward, router_margin
from refmtp.model.ops.swiglu import swiglu_backward, swiglu_forward

PROJ = ("gate_proj", "up_proj", "down_proj")


# -------------------------------------------------------------------------------------------
# Parameter names (local, under ``mlp.``)
# -------------------------------------------------------------------------------------------
# -------------------------------------------------------------------------------------------
# Dispatch / combine: plain array references (kernels: bk.kernel(<name without _ref>))
# -------------------------------------------------------------------------------------------
def moe_dispatch_plan_ref(topk_idx, n_experts: int):
    """topk_idx (N, K) int64 -> (order (S,) int64, offsets (E+1,) int64), S = N*K.

    ``order`` lists the slot ids ``n*K + k`` sorted by expert, STABLE (slots of one expert stay in
    slot order, so every backend produces the same permutation); expert e's slots are
    ``order[offsets[e]:offsets[e+1]]``.
    """
    bk = backend_of(topk_idx)
    xp = bk.xp
    flat = xp.reshape(topk_idx, (-1,))  # (S,)
    check_moe_dispatch_plan(flat, n_experts)  # the kernels' contract too  # int() syncs device -> host on cupy: two scalars
    order = xp.astype(xp.argsort(flat, stable=True), xp.int64)  # (S,)
    sorted_e = xp.take(flat, order)  # (S,) non-decreasing expert ids
    offsets = xp.searchsorted(sorted_e, xp.arange(n_experts + 1, dtype=flat.dtype), side="left")
    return order, xp.astype(offsets, xp.int64)  # (S,), (E+1,)


def moe_permute_ref(x, order, K: int):
    """x (N, d) -> xs (S, d) with ``xs[p] = x[order[p] // K]`` (gather the token of each slot)."""
    xp = backend_of(x, order).xp
    return xp.take(x, order // K, axis=0)  # (S, d)


def moe_permute_backward_ref(dxs, order, n_tokens: int):
    """Transpose of the permute: dxs (S, d) -> dx (N, d), ``dx[order[p] // K] += dxs[p]``.

    A scatter-add over p = 0..S-1 in order (each token receives K slots).
    """
    bk = backend_of(dxs, order)
    xp = bk.xp
    K = order.shape[0] // n_tokens
    dx = xp.zeros((n_tokens, dxs.shape[1]), dtype=dxs.dtype)  # (N, d)
    bk.scatter_add(dx, order // K, dxs)
    return dx


def moe_combine_ref(ys, order, weight):
    """ys (S, d) expert outputs in dispatch order, weight (N, K) gate values -> y (N, d).

    ``y[order[p] // K] += weight.flat[order[p]] * ys[p]`` for p = 0..S-1, as a scatter-add
    (tokens repeat; ``y[idx] += v`` would drop all but one of them).
    """
    bk = backend_of(ys, order, weight)
    xp = bk.xp
    N, K = weight.shape
    w_sorted = xp.take(xp.reshape(weight, (-1,)), order)  # (S,) gate value of each sorted slot
    y = xp.zeros((N, ys.shape[1]), dtype=ys.dtype)  # (N, d)
    if on("experts.combine_overwrites"):
        y[order // K] = ys * w_sorted[:, None]  # the bug: one of each token's K slots survives
        return y
    bk.scatter_add(y, order // K, ys * w_sorted[:, None])
    return y


def moe_combine_backward_ref(dy, ys, order, weight):
    """Backward of moe_combine: dy (N, d) -> (dys (S, d), dweight (N, K)).

    forward ``y[n] += w_j ys[p]`` (j = order[p], n = j // K)  ->
    ``dys[p] = w_j dy[n]``,  ``dweight.flat[j] = <dy[n], ys[p]>``.
    """
    xp = backend_of(dy, ys, order, weight).xp
    N, K = weight.shape
    w_sorted = xp.take(xp.reshape(weight, (-1,)), order)  # (S,)
    dy_slots = xp.take(dy, order // K, axis=0)  # (S, d)
    dys = dy_slots * w_sorted[:, None]  # (S, d)
    dw_sorted = xp.sum(dy_slots * ys, axis=-1)  # (S,)
    inverse = xp.argsort(order)  # (S,) position of slot j in the dispatch order
    dweight = xp.reshape(xp.take(dw_sorted, inverse), (N, K))  # (N, K)
    return dys, dweight


def _kernel(bk, name, ref):
    """The backend's accelerated twin of ``ref`` (same signature), or ``ref`` itself."""
    return bk.kernel(name) or ref


# -------------------------------------------------------------------------------------------
# The layer
# -------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class MoECache:
    router: RouterCache  # gate caches: x (N, d), affinities s (N, E), selection
    balance: Any  # BalanceCache, or None when balance_loss == "none"
    order: Any  # (S,) int64 slot ids in dispatch order (S = N*K)
    offsets: tuple  # E+1 host ints: expert e's rows are offsets[e]:offsets[e+1]
    experts: tuple  # E entries: SwiGLUCache of expert e on its block, None if it got no token
    ys: Any  # (S, d) expert outputs in dispatch order, for dweight = <dy, ys>
    shared: Any  # SwiGLUCache of the shared experts on (N, d), None when n_shared_experts == 0
    topk_idx: Any  # (B, T, K) int64 routed experts (golden files, bias update)
    topk_weight: Any  # (B, T, K) gate values g (after normalisation and scaling)
    load: Any  # (E,) int64 tokens routed to each expert (actual, biased, group-limited routing)
    x_shape: tuple  # (B, T, d)
    expert_width: int  # moe_intermediate_size (zero gradients of experts with no token)


def check_moe(x, p: dict, cfg) -> None:
    """The MoE layer's contract (one-line ValueErrors): the config's MoE fields, x (B, T, d),
    the local parameter names, shapes and dtypes. Called once at an entry point (tests, the
    audit); :func:`moe_forward` assumes it holds (the model validates its config once, and every
    parameter once per call with refmtp.params.check_params)."""
    xp = backend_of(x, *p.values()).xp
    cfg.validate()  # ConfigError (a ValueError) for K > E, G not dividing E, ... (docs/deepseek-v3.md §3.2)
    if cfg.n_routed_experts < 1:
        raise ValueError("moe_forward: n_routed_experts=0 means a dense layer; call the dense MLP")
    if len(x.shape) != 3 or x.shape[0] < 1 or x.shape[1] < 1 or x.shape[2] != cfg.hidden_size:
        raise ValueError(
            f"moe_forward: x has shape {tuple(x.shape)}, expected (B, T, {cfg.hidden_size}) "
            "with B, T >= 1"
        )
    if x.dtype not in (xp.float32, xp.float64):
        raise ValueError(f"moe_forward: x is {x.dtype}; use float32 or float64")
    shapes = moe_param_shapes(cfg)
    for name in p:
        if name not in shapes:
            raise ValueError(
                f"moe_forward: unexpected parameter {name!r} for this config "
                f"(n_routed_experts={cfg.n_routed_experts}, topk_method={cfg.topk_method!r}): remove it"
            )
    for name, shape in shapes.items():
        if name not in p:
            raise ValueError(f"moe_forward: missing parameter {name!r} of shape {shape}")
        a = p[name]
        if tuple(a.shape) != shape:
            raise ValueError(f"moe_forward: {name} has shape {tuple(a.shape)}, expected {shape}")
        want = xp.float32 if name == BIAS else x.dtype
        if a.dtype != want:
            why = "the balancing bias is always float32" if name == BIAS else "cast it to x's dtype"
            raise ValueError(f"moe_forward: {name} is {a.dtype}, expected {want}: {why}")


# The routed experts sharded over MPI ranks (refmtp.training.expert_parallel.sharded sets it for
# the training steps of an --expert-parallel run); None: this module's single-process layer.
SHARDED = None


def moe_forward(x, p: dict, cfg, *, train: bool = True):
    """x (B, T, d) post_attention_layernorm'ed -> (out (B, T, d), aux (), MoECache).

    ``out`` = shared + routed experts (no residual), V3 eq. 12. ``aux`` is the layer's balance
    loss WITHOUT alpha (cfg.refmtp.balance_loss: "seq" V3 eqs. 17-20, "expert" V2, "none" -> 0).
    ``train=False`` (decoding) computes ``out`` only: no balance loss, no load statistics, no
    backward cache; it returns ``(out, None, None)`` and ``out`` is the same numbers.
    """
    if SHARDED is not None:  # expert parallel (training steps only): the same layer, experts on their ranks
        return SHARDED.forward(x, p, cfg)
    bk = backend_of(x)
    xp = bk.xp
    B, T, d = x.shape
    N, E, K = B * T, cfg.n_routed_experts, cfg.num_experts_per_tok
    x2 = xp.reshape(x, (N, d))  # (B, T, d) -> (N, d)
    # router: selection on s + b (group-limited), gate values from s (eqs. 13-16)
    topk_idx, topk_weight, rcache = router_forward(x2, p["gate.weight"], p.get(BIAS), cfg)  # (N, K) x2
    if train:
        kind = cfg.refmtp.balance_loss
        if on("balance.f_from_routed_topk") and kind == "seq":
            kind = "seq_routed"
        aux, bcache = balance_loss_forward(
            xp.reshape(rcache.s, (B, T, E)), xp.reshape(topk_idx, (B, T, K)), kind
        )  # (), eqs. 17-20 without alpha
    # dispatch: sort the N*K slots by expert, gather their tokens
    order, offsets = _kernel(bk, "moe_dispatch_plan", moe_dispatch_plan_ref)(topk_idx, E)  # (S,), (E+1,)
    xs = _kernel(bk, "moe_permute", moe_permute_ref)(x2, order, K)  # (S, d)
    off = tuple(int(v) for v in bk.to_numpy(offsets).tolist())  # E+1 ints to the host (block bounds)
    blocks, caches = [], []
    for e in range(E):
        lo, hi = off[e], off[e + 1]
        if hi == lo:  # an expert no token chose: nothing to run
            caches.append(None)
            continue
        y_e, c_e = swiglu_forward(xs[lo:hi, :], *(p[f"experts.{e}.{w}.weight"] for w in PROJ))  # (n_e, d)
        blocks.append(y_e)
        caches.append(c_e)
    ys = xp.concat(blocks, axis=0)  # (S, d) in dispatch order
    routed = _kernel(bk, "moe_combine", moe_combine_ref)(ys, order, topk_weight)  # (N, d)
    if cfg.n_shared_experts > 0:
        shared, scache = swiglu_forward(x2, *(p[f"shared_experts.{w}.weight"] for w in PROJ))  # (N, d)
        if on("experts.shared_scaled"):
            shared = shared * cfg.routed_scaling_factor
        if on("experts.no_shared"):
            shared = shared * 0.0
        out = shared + routed  # the shared output is added unscaled
    else:
        scache = None
        out = routed
    if not train:  # decoding: no balance statistics, no backward cache
        return xp.reshape(out, (B, T, d)), None, None
    load = xp.astype(offsets[1:] - offsets[:-1], xp.int64)  # (E,)
    if on("bias_update.load_unbiased"):
        unbiased, _ = bk.topk(rcache.s, K)  # (N, K)
        load = xp.astype(xp.sum(xp.reshape(unbiased, (-1, 1)) == xp.arange(E)[None, :], axis=0), xp.int64)
    cache = MoECache(router=rcache, balance=bcache, order=order, offsets=off, experts=tuple(caches),
                     ys=ys, shared=scache, topk_idx=xp.reshape(topk_idx, (B, T, K)),
                     topk_weight=xp.reshape(topk_weight, (B, T, K)), load=load, x_shape=(B, T, d),
                     expert_width=cfg.moe_intermediate_size)
    return xp.reshape(out, (B, T, d)), aux, cache


def moe_backward(dout, daux, cache: MoECache):
    """dout (B, T, d), daux = d loss / d aux (scalar, or None for 0) -> (dx (B, T, d), grads).

    ``grads`` is keyed by local names (gate.weight, experts.{e}.*, shared_experts.*); there is
    no gate.e_score_correction_bias entry (it has no gradient). Experts that received no token
    get zero gradients. Backward of eq. 12 with the selection fixed:

        shared:   SwiGLU backward on dout
        combine:  dys = g dout[token], dg = <dout[token], ys>
        experts:  SwiGLU backward per block -> dxs;  dx_routed = scatter-add of dxs to tokens
        router:   dg (and the balance loss' ds) -> dx_gate, dWg     (refmtp.model.router)
        dx = dx_shared + dx_routed + dx_gate
    """
    if not isinstance(cache, MoECache):  # the cache of the expert-parallel layer (SHARDED)
        return cache.backward(dout, daux)
    bk = backend_of(dout, cache.ys)
    xp = bk.xp
    c = cache
    B, T, d = c.x_shape
    N = B * T
    K = c.topk_idx.shape[-1]
    if tuple(dout.shape) != c.x_shape:
        raise ValueError(f"moe_backward: dout has shape {tuple(dout.shape)}, expected {c.x_shape}")
    dy = xp.reshape(dout, (N, d))  # (N, d)
    grads = {}
    # forward: routed = combine(ys, order, g)
    weight = xp.reshape(c.topk_weight, (N, K))
    dys, dweight = _kernel(bk, "moe_combine_backward", moe_combine_backward_ref)(
        dy, c.ys, c.order, weight)  # (S, d), (N, K)
    # forward: ys[block e] = Expert_e(xs[block e])
    dblocks = []
    for e, ce in enumerate(c.experts):
        names = [f"experts.{e}.{w}.weight" for w in PROJ]
        if ce is None:  # an expert no token chose: zero gradients
            I, dt = c.expert_width, c.ys.dtype
            grads[names[0]] = xp.zeros((I, d), dtype=dt)
            grads[names[1]] = xp.zeros((I, d), dtype=dt)
            grads[names[2]] = xp.zeros((d, I), dtype=dt)
            continue
        lo, hi = c.offsets[e], c.offsets[e + 1]
        g = swiglu_backward(dys[lo:hi, :], ce)
        dblocks.append(g.dx)  # (n_e, d)
        grads[names[0]], grads[names[1]], grads[names[2]] = g.dgate_proj, g.dup_proj, g.ddown_proj
    dxs = xp.concat(dblocks, axis=0)  # (S, d)
    # forward: xs = permute(x, order)
    dx = _kernel(bk, "moe_permute_backward", moe_permute_backward_ref)(dxs, c.order, N)  # (N, d)
    # forward: aux = balance loss of s
    ds = None
    if c.balance is not None and daux is not None:
        daux = bk.asarray(daux, dtype=c.ys.dtype)
        ds = xp.reshape(balance_loss_backward(daux, c.balance), (N, -1))  # (N, E)
    dx = router_and_shared_backward(dy, dweight, ds, c.router, c.shared, dx, grads)
    return xp.reshape(dx, (B, T, d)), dict(sorted(grads.items()))


def router_and_shared_backward(dy, dweight, ds, router_cache, shared_cache, dx, grads: dict):
    """The MoE backward past the routed experts: the router (forward: (topk_idx, g) = router(x))
    and the shared experts. Adds their parts to ``dx`` (returned) and their weights' gradients to
    ``grads``; also the tail of the expert-parallel layer's backward."""
    rg = router_backward(dweight, router_cache, ds)
    grads["gate.weight"] = rg.dweight
    dx = dx + rg.dx
    if shared_cache is not None:
        g = swiglu_backward(dy, shared_cache)
        dx = dx + g.dx
        grads["shared_experts.gate_proj.weight"] = g.dgate_proj
        grads["shared_experts.up_proj.weight"] = g.dup_proj
        grads["shared_experts.down_proj.weight"] = g.ddown_proj
    return dx


# -------------------------------------------------------------------------------------------
# Helpers for gradient checks and logs
# -------------------------------------------------------------------------------------------
def routing_selection(cache: MoECache):
    """The discrete choices of a forward, (N, K) or (N, 2K) int64: for check_grad's selection=.

    Each token's selected experts (sorted, so a reordering inside the top-K is not a flip), and,
    for the sequence-wise balance loss, the unbiased top-K that eq. 18 counts.
    """
    xp = backend_of(cache.topk_idx).xp
    K = cache.topk_idx.shape[-1]
    parts = [xp.sort(xp.reshape(cache.topk_idx, (-1, K)), axis=-1)]
    if cache.balance is not None and cache.balance.kind == "seq":
        parts.append(xp.sort(xp.reshape(cache.balance.count_idx, (-1, K)), axis=-1))
    return xp.concat(parts, axis=-1)


def routing_margin(cache: MoECache) -> float:
    """Smallest score gap behind any discrete choice of the forward (router and eq. 18 top-K).

    A gradient-check fixture wants this far above the finite-difference step h (1e-5).
    """
    m = router_margin(cache.router)
    if cache.balance is not None and cache.balance.kind == "seq":
        xp = backend_of(cache.router.s).xp
        s = cache.router.s  # (N, E)
        K = cache.topk_idx.shape[-1]
        if s.shape[1] > K:
            v = -xp.sort(-s, axis=-1)  # (N, E) descending
            m = min(m, float(xp.min(v[:, K - 1] - v[:, K])))
    return m
