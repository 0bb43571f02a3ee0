"""Load balancing of DeepSeekMoE: balance losses, the auxiliary-loss-free bias update, load stats.

Sequence-wise balance loss (V3 eqs. 17-20, docs/deepseek-v3.md §3.5), for each sequence b of T tokens::

    f_i = E / (K T) * sum_t 1[i in TopK(s_t, K)]      eq. 18: UNBIASED affinities, no group limit;
                                                      a constant (no gradient)
    s'_{t,i} = s_{t,i} / sum_j s_{t,j}                eq. 19
    P_i = (1/T) sum_t s'_{t,i}                        eq. 20
    L_b = sum_i f_i P_i                               eq. 17 without alpha
    loss = (1/B) sum_b L_b                            averaged over the sequences of the batch

The V2 expert-level loss (``balance_loss="expert"``, P-V2) is the same formula over ONE group of
all B*T tokens, with f_i counting the experts the router actually selected (``topk_idx``). For
softmax affinities s' = s (they already sum to 1); for sigmoid ones the normalisation is that of
Megatron's ``compute_routing_scores_for_aux_loss``. alpha (cfg.refmtp.seq_aux_alpha) is applied by
the model, not here.

Backward (f fixed)::

    dP_{g,i} = dloss f_{g,i} / n_groups;   ds'_{g,t,i} = dP_{g,i} / T_g
    ds_{t,j} = (ds'_{t,j} - sum_i ds'_{t,i} s'_{t,i}) / sum_i s_{t,i}

Auxiliary-loss-free balancing (V3 section 2.1.2, docs/deepseek-v3.md §3.4): ``b_i += gamma sign(mean(c) - c_i)``
from the loads c of the routing actually used (biased, group-limited), b kept float32.
Derivation: docs/derivations/balance-loss.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from refmtp.backends import backend_of
from refmtp.mutation import on

BALANCE_KINDS = ("seq", "expert", "none")


@dataclass(frozen=True, slots=True)
class BalanceCache:
    s_norm: Any  # (Gs, Ts, E) s' = s / sum_j s_j, per group of tokens
    denom: Any  # (Gs, Ts, 1) sum_j s_j
    f: Any  # (Gs, E) eq. 18 load fractions (constants)
    count_idx: Any  # (B, T, K) int64 the top-K that f counted (the selection behind f)
    in_shape: tuple  # (B, T, E) shape of the affinities given to the forward
    kind: str  # "seq" | "expert"


def _fp_loss(s, count_idx, n_groups: int, kind: str):
    """Shared core: ``mean_g sum_i f_{g,i} P_{g,i}`` with tokens split into n_groups groups."""
    bk = backend_of(s, count_idx)
    xp = bk.xp
    B, T, E = s.shape
    K = count_idx.shape[-1]
    Ts = (B * T) // n_groups  # tokens per group
    sg = xp.reshape(s, (n_groups, Ts, E))  # (Gs, Ts, E)
    # f: per-group counts of the selected experts (one scatter-add over flat group*E indices)
    gid = xp.reshape(xp.arange(n_groups, dtype=count_idx.dtype), (n_groups, 1, 1))
    flat = xp.reshape(xp.reshape(count_idx, (n_groups, Ts, K)) + E * gid, (-1,))
    counts = xp.zeros((n_groups * E,), dtype=s.dtype)
    bk.scatter_add(counts, flat, xp.ones(flat.shape, dtype=s.dtype))
    f = xp.reshape(counts, (n_groups, E)) * (E / (K * Ts))  # (Gs, E) eq. 18
    if on("balance.f_missing_scale"):
        f = xp.reshape(counts, (n_groups, E)) / Ts
    denom = xp.sum(sg, axis=-1, keepdims=True)  # (Gs, Ts, 1)
    s_norm = sg / denom  # (Gs, Ts, E) eq. 19
    if on("balance.p_unnormalised"):
        s_norm = sg
    P = xp.mean(s_norm, axis=1)  # (Gs, E) eq. 20
    loss = xp.mean(xp.sum(f * P, axis=-1))  # scalar, eq. 17 / alpha, averaged over groups
    cache = BalanceCache(s_norm=s_norm, denom=denom, f=f, count_idx=count_idx,
                         in_shape=tuple(s.shape), kind=kind)
    return loss, cache


def _check(s, who):
    if len(s.shape) != 3:
        raise ValueError(f"{who}: affinities must be (B, T, E), got shape {tuple(s.shape)}")


def seq_balance_loss_forward(s, K: int):
    """Sequence-wise balance loss (V3 eqs. 17-20) without alpha.

    s (B, T, E) unbiased affinities of the router (sigmoid for V3); K = num_experts_per_tok.
    f counts the top-K of s itself (no bias, no group limit; s' has the same order as s).
    Returns ``(loss (), BalanceCache)``.
    """
    bk = backend_of(s)
    _check(s, "seq_balance_loss")
    B, T, E = s.shape
    if not 1 <= K <= E:
        raise ValueError(f"seq_balance_loss: K={K} must be between 1 and n_routed_experts={E}")
    idx, _ = bk.topk(s, K)  # (B, T, K) eq. 18's TopK, ties -> lowest index
    return _fp_loss(s, idx, 1 if on("balance.batch_wise") else B, "seq")


def expert_balance_loss_forward(s, topk_idx):
    """V2 expert-level balance loss without alpha over all B*T tokens of the batch.

    s (B, T, E) affinities; topk_idx (B, T, K) the experts the router selected.
    Returns ``(loss (), BalanceCache)``.
    """
    _check(s, "expert_balance_loss")
    B, T, E = s.shape
    if tuple(topk_idx.shape[:2]) != (B, T):
        raise ValueError(
            f"expert_balance_loss: topk_idx has shape {tuple(topk_idx.shape)}, expected ({B}, {T}, K)"
        )
    return _fp_loss(s, topk_idx, 1, "expert")


def balance_loss_forward(s, topk_idx, kind: str):
    """Dispatch on cfg.refmtp.balance_loss: ``(loss, cache)`` or ``(0, None)`` for "none"."""
    if kind == "seq":
        return seq_balance_loss_forward(s, topk_idx.shape[-1])
    if kind == "seq_routed":  # mutant balance.f_from_routed_topk only
        return _fp_loss(s, topk_idx, s.shape[0], "seq")
    if kind == "expert":
        return expert_balance_loss_forward(s, topk_idx)
    if kind == "none":
        xp = backend_of(s).xp
        return xp.zeros((), dtype=s.dtype), None
    raise ValueError(f"balance_loss={kind!r} is not allowed: choose one of {', '.join(BALANCE_KINDS)}")


def balance_loss_backward(dloss, cache: BalanceCache):
    """d loss / d s, shape (B, T, E); f is a constant (its top-K has no gradient).

        dP = dloss f / Gs;  ds' = dP / Ts (broadcast over the group's tokens)
        forward s' = s / sum_j s_j  ->  ds = (ds' - sum_i ds'_i s'_i) / sum_i s_i
    """
    bk = backend_of(cache.s_norm)
    xp = bk.xp
    c = cache
    Gs, Ts, E = c.s_norm.shape
    dP = c.f * (dloss / Gs)  # (Gs, E) forward: loss = mean_g sum_i f P
    ds_norm = xp.broadcast_to(dP[:, None, :] / Ts, c.s_norm.shape)  # (Gs, Ts, E) forward: P = mean_t s'
    dot = xp.sum(ds_norm * c.s_norm, axis=-1, keepdims=True)  # (Gs, Ts, 1)
    ds = (ds_norm - dot) / c.denom  # (Gs, Ts, E) forward: s' = s / sum s
    return xp.reshape(ds, c.in_shape)


# -------------------------------------------------------------------------------------------
# Auxiliary-loss-free bias update and load statistics
# -------------------------------------------------------------------------------------------
def update_bias(bias, load, gamma: float):
    """``b_i + gamma * sign(mean(c) - c_i)`` as a NEW float32 array (V3 section 2.1.2, docs/deepseek-v3.md §3.4).

    bias (E,) float32 e_score_correction_bias; load (E,) token counts of the routing actually
    used in the step (biased, group-limited; summed over layers' batches as the caller wishes);
    overloaded experts go down by gamma, underloaded ones up, experts at the mean stay.
    """
    bk = backend_of(bias, load)
    xp = bk.xp
    if bias.dtype != xp.float32:
        raise ValueError(
            f"update_bias: e_score_correction_bias is {bias.dtype}; it must stay float32 "
            "(pass the checkpoint's float32 tensor)"
        )
    if len(bias.shape) != 1 or tuple(load.shape) != tuple(bias.shape):
        raise ValueError(
            f"update_bias: bias {tuple(bias.shape)} and load {tuple(load.shape)} must both be (E,)"
        )
    gamma = float(gamma)
    if not gamma >= 0 or gamma == float("inf"):
        raise ValueError(f"update_bias: gamma={gamma} must be a finite number >= 0")
    c = xp.astype(load, xp.float64)  # (E,) exact for integer counts
    step = xp.sign(xp.mean(c) - c)  # (E,) -1 overloaded, +1 underloaded, 0 at the mean
    if on("bias_update.sign_flipped"):
        step = -step
    if on("bias_update.proportional"):
        step = xp.mean(c) - c
    return bias + xp.astype(step, xp.float32) * xp.asarray(gamma, dtype=xp.float32)  # (E,) float32


def expert_load_stats(load) -> dict:
    """Host-side summary of one step's expert loads for the training log (JSON-ready).

    ``{"load": [c_0..c_{E-1}], "total": sum, "mean": mean, "max": max, "min": min,
    "max_over_mean": max/mean, "min_over_mean": min/mean}``; max_over_mean is the imbalance
    (1.0 = perfectly balanced). Ratios are 0.0 when no token was routed.
    """
    bk = backend_of(load)
    host = [int(v) for v in bk.to_numpy(load).reshape(-1).tolist()]  # explicit host copy for the log
    if not host:
        raise ValueError("expert_load_stats: load is empty; pass the (E,) counts of a MoE layer")
    total = sum(host)
    mean = total / len(host)
    return {
        "load": host,
        "total": total,
        "mean": mean,
        "max": max(host),
        "min": min(host),
        "max_over_mean": max(host) / mean if mean else 0.0,
        "min_over_mean": min(host) / mean if mean else 0.0,
    }
