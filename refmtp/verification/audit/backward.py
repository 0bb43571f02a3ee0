"""Gradients against central differences, per layer (``--backward``): each block's and MTP
module's own backward, then the whole model for the shared tensors."""
from __future__ import annotations

import math

import numpy as np

from refmtp.model import backward, forward, routing_margin, routing_selection
from refmtp.model.block import block_backward, block_forward, sub_params
from refmtp.model.moe import routing_margin as moe_margin
from refmtp.model.moe import routing_selection as moe_selection
from refmtp.model.mtp import mtp_backward, mtp_forward
from refmtp.params import is_bias
from refmtp.verification.audit.context import AuditContext, moe_layers
from refmtp.verification.audit.steps import Recorder, check, num
from refmtp.verification.gradcheck import SelectionFlip, check_grad

GRAD_H = 5e-6  # central-difference step: truncation ~h^2 and rounding ~1e-15/h balance here
GRAD_TOL = 1e-6  # relative error threshold of the backward checks (project standard)
SHARED = ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight")  # checked on the whole model


def _grad_scope(cfg, component):
    """(which parameter names to check, whether to check layer inputs too) for a component."""
    moe_pre = tuple(f"model.layers.{layer}.mlp." for layer in moe_layers(cfg))
    rules = {
        "all": lambda n: True,
        "mla": lambda n: ".self_attn." in n,
        "moe": lambda n: n.startswith(moe_pre),
        "mtp": lambda n: n.startswith(tuple(f"model.layers.{cfg.num_hidden_layers + k - 1}."
                                            for k in range(1, cfg.D + 1))),
        "loss": lambda n: n in SHARED,
        "speculative": lambda n: False,
    }
    return rules[component], component in ("all", "mtp")


def _sampled_gradcheck(bk, fwd_full, bwd_full, inputs, names, *, coords, seed, h, selection=None):
    """Central differences on ``coords`` random coordinates of every tensor in ``names``, through
    :func:`refmtp.verification.gradcheck.check_grad`, judged on the LAYER's gradient scale.

    ``fwd_full(**inputs) -> (outputs dict, cache)``, ``bwd_full(dout dict, cache) -> grads``.
    A fixed random ``dout`` turns the outputs into one scalar ``L = sum(out * dout)``. Each tensor
    is checked by ``check_grad`` on a vector of its sampled entries plus one ANCHOR: the entry with
    the largest |dL/dw| in the whole layer. check_grad's denominator floor (1e-3 of the largest
    numeric gradient it sees) then equals 1e-3 of the layer's largest gradient: finite
    differences resolve a gradient only to ~1e-9 of the loss scale, so an entry a million times
    smaller than the layer's largest gradient is judged on that scale, not on its own.
    Returns ``{name: (TensorReport, worst coordinate as a list or "anchor")}`` or raises
    SelectionFlip.
    """
    xp = bk.xp
    rng = np.random.default_rng(seed)
    out0, c0 = fwd_full(**inputs)
    dout = {k: bk.asarray(rng.standard_normal(tuple(v.shape)), dtype="float64") for k, v in out0.items()}
    g = {n: np.asarray(bk.to_numpy(v), dtype=np.float64).reshape(-1)
         for n, v in bwd_full(dout, c0).items() if n in names}
    anchor = max(((n, int(np.argmax(np.abs(g[n])))) for n in names), key=lambda t: abs(g[t[0]][t[1]]))
    host = {n: np.asarray(bk.to_numpy(inputs[n]), dtype=np.float64).reshape(-1) for n in names}
    results = {}
    for name in names:
        size = host[name].size
        picks = [(name, int(j)) for j in rng.choice(size, size=min(coords, size), replace=False)]
        if anchor not in picks:
            picks.append(anchor)
        touched = sorted({n for n, _ in picks})
        where = {n: [p for p, (m, _) in enumerate(picks) if m == n] for n in touched}
        flat_idx = {n: xp.asarray([picks[p][1] for p in where[n]], dtype=xp.int64) for n in touched}
        sel_pos = {n: xp.asarray(where[n], dtype=xp.int64) for n in touched}

        def fwd(v, _t=touched, _fi=flat_idx, _sp=sel_pos):
            full = dict(inputs)
            for n in _t:
                flat = xp.reshape(xp.asarray(inputs[n], copy=True), (-1,))
                flat[_fi[n]] = xp.take(v, _sp[n])
                full[n] = xp.reshape(flat, tuple(inputs[n].shape))
            out, c = fwd_full(**full)
            return sum(xp.sum(out[k] * dout[k]) for k in out), c

        def bwd(dL, c, _picks=picks):
            gr = bwd_full({k: v * dL for k, v in dout.items()}, c)
            return {"v": xp.stack([xp.reshape(gr[n], (-1,))[j] for n, j in _picks])}

        v0 = bk.asarray(np.array([host[n][j] for n, j in picks]), dtype="float64")
        rep = check_grad(fwd, bwd, {"v": v0}, seed=seed, h=h, tol=GRAD_TOL, selection=selection,
                         raise_on_fail=False)["v"]
        wn, wj = picks[rep.worst_index[0]]
        worst = [int(x) for x in np.unravel_index(wj, tuple(inputs[wn].shape))] if wn == name else "anchor"
        results[name] = (rep, worst, len(picks))
    return results


def _grad_checks(results, names):
    """One check per tensor: its worst relative error against :data:`GRAD_TOL`."""
    checks = []
    for name in names:
        r, worst, n = results[name]
        checks.append(check(name, r.max_rel_error <= GRAD_TOL,
                            f"rel err {r.max_rel_error:.1e} at {worst} (analytic {r.analytic:.5e}, "
                            f"numeric {r.numeric:.5e}; {n - 1 if n > 1 else n} coords + anchor)"))
    return checks


def _step_for_margin(margin, h_default):
    """The finite-difference step for a piecewise function: h_default, or margin/4 when the
    smallest routing score gap is closer (no perturbation may flip a selection); a FAIL check
    when the gap is too small for any useful step."""
    h = min(h_default, margin / 4)
    if h >= 1e-7:
        return h, []
    return h_default, [check("routing margin leaves room for finite differences", False,
                             f"smallest routing score gap {margin:.1e}: pick another --seed")]


def audit_gradients(ctx: AuditContext, component: str, coords: int) -> list:
    """Per layer: the layer's own backward against central differences of the layer's forward
    (random dout on its outputs, so every parameter's gradient is O(1) and well resolved); then
    the whole model for the shared tensors, whose gradient runs back through every layer and
    depth (the composition: chain between depths, shared-gradient sums)."""
    cfg, xp = ctx.cfg, ctx.bk.xp
    L, D, T = cfg.num_hidden_layers, cfg.D, ctx.T
    keep, with_inputs = _grad_scope(cfg, component)
    causal = cfg.refmtp.mtp_kind == "causal"
    rec = Recorder("backward")

    def run(fwd, bwd, inputs, names, selection, h):
        try:
            return _sampled_gradcheck(ctx.bk, fwd, bwd, inputs, names, coords=coords, seed=ctx.seed, h=h,
                                      selection=selection), None
        except SelectionFlip as exc:
            return None, check("no routing flip under perturbation", False, str(exc))

    formula = (f"dL/dW vs (L(W + h e) - L(W - h e)) / 2h, L = sum(out * dout) with random dout, "
               f"{coords} random coords per tensor, float64")
    for layer in range(L + D):
        is_mtp = layer >= L
        pre = f"model.layers.{layer}."
        local = sub_params(ctx.params, pre)
        biases = {k: v for k, v in local.items() if is_bias(pre + k)}
        p = {k: v for k, v in local.items() if not is_bias(pre + k)}
        names = [k for k in sorted(p) if keep(pre + k)]
        if not names:
            continue
        moe = cfg.is_moe_layer(layer)
        if is_mtp and causal:
            k = layer - L + 1
            mc = ctx.cache.mtp[k - 1]
            Tk = T - k
            pos = xp.arange(Tk, dtype=xp.int64)
            inputs = {"emb": mc.enorm.x, "h_prev": mc.hnorm.x, **p}
            if with_inputs:
                names = ["emb", "h_prev"] + names

            def fwd(emb, h_prev, _layer=layer, _pos=pos, _b=biases, **q):
                n, y, aux, c = mtp_forward(emb, h_prev, {**q, **_b}, cfg, _layer, _pos)
                return ({"n": n, "y": y} if aux is None else {"n": n, "y": y, "aux": aux}), c

            def bwd(dout, c):
                demb, dh, g = mtp_backward(dout["n"], dout["y"], dout.get("aux"), c)
                return {**g, "emb": demb, "h_prev": dh}

            sel = (lambda c: moe_selection(c.block.ffn)) if moe else None
            margin = moe_margin(mc.block.ffn) if moe else math.inf
            title = f"MTP module {k} (layer {layer}, {'MoE' if moe else 'dense'}): mtp_backward"
            ref = "eqs. 21-23; docs/derivations/mtp.md"
        else:
            bc = ctx.cache.blocks[layer] if not is_mtp else ctx.cache.mtp[layer - L]
            Tl = int(bc.attn_norm.x.shape[1])
            pos = xp.arange(Tl, dtype=xp.int64)
            inputs = {"x": bc.attn_norm.x, **p}
            if with_inputs:
                names = ["x"] + names

            def fwd(x, _layer=layer, _pos=pos, _b=biases, **q):
                y, aux, c = block_forward(x, {**q, **_b}, cfg, _layer, _pos)
                return ({"y": y} if aux is None else {"y": y, "aux": aux}), c

            def bwd(dout, c):
                dx, g = block_backward(dout["y"], dout.get("aux"), c)
                return {**g, "x": dx}

            sel = (lambda c: moe_selection(c.ffn)) if moe else None
            margin = moe_margin(bc.ffn) if moe else math.inf
            head = f"parallel head {layer - L + 1} " if is_mtp else ""
            title = f"{head}layer {layer} ({'MoE' if moe else 'dense'}): block_backward"
            ref = "docs/deepseek-v3.md §1, §2.8, §3.5; docs/derivations/README.md"
        h, checks = _step_for_margin(margin, GRAD_H)
        reports, flip = run(fwd, bwd, inputs, names, sel, h=h)
        checks += [flip] if flip is not None else _grad_checks(reports, names)
        worst = max((reports[nm][0].max_rel_error for nm in names), default=0.0) if reports else math.inf
        rec.add(title, ref, formula + f", h = {h:.2g}", {"tensors": [len(names)]},
                {"worst rel err": [num(worst)], **({"routing margin": [num(margin)]} if moe else {})}, checks)

    names = [n for n in SHARED if keep(n)]
    if names:
        biases = {k: v for k, v in ctx.params.items() if is_bias(k)}
        inputs = {k: v for k, v in ctx.params.items() if not is_bias(k)}

        def fwd(**q):
            o, c = forward({**q, **biases}, cfg, ctx.tokens)
            return o.losses, c

        def bwd(dlosses, c):
            return backward(c, dlosses)

        margin = routing_margin(ctx.cache)
        h, checks = _step_for_margin(margin, GRAD_H)
        reports, flip = run(fwd, bwd, inputs, names, routing_selection, h=h)
        checks += [flip] if flip is not None else _grad_checks(reports, names)
        rec.add("whole model: shared tensors (gradient through every layer and depth)",
                "eq. 25; docs/derivations/mtp.md (sums of shared gradients)",
                formula.replace("L = sum(out * dout)", "L = sum_terms dout_term * loss_term") + f", h = {h:.2g}",
                {"tensors": [len(names)]},
                {"worst rel err": [num(max(r[0].max_rel_error for r in reports.values()))] if reports else [],
                 "routing margin": [num(margin)]},
                checks)
    return rec.steps  # empty for "speculative": decoding has no trainable math
