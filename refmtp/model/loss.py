"""The training loss: main LM loss, per-depth MTP losses and the MoE balance losses (V3 eqs. 17, 24, 25).

Inputs are the per-row cross-entropies from :func:`refmtp.model.ops.xent.xent_forward` (one row per
predicted token) and the per-layer balance losses ``aux_l`` returned by ``moe_forward`` (without
alpha). With B sequences of T main positions and D = num_nextn_predict_layers:

    L_main     = (1 / (B*T))  * sum over the B*T main rows            (next token t_{i+1})
    L_MTP^k    = (1 / N_k)    * sum over the B*(T-k) rows of depth k  (token t_{i+k+1})
                 N_k = B*T (paper eq. 24, cfg.refmtp.mtp_loss_norm == "paper")
                 N_k = B*(T-k)                             (== "valid_mean", Megatron)
    L_balance  = alpha * sum over every MoE layer l (MTP blocks included) of aux_l   (eq. 17)
    L_total    = L_main + (lambda / D) * sum_k L_MTP^k + L_balance                  (eq. 25)

with lambda = cfg.refmtp.mtp_lambda and alpha = cfg.refmtp.seq_aux_alpha. The reported terms are
``losses["main"]``, ``losses["mtp.k"]`` (= L_MTP^k, before lambda/D), ``losses["balance"]``
(already times alpha) and ``losses["total"]``. The same formulas serve the parallel heads
(cfg.refmtp.mtp_kind == "parallel"), head k in place of depth k.

Backward (every term is linear in its rows), for upstream gradients g_main, g_k, g_bal, g_tot:

    d rows_main = (g_main + g_tot) / (B*T)
    d rows_k    = (g_k + g_tot * lambda / D) / N_k
    d aux_l     = alpha * (g_bal + g_tot)

The whole-model backward calls it with g_tot = 1 and the other upstream gradients 0.
Derivation: docs/derivations/cross-entropy.md and docs/derivations/mtp.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from refmtp.backends import backend_of
from refmtp.mutation import on


@dataclass(frozen=True, slots=True)
class LossCache:
    main_rows: Any  # (B*T,) kept for shape, dtype and backend of the gradients
    n_rows: tuple  # (B*(T-k) for k = 1..D) rows of each depth
    main_norm: float  # B*T
    mtp_norms: tuple  # N_k for k = 1..D
    mtp_weight: float  # lambda / D (0 when D == 0)
    alpha: float  # seq_aux_alpha
    aux_layers: tuple  # MoE layer indices, in the order of ``aux``


class LossGrads(NamedTuple):
    dmain_rows: Any  # (B*T,)
    dmtp_rows: list  # D arrays, depth k: (B*(T-k),)
    daux: dict  # {MoE layer: scalar array}, d total / d aux_l


def mtp_normaliser(cfg, B: int, T: int, k: int) -> int:
    """N_k of depth k: B*T (paper eq. 24) or B*(T-k) (valid_mean)."""
    return B * T if cfg.refmtp.mtp_loss_norm == "paper" else B * (T - k)


def loss_forward(main_rows, mtp_rows: list, aux: dict, cfg, B: int, T: int):
    """Assemble the loss terms (module docstring).  main_rows (B*T,), mtp_rows[k-1] (B*(T-k),),
    aux {layer: scalar} -> (losses: dict of scalar arrays, LossCache)."""
    xp = backend_of(main_rows, *mtp_rows).xp
    D = len(mtp_rows)
    if main_rows.shape != (B * T,):
        raise ValueError(f"loss: main rows have shape {tuple(main_rows.shape)}, expected ({B * T},)")
    for k, rows in enumerate(mtp_rows, start=1):
        if rows.shape != (B * (T - k),):
            raise ValueError(
                f"loss: depth {k} rows have shape {tuple(rows.shape)}, expected ({B * (T - k)},)"
            )
    alpha = 1.0 if on("balance.alpha_dropped") else float(cfg.refmtp.seq_aux_alpha)
    if on("balance.alpha_zero"):
        alpha = 0.0
    weight = float(cfg.refmtp.mtp_lambda) / D if D else 0.0
    if on("loss.mtp_weight_no_D"):
        weight = float(cfg.refmtp.mtp_lambda)
    if on("loss.mtp_no_lambda"):
        weight = 1.0
    norms = tuple(mtp_normaliser(cfg, B, T, k) for k in range(1, D + 1))
    if on("loss.mtp_norm_valid_rows"):
        norms = tuple(B * (T - k) for k in range(1, D + 1))
    dtype = main_rows.dtype
    if on("balance.mtp_layers_excluded"):
        aux = {layer: a for layer, a in aux.items() if layer < cfg.num_hidden_layers}

    losses = {"main": xp.sum(main_rows) / (1 if on("loss.main_sum") else B * T)}  # L_main, mean over B*T
    total = losses["main"]
    for k, (rows, n) in enumerate(zip(mtp_rows, norms), start=1):
        losses[f"mtp.{k}"] = xp.sum(rows) / n  # L_MTP^k (eq. 24)
        total = total + weight * losses[f"mtp.{k}"]  # (lambda/D) sum_k L_MTP^k (eq. 25)
    balance = xp.zeros((), dtype=dtype)
    for layer in sorted(aux):
        balance = balance + xp.astype(xp.asarray(aux[layer]), dtype)  # sum over MoE layers
    losses["balance"] = alpha * balance  # alpha * sum_l aux_l (eq. 17)
    losses["total"] = total + losses["balance"]
    losses = {name: xp.asarray(v, dtype=dtype) for name, v in losses.items()}  # 0-d arrays
    cache = LossCache(main_rows=main_rows, n_rows=tuple(int(r.shape[0]) for r in mtp_rows),
                      main_norm=float(B * T), mtp_norms=tuple(float(n) for n in norms),
                      mtp_weight=weight, alpha=alpha, aux_layers=tuple(sorted(aux)))
    return losses, cache


def loss_backward(dlosses: dict, cache: LossCache) -> LossGrads:
    """Gradients of ``sum_name dlosses[name] * losses[name]`` (missing names count as 0).

    forward ``L_main = sum(rows)/(B*T)``  ->  ``d rows = g_main / (B*T)`` (and likewise per term);
    ``total`` adds its upstream gradient to every term with the term's weight in eq. 25.
    """
    xp = backend_of(cache.main_rows).xp
    known = {"main", "balance", "total"} | {f"mtp.{k}" for k in range(1, len(cache.n_rows) + 1)}
    for name in dlosses:
        if name not in known:
            raise ValueError(f"loss_backward: unknown loss term {name!r} (known: {sorted(known)})")
    g_tot = dlosses.get("total", 0.0)
    ones = xp.ones_like(cache.main_rows)  # (B*T,)
    dmain = ones * ((dlosses.get("main", 0.0) + g_tot) / cache.main_norm)
    dmtp = []
    for k, (n_rows, norm) in enumerate(zip(cache.n_rows, cache.mtp_norms), start=1):
        g = dlosses.get(f"mtp.{k}", 0.0) + g_tot * cache.mtp_weight
        dmtp.append(xp.ones((n_rows,), dtype=ones.dtype) * (g / norm))  # (B*(T-k),)
    g_aux = cache.alpha * (dlosses.get("balance", 0.0) + g_tot)
    daux = {layer: xp.asarray(g_aux * xp.ones((), dtype=ones.dtype)) for layer in cache.aux_layers}
    return LossGrads(dmain_rows=dmain, dmtp_rows=dmtp, daux=daux)
