"""The DeepSeekMoE router (``mlp.gate``): affinities, group-limited top-K selection, gate values.

V3 (``scoring_func="sigmoid"``, ``topk_method="noaux_tc"``; V3 eqs. 13-16, docs/deepseek-v3.md §3.2)::

    z  = x Wg^T                                     (N, E) router logits
    s  = sigmoid(z)                                 eq. 15, the affinities
    sc = s + b                                      eq. 16, b = e_score_correction_bias: selection only
    group score_g = sum of the top-2 sc in group g  (n_group groups of E/G experts)
    keep the topk_group best groups; every expert of another group gets sc = -inf
    S  = TopK(sc, K)                                the selected experts, ties -> lowest index
    g_i = rho * s_i / (sum_{j in S} s_j + 1e-20)    eq. 13 (norm_topk_prob) times routed_scaling_factor

V2 (``scoring_func="softmax"``; docs/deepseek-v3.md §3.3): ``s = softmax(z)`` over all experts, no bias,
``topk_method="greedy"`` (plain top-K of s) or ``"group_limited_greedy"`` (group score = max s
in the group, then as above); ``g_i = rho * s_i``, or with ``norm_topk_prob``
``g_i = s_i / (sum_{j in S} s_j + 1e-20)`` with NO rho: the rule of DeepSeek-V2's own
modeling_deepseek.py (normalise, else scale). The sources disagree here (HF and DeepSeek's
inference code never normalise softmax gates); see docs/math-decisions.md.

So the gate values are ``c * w / D`` (normalised) or ``c * w`` with the constant
``c = gate_scale(cfg)``: rho, except 1 for softmax with norm_topk_prob.

Backward (the selection S is piecewise constant: it has no gradient; b gets none)::

    norm:    g = c w / D, w = s[S], D = sum w + 1e-20     ->  dw = c (dg - sum(dg w)/D) / D
    no norm: g = c w                                      ->  dw = c dg
    ds = scatter of dw to the selected columns (+ the balance loss' ds, if any)
    sigmoid: dz = ds s (1 - s);    softmax: dz = s (ds - sum_j ds_j s_j)
    dWg = dz^T x;  dx = dz Wg

The derivation is in docs/derivations/router.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from refmtp.backends import backend_of
from refmtp.mutation import on

NORM_EPS = 1e-20  # HF adds it to the top-K denominator (docs/deepseek-v3.md §3.2 step 5)


@dataclass(frozen=True, slots=True)
class RouterCache:
    x: Any  # (N, d) router input, for dWg
    weight: Any  # (E, d) gate.weight, for dx
    s: Any  # (N, E) affinities (sigmoid or softmax), unbiased
    sel_scores: Any  # (N, E) scores the top-K ran on: s + b (noaux_tc) or s, -inf outside kept groups
    group_scores: Any  # (N, G) group scores when groups limited the choice, else None
    topk_idx: Any  # (N, K) int64 selected experts, descending selection score
    topk_s: Any  # (N, K) s of the selected experts (w in the backward)
    denom: Any  # (N, 1) sum of topk_s + 1e-20 when norm_topk_prob, else None
    scoring_func: str  # "sigmoid" | "softmax"
    topk_group: int  # groups kept per token (only meaningful when group_scores is not None)
    scale: float  # c = gate_scale(cfg): rho, or 1 for softmax with norm_topk_prob


class RouterGrads(NamedTuple):
    dx: Any  # (N, d)
    dweight: Any  # (E, d) gradient of gate.weight (e_score_correction_bias has none)


def sigmoid(z, xp):
    """Overflow-free logistic: ``1/(1+e^-z)`` for z >= 0, ``e^z/(1+e^z)`` for z < 0."""
    e = xp.exp(-xp.abs(z))  # in (0, 1]: never overflows
    return xp.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def softmax(z, xp):
    """Softmax over the last axis with the row max subtracted (no overflow)."""
    e = xp.exp(z - xp.max(z, axis=-1, keepdims=True))
    return e / xp.sum(e, axis=-1, keepdims=True)


def gate_scale(cfg) -> float:
    """The constant ``c`` the (possibly normalised) gate values are multiplied by.

    ``routed_scaling_factor`` (rho), except 1.0 for ``scoring_func="softmax"`` with
    ``norm_topk_prob``: DeepSeek-V2's modeling_deepseek.py either normalises or scales
    (``if top_k > 1 and norm_topk_prob: w / sum(w) else: w * rho``), never both. V3's sigmoid
    router normalises and then scales (weights sum to rho). docs/math-decisions.md.
    """
    if cfg.scoring_func == "softmax" and cfg.norm_topk_prob:
        return 1.0
    return float(cfg.routed_scaling_factor)


def _group_limit(sc, cfg, bk, group_sc=None):
    """Mask every expert outside the topk_group best groups with -inf (docs/deepseek-v3.md §3.2 step 4).

    Group score: sum of the top-2 scores in the group (sigmoid / noaux_tc, HF and DS-M with a
    bias) or the max (softmax / group_limited_greedy, V2). Returns (masked scores, group scores),
    or (sc, None) when no group can be dropped (n_group == 1 or topk_group == n_group).
    """
    xp = bk.xp
    N, E = sc.shape
    G, TG = cfg.n_group, cfg.topk_group
    if G == 1 or TG >= G:
        return sc, None
    grouped = xp.reshape(sc, (N, G, E // G))  # (N, G, E/G)
    if group_sc is not None:  # mutants only: group scores from other scores than sc
        grouped_scores = xp.reshape(group_sc, (N, G, E // G))
    else:
        grouped_scores = grouped
    if cfg.scoring_func == "sigmoid" and not on("router.group_score_max"):
        _, top2 = bk.topk(grouped_scores, 2)  # (N, G, 2)
        group_scores = xp.sum(top2, axis=-1)  # (N, G)
    else:
        group_scores = xp.max(grouped_scores, axis=-1)  # (N, G)
    gidx, _ = bk.topk(group_scores, TG)  # (N, TG) kept groups, ties -> lowest group
    keep = xp.any(gidx[:, :, None] == xp.arange(G)[None, None, :], axis=1)  # (N, G)
    # -inf, not 0: masking with 0 lets a masked group win when biased scores are negative
    # (transformers#45440); the V3 checkpoint's biases hide the difference, random ones do not.
    neg_inf = xp.full_like(grouped, 0.0 if on("router.mask_zero") else float("-inf"))
    masked = xp.where(keep[:, :, None], grouped, neg_inf)  # (N, G, E/G)
    return xp.reshape(masked, (N, E)), group_scores


def check_router(x, weight, bias, cfg) -> None:
    """The router's contract (one-line ValueErrors): gate.weight (E, d); the float32 bias for
    noaux_tc and none for the V2 methods. Called once at an entry point (tests; the MoE layer's
    check_moe covers it); :func:`router_forward` assumes it holds."""
    xp = backend_of(x, weight, bias).xp
    N, d = x.shape
    E = cfg.n_routed_experts
    if weight.shape != (E, d):
        raise ValueError(
            f"router: gate.weight has shape {tuple(weight.shape)}, expected ({E}, {d}) = "
            "(n_routed_experts, hidden_size)"
        )
    if cfg.topk_method == "noaux_tc":
        if bias is None or bias.shape != (E,) or bias.dtype != xp.float32:
            got = "None" if bias is None else f"{tuple(bias.shape)} {bias.dtype}"
            raise ValueError(
                f"router: noaux_tc needs gate.e_score_correction_bias of shape ({E},) float32, "
                f"got {got}: keep the bias in float32 as in the checkpoint"
            )
    elif bias is not None:
        raise ValueError(
            f"router: topk_method={cfg.topk_method!r} (V2) uses no e_score_correction_bias: "
            "drop it or use noaux_tc"
        )


def router_forward(x, weight, bias, cfg):
    """Route N tokens: x (N, d), gate.weight (E, d), bias (E,) float32 or None.

    Returns ``(topk_idx (N, K) int64, topk_weight (N, K), RouterCache)``. ``bias`` must be the
    float32 ``e_score_correction_bias`` for ``noaux_tc`` and None for the V2 methods (V2 has no
    bias). V3 eqs. 13-16; docs/deepseek-v3.md §3.2-3.3.
    """
    bk = backend_of(x, weight, bias)
    xp = bk.xp
    K = cfg.num_experts_per_tok
    z = x @ weight.T  # (N, E) router logits
    if cfg.scoring_func == "sigmoid" and not on("router.softmax_scores"):
        s = sigmoid(z, xp)  # (N, E) eq. 15
        sc = s + bias  # (N, E) eq. 16: the bias shifts the selection only
        if on("router.bias_ignored"):
            sc = s
        if on("router.sigmoid_of_biased_logits"):
            sc = sigmoid(z + bias, xp)
    else:
        s = softmax(z, xp)  # (N, E) V2
        sc = s if bias is None else s + bias  # V2 has no bias; router.softmax_scores keeps V3's
    if cfg.topk_method == "greedy" or on("router.no_group_limit"):
        masked, group_scores = sc, None
    else:
        masked, group_scores = _group_limit(sc, cfg, bk, s if on("router.group_score_unbiased") else None)  # (N, E)
    topk_idx, _ = bk.topk(masked, K)  # (N, K) ties -> lowest expert index, on every backend
    topk_s = bk.gather(s, topk_idx, axis=-1)  # (N, K) gate values use the UNBIASED s
    if on("router.bias_in_gate_values"):
        topk_s = bk.gather(sc, topk_idx, axis=-1)
    if cfg.norm_topk_prob and not on("router.no_renormalisation"):
        denom = xp.sum(topk_s, axis=-1, keepdims=True) + NORM_EPS  # (N, 1)
        if on("router.renormalise_over_all"):
            denom = xp.sum(s, axis=-1, keepdims=True) + NORM_EPS
        w = topk_s / denom  # (N, K) eq. 13
    else:
        denom = None
        w = topk_s
    # c = rho: V3 sigmoid normalises THEN scales (HF, DeepSeek inference, the V3 hub code);
    # c = 1 for softmax + norm_topk_prob: the V2 hub code normalises INSTEAD of scaling.
    c = 1.0 if on("router.no_scaling") else gate_scale(cfg)
    if on("router.scaling_twice"):
        c = c * c
    topk_weight = w * c  # (N, K)
    cache = RouterCache(x=x, weight=weight, s=s, sel_scores=masked, group_scores=group_scores,
                        topk_idx=topk_idx, topk_s=topk_s, denom=denom,
                        scoring_func=cfg.scoring_func, topk_group=cfg.topk_group, scale=c)
    return topk_idx, topk_weight, cache


def router_backward(dtopk_weight, cache: RouterCache, dscores=None) -> RouterGrads:
    """Gradient of the gate values (and optionally of the affinities) into x and gate.weight.

    dtopk_weight (N, K); dscores (N, E) or None: an extra gradient on s (the balance loss).
    With S fixed, c = gate_scale(cfg) (rho, or 1 for softmax + norm_topk_prob) and
    D = sum_{j in S} s_j + 1e-20 (docs/deepseek-v3.md §3.5):

        dg/ds_k = c (delta_ik D - s_i) / D^2              ->  dw = c (dg - sum(dg w)/D) / D
        ds_e = dw at the selected columns + dscores
        sigmoid: dz = ds s (1 - s)      softmax: dz = s (ds - sum_j ds_j s_j)
        dWg = dz^T x,  dx = dz Wg
    """
    bk = backend_of(dtopk_weight, cache.s)
    xp = bk.xp
    c = cache
    N, E = c.s.shape
    scale = c.scale
    # forward: g = scale * w / D (or scale * w)  ->  dw
    if c.denom is not None:
        dot = xp.sum(dtopk_weight * c.topk_s, axis=-1, keepdims=True)  # (N, 1) sum_i dg_i w_i
        if on("router.backward_no_norm_term"):
            dot = 0.0 * dot
        dw = (dtopk_weight - dot / c.denom) * (scale / c.denom)  # (N, K)
    else:
        dw = dtopk_weight * scale  # (N, K)
    # forward: w = s[topk_idx]  ->  ds[n, topk_idx[n, k]] += dw[n, k] (distinct within a row)
    flat = xp.reshape(c.topk_idx + E * xp.arange(N, dtype=c.topk_idx.dtype)[:, None], (-1,))
    ds = xp.zeros((N * E,), dtype=c.s.dtype)
    bk.scatter_add(ds, flat, xp.reshape(dw, (-1,)))
    ds = xp.reshape(ds, (N, E))  # (N, E)
    if dscores is not None:
        ds = ds + dscores
    # forward: s = sigmoid(z) or softmax(z)
    if c.scoring_func == "sigmoid":
        dz = ds * c.s * (1.0 - c.s)  # (N, E)
    else:
        dz = c.s * (ds - xp.sum(ds * c.s, axis=-1, keepdims=True))  # (N, E)
    # forward: z = x Wg^T
    dweight = dz.T @ c.x  # (E, d)
    dx = dz @ c.weight  # (N, d)
    return RouterGrads(dx=dx, dweight=dweight)


def router_margin(cache: RouterCache) -> float:
    """Smallest score gap behind any discrete routing decision (inf if there is none).

    The kept groups (topk_group-th vs next group score) and the K selected experts among the
    kept groups (K-th vs (K+1)-th selection score). Gradient-check fixtures assert this is far
    above the finite-difference step, so no perturbation flips the selection.
    """
    bk = backend_of(cache.s)
    xp = bk.xp
    gaps = []
    if cache.group_scores is not None:
        g = -xp.sort(-cache.group_scores, axis=-1)  # (N, G) descending
        gaps.append(float(xp.min(g[:, cache.topk_group - 1] - g[:, cache.topk_group])))
    masked = cache.sel_scores  # (N, E)
    K = cache.topk_idx.shape[1]
    if masked.shape[1] > K:
        v = -xp.sort(-masked, axis=-1)  # (N, E) descending; -inf after the kept experts
        gap = v[:, K - 1] - v[:, K]  # inf where expert K+1 was masked
        gaps.append(float(xp.min(gap)))
    return min(gaps) if gaps else float("inf")

