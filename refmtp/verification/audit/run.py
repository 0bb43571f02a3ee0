"""The audit's entry point, :func:`run_audit`: load the model, take the reference, run the
forward once, then every auditor in order (docs/audit.md)."""
from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np

from refmtp.backends import backend_of
from refmtp.model import forward
from refmtp.verification.audit.backward import audit_gradients
from refmtp.verification.audit.context import AUDIT_B, AUDIT_T, AuditContext, load_audit_model
from refmtp.verification.audit.corruptions import CORRUPTIONS
from refmtp.verification.audit.loss import audit_loss
from refmtp.verification.audit.mla import audit_mla
from refmtp.verification.audit.moe import audit_moe
from refmtp.verification.audit.mtp import audit_mtp
from refmtp.verification.audit.report import COMPONENTS, AuditReport
from refmtp.verification.audit.speculative import audit_speculative

AUDITORS = {"mla": audit_mla, "moe": audit_moe, "mtp": audit_mtp, "loss": audit_loss,
            "speculative": audit_speculative}


def run_audit(*, preset=None, ckpt=None, config=None, component: str = "all", position=None,
              batch_row: int = 0, backward: bool = False, seed: int = 0, backend="numpy",
              corrupt=None, coords: int = 2, cfg=None, params=None) -> AuditReport:
    """Run the audit and return its :class:`AuditReport` (see the package docstring).

    ``component``: one of :data:`COMPONENTS` or "all". ``position`` (default T-D-1) and
    ``batch_row`` pick the values shown. ``corrupt``: a name in :data:`CORRUPTIONS` or a
    callable ``f(params, cfg)`` applied to the parameters the library runs on AFTER the
    reference is taken. ``cfg``/``params`` (both) audit an in-memory model (reference = a host
    copy of ``params``). Bad input raises ValueError (or ConfigError) with one line.
    """
    t0 = time.perf_counter()

    if component != "all" and component not in COMPONENTS:
        raise ValueError(f"component {component!r} is not known: choose one of {', '.join(COMPONENTS)}, all")
    if isinstance(coords, bool) or not isinstance(coords, int) or coords < 1:
        raise ValueError(f"coords={coords!r} must be an integer >= 1")
    if (cfg is None) != (params is None):
        raise ValueError("run_audit: pass cfg and params together")
    if cfg is not None:
        if any(x is not None for x in (preset, ckpt, config)):
            raise ValueError("run_audit: cfg/params exclude preset, ckpt and config")
        bk = backend_of(*params.values())
        ref = {k: np.array(bk.to_numpy(v), dtype=np.float64) for k, v in params.items()}
        params = dict(params)
        source = "in-memory model"
    else:
        cfg, params, ref, source = load_audit_model(preset=preset, ckpt=ckpt, config=config, seed=seed,
                                                    backend=backend)
        bk = backend_of(*params.values())
    if corrupt is not None:
        fn = CORRUPTIONS.get(corrupt) if isinstance(corrupt, str) else corrupt
        if fn is None:
            raise ValueError(f"unknown corruption {corrupt!r}: choose one of {', '.join(CORRUPTIONS)}")
        fn(params, cfg)
    B, T = AUDIT_B, max(AUDIT_T, cfg.D + 2)
    if position is None:
        position = T - cfg.D - 1
    if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position < T:
        raise ValueError(f"position={position!r} must be an integer in 0..{T - 1} (T={T})")
    if isinstance(batch_row, bool) or not isinstance(batch_row, int) or not 0 <= batch_row < B:
        raise ValueError(f"batch row {batch_row!r} must be 0..{B - 1} (the audit batch has B={B})")
    tok = np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(B, T + 1), dtype=np.int64)
    ctx = AuditContext(cfg=cfg, params=params, ref=ref, bk=bk, tokens=bk.asarray(tok, dtype="int64"), tok=tok,
                       B=B, T=T, i=position, b=batch_row, seed=seed)
    ctx.out, ctx.cache = forward(params, cfg, ctx.tokens)

    comps = list(COMPONENTS) if component == "all" else [component]
    steps = []
    for comp in comps:
        steps += AUDITORS[comp](ctx)
    if backward:
        steps += audit_gradients(ctx, component, coords)  # nothing for "speculative"
    meta = {
        "source": source, "seed": seed, "backend": bk.name, "dtype": "float64", "B": B, "T": T,
        "position": position, "batch_row": batch_row, "component": component, "backward": bool(backward),
        "corrupt": (corrupt if isinstance(corrupt, str) or corrupt is None
                    else getattr(corrupt, "__name__", "callable")),
        "tokens[b]": [int(v) for v in tok[batch_row]],
        "config": {k: getattr(cfg, k) for k in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_nextn_predict_layers",
            "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
            "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok", "n_group",
            "topk_group", "routed_scaling_factor", "scoring_func", "topk_method", "first_k_dense_replace")},
        "refmtp": asdict(cfg.refmtp),
    }
    report = AuditReport(meta=meta, steps=steps)
    report.meta["seconds"] = round(time.perf_counter() - t0, 3)
    return report
