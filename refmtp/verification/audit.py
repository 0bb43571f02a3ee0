"""``refmtp audit``: the model's math, step by step, each step checked independently.

    report = run_audit(preset="tiny", components="all", backward=True)
    print(report.render("markdown")); report.passed

The audit runs ONE small input (B=2 sequences of T=8 tokens, drawn from ``seed``) through the
library's own functions (``model.forward``, ``mla_forward``, ``moe_forward``, the decoder, the
acceptance rule, ...) and prints, for every step in order: the DeepSeek-V3 report's equation
number (or the spec section where the paper is silent), the formula, the shapes, a few values
at the chosen position ``i`` and batch row ``b``, and one or more checks, each ``pass`` or
``FAIL``. Components: ``mla`` (layer 0), ``moe`` (the first MoE layer), ``mtp`` (every depth),
``loss``, ``speculative`` (one verification step) and, with ``backward=True``, ``backward``
(central differences per layer and parameter). docs/audit.md lists every step and check.

Independence (the rule every check follows). A check never re-runs the code it checks. It
either

* recomputes the step with a DIFFERENT formula on the host, in float64 numpy / ``math.fsum``
  (explicit row blocks instead of reshape/permute, ``logaddexp.reduce`` instead of
  max-subtracted exp, complex multiplication instead of the pair rotation, per-token loops
  instead of the dispatch permutation, ...), or
* verifies an identity the step must satisfy (RoPE preserves norms and only relative positions
  matter; absorbed and naive attention scores agree; softmax rows sum to 1; selected gate values
  sum to ``routed_scaling_factor``; the latent-cache decoder reproduces the full forward; the
  speculative output at temperature 0 equals greedy decoding).

This module therefore imports numpy directly: every independent recomputation happens
explicitly on the host, after ``bk.to_numpy``, never on the library's code path.

Reference weights. Recomputations that read weights read them from a REFERENCE copy: the
checkpoint file itself (``--ckpt``: ``model.safetensors`` read with safetensors directly, not
through :func:`refmtp.checkpoint.load_checkpoint`, including each MTP module's own
``embed_tokens`` / ``shared_head.head`` copies), or, for a preset or config, a host snapshot of
the initialised parameters taken before anything else runs. A weight that differs between the
reference and the parameters the library runs on (a loader or conversion bug: RoPE rows
permuted, ``eh_proj`` halves swapped, latent and RoPE rows of ``kv_a_proj_with_mqa``
exchanged) makes the check of the step that reads it fail. ``corrupt=`` (CLI ``--corrupt``)
injects such faults on purpose (:data:`CORRUPTIONS`) to show the checks can fail; a fault
written INTO the checkpoint file is a different model and no identity can see it (docs/audit.md).
"""
from __future__ import annotations

import cmath
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from refmtp.backends import backend_of, get_backend
from refmtp.config import ModelConfig
from refmtp.config import preset as get_preset

COMPONENTS = ("mla", "moe", "mtp", "loss", "speculative")
FORMATS = ("text", "markdown", "json")
AUDIT_B = 2  # sequences in the audit batch
AUDIT_T = 8  # main positions (the window has T+1 tokens)
AUDIT_STD = 0.3  # weight std of preset/config runs: attention and routing far from uniform
AUDIT_BIAS_STD = 0.1  # non-zero e_score_correction_bias that changes some selections
TOL = 1e-10  # identities in float64, relative to max(1, |reference|)
GRAD_H = 5e-6  # central-difference step: truncation ~h^2 and rounding ~1e-15/h balance here

GRAD_TOL = 1e-6  # relative error threshold of the backward checks (project standard)
MAX_PARAMS = 50_000_000  # the audit runs the whole model in float64 on one small batch
TEMPERATURE = 1.0  # speculative step: sampled drafts and target rows at this temperature
FORMAT_VERSION = 1

TITLES = {
    "mla": "Multi-head Latent Attention, layer 0 (V3 eqs. 1-11; spec 2)",
    "moe": "DeepSeekMoE routing and experts (V3 eqs. 12-20; spec 3)",
    "mtp": "causal multi-token prediction (V3 eqs. 21-25; spec 4)",
    "loss": "training loss: cross-entropy, MTP weights, balance loss (V3 eqs. 17, 24, 25)",
    "speculative": "one self-speculative decoding step (spec-SD 1-3; spec 4.6)",
    "backward": "gradients vs central differences, per layer (float64)",
}


# -------------------------------------------------------------------------------------------
# records
# -------------------------------------------------------------------------------------------
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
    ref: str  # "eq. 8" / "spec 3.2 step 4"
    formula: str  # plain text
    shapes: dict  # name -> list of ints
    values: dict  # name -> a few numbers at (b, i)
    checks: list  # Check records

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)


@dataclass
class AuditReport:
    meta: dict
    steps: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(s.passed for s in self.steps)

    @property
    def components(self) -> list:
        seen = []
        for s in self.steps:
            if s.component not in seen:
                seen.append(s.component)
        return seen

    def counts(self) -> dict:
        """component -> {"steps", "checks", "failed"} (failed counts checks)."""
        out = {}
        for comp in self.components:
            steps = [s for s in self.steps if s.component == comp]
            checks = [c for s in steps for c in s.checks]
            out[comp] = {"steps": len(steps), "checks": len(checks),
                         "failed": sum(1 for c in checks if not c.passed)}
        return out

    def failures(self) -> list:
        return [(s, c) for s in self.steps for c in s.checks if not c.passed]

    # -- rendering ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        comps = []
        for comp in self.components:
            comps.append({"name": comp, "title": TITLES.get(comp, comp),
                          "steps": [_step_dict(s) for s in self.steps if s.component == comp]})
        return {"refmtp_audit": FORMAT_VERSION, "meta": self.meta, "components": comps,
                "summary": self.counts(), "passed": self.passed}

    def render(self, fmt: str = "text") -> str:
        if fmt == "json":
            return json.dumps(self.to_dict(), indent=1, allow_nan=False)
        if fmt == "markdown":
            return _render_markdown(self)
        if fmt == "text":
            return _render_text(self)
        raise ValueError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")


def _step_dict(s: Step) -> dict:
    d = asdict(s)
    d["passed"] = s.passed
    return d


# -------------------------------------------------------------------------------------------
# small host helpers
# -------------------------------------------------------------------------------------------
def _num(x):
    """A JSON-safe float (4 significant digits kept by the renderers), or a string for inf/nan."""
    x = float(x)
    if math.isfinite(x):
        return float(f"{x:.6g}")
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def _few(a, n: int = 4) -> list:
    a = np.asarray(a).reshape(-1)
    return [_num(v) for v in a[:n]]


def _shape(a) -> list:
    return [int(s) for s in a.shape]


def _maxdiff(got, want) -> float:
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return math.inf
    same = (got == want)  # equal infinities count as 0
    with np.errstate(invalid="ignore"):
        d = np.where(same, 0.0, np.abs(got - want))
    return float(np.max(d)) if d.size else 0.0


def _close(name, got, want, tol=TOL, what="max |diff|") -> Check:
    """got == want up to ``tol * max(1, max|want|)`` (shapes must agree)."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return Check(name, False, f"shape {got.shape} != expected {want.shape}")
    fin = want[np.isfinite(want)]
    scale = max(1.0, float(np.max(np.abs(fin))) if fin.size else 1.0)
    d = _maxdiff(got, want)
    return Check(name, d <= tol * scale, f"{what} {d:.2e} (tol {tol * scale:.0e})")


def _check(name, cond, detail) -> Check:
    return Check(name, bool(cond), detail)


def _fdot(a, b) -> float:
    """Exactly rounded dot product (math.fsum of the products)."""
    return math.fsum(float(x) * float(y) for x, y in zip(np.reshape(a, -1), np.reshape(b, -1)))


def _fmatvec(W, x) -> np.ndarray:
    """W (out, in) times x (in,), every entry an exactly rounded sum."""
    return np.array([_fdot(row, x) for row in W])


def _rmsnorm_check(name, y, x, w, eps) -> Check:
    """RMSNorm identity without its formula: ``y/w`` is a positive multiple of ``x`` and has
    mean square ``ms/(ms+eps)`` (ms = mean(x^2)); together these pin y down."""
    y, x, w = (np.asarray(a, dtype=np.float64) for a in (y, x, w))
    ok = np.abs(w) > 1e-12
    n = np.where(ok, y / np.where(ok, w, 1.0), 0.0)
    xk = np.where(ok, x, 0.0)
    ms = np.mean(x * x, axis=-1)
    ms_k = np.mean(xk * xk, axis=-1)
    want_ms = ms_k / (ms + eps)  # columns with w = 0 are left out of both sides
    got_ms = np.mean(n * n, axis=-1)
    cos = np.sum(n * xk, axis=-1) / np.maximum(
        np.sqrt(np.sum(n * n, axis=-1) * np.sum(xk * xk, axis=-1)), 1e-300)
    d_ms = float(np.max(np.abs(got_ms - want_ms)))
    d_cos = float(np.max(np.abs(cos - 1.0)))
    return _check(name, d_ms <= TOL and d_cos <= TOL,
                  f"max |mean((y/w)^2) - ms/(ms+eps)| {d_ms:.1e}, max |cos(y/w, x) - 1| {d_cos:.1e}")


def _logsoftmax(z, axis=-1):
    """log softmax by pairwise ``logaddexp.reduce`` (not the max-subtracted exp of the library)."""
    return z - np.logaddexp.reduce(z, axis=axis, keepdims=True)


def _host_ce(logits, targets):
    """Per-row cross-entropy ``logaddexp.reduce(z) - z[y]``, host float64."""
    z = np.asarray(logits, dtype=np.float64)
    lse = np.logaddexp.reduce(z, axis=-1)
    picked = np.take_along_axis(z, np.asarray(targets)[:, None], axis=-1)[:, 0]
    return lse - picked


def _silu(a):
    return a / (1.0 + np.exp(-a))


def _host_swiglu(x, wg, wu, wd):
    """down(silu(x gate^T) * x up^T), written with silu(a) = a / (1 + e^-a)."""
    return (_silu(x @ wg.T) * (x @ wu.T)) @ wd.T


def _topk_set(scores, K) -> list:
    """Indices of the K largest scores, ties -> lowest index (sorted by (-score, index))."""
    order = sorted(range(len(scores)), key=lambda e: (-float(scores[e]), e))
    return order[:K]


def _get_mscale(s, m):
    return 1.0 if s <= 1.0 else 0.1 * m * math.log(s) + 1.0


def _host_rope(cfg):
    """(theta'_j for j < Dr/2, magnitude factor a), from the spec 2.4 text (independent code)."""
    Dr, base = cfg.qk_rope_head_dim, float(cfg.rope_theta)
    theta = [base ** (-2.0 * j / Dr) for j in range(Dr // 2)]
    rs = cfg.rope_scaling
    if rs is None:
        return theta, 1.0
    s = float(rs["factor"])
    L0 = float(rs["original_max_position_embeddings"])
    bf, bs = float(rs.get("beta_fast", 32)), float(rs.get("beta_slow", 1))

    def corr(r):
        return Dr * math.log(L0 / (2 * math.pi * r)) / (2 * math.log(base))

    low, high = max(math.floor(corr(bf)), 0), min(math.ceil(corr(bs)), Dr - 1)
    if high == low:
        high += 0.001
    out = []
    for j, th in enumerate(theta):
        ramp = min(max((j - low) / (high - low), 0.0), 1.0)
        out.append(th / s * ramp + th * (1 - ramp))
    # HF _compute_yarn_parameters: the ratio only when both fields are truthy, else get_mscale(s)
    m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
    if m and m_all:
        a = _get_mscale(s, float(m)) / _get_mscale(s, float(m_all))
    else:
        a = _get_mscale(s, 1.0)
    return out, a


def _host_scale(cfg):
    """Softmax scale of spec 2.5: (Dn+Dr)^-1/2 * mscale^2 (mscale from mscale_all_dim)."""
    scale = 1.0 / math.sqrt(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    rs = cfg.rope_scaling
    if rs is not None and float(rs["factor"]) > 1.0:
        m = _get_mscale(float(rs["factor"]), float(rs.get("mscale_all_dim") or 0.0))
        scale *= m * m
    return scale


def _rot_check(name, raw, rot, positions, theta, a):
    """RoPE as complex multiplication: pairs (x[2j] + i x[2j+1]) times a e^{i m theta_j}."""
    zx = raw[..., 0::2] + 1j * raw[..., 1::2]
    zy = rot[..., 0::2] + 1j * rot[..., 1::2]
    phase = np.array([[cmath.exp(1j * m * th) for th in theta] for m in positions])  # (T, Dr/2)
    want = zx * a * phase
    d = float(np.max(np.abs(zy - want))) if zy.size else 0.0
    dn = float(np.max(np.abs(np.abs(zy) - a * np.abs(zx)))) if zy.size else 0.0
    scale = max(1.0, float(np.max(np.abs(want))) if want.size else 1.0)
    return [
        _check(f"{name} preserves every pair's norm (times a = {a:.6g})", dn <= TOL * scale,
               f"max ||y_j| - a|x_j|| {dn:.1e}"),
        _check(f"{name} rotates pair j by m*theta'_j (complex product, theta' from spec 2.4)",
               d <= TOL * scale, f"max |y - a e^(i m theta') x| {d:.1e}"),
    ]


# -------------------------------------------------------------------------------------------
# corruptions (self-test of the audit: faults in the weights the library runs on)
# -------------------------------------------------------------------------------------------
def _corrupt_eh_proj_swap(params, cfg):
    """Swap the column halves of MTP module 1's eh_proj.weight: the module then reads
    [hnorm(h); enorm(emb)] (the paper's order) instead of the checkpoint's [enorm(emb); hnorm(h)]."""
    if cfg.D < 1 or cfg.refmtp.mtp_kind != "causal":
        raise ValueError("corruption eh_proj_swap needs a causal MTP module (D >= 1)")
    name = f"model.layers.{cfg.num_hidden_layers}.eh_proj.weight"
    w, d = params[name], cfg.hidden_size
    xp = backend_of(w).xp
    params[name] = xp.concat([w[:, d:], w[:, :d]], axis=1)  # (d, 2d) halves swapped


def _corrupt_kv_a_layout(params, cfg):
    """Move the RoPE rows of layer 0's kv_a_proj_with_mqa in front of the latent rows (a loader
    that splits [k_pe | c_KV] instead of [c_KV | k_pe])."""
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    w, Rkv = params[name], cfg.kv_lora_rank
    xp = backend_of(w).xp
    params[name] = xp.concat([w[Rkv:], w[:Rkv]], axis=0)  # (Rkv+Dr, d) rows rolled


CORRUPTIONS = {
    "eh_proj_swap": _corrupt_eh_proj_swap,
    "kv_a_layout": _corrupt_kv_a_layout,
}


# -------------------------------------------------------------------------------------------
# the context: config, parameters, reference weights, one input, the model's forward
# -------------------------------------------------------------------------------------------
@dataclass
class _Ctx:
    cfg: ModelConfig
    params: dict  # what the library runs on
    ref: dict  # host float64 reference weights (checkpoint file or pre-hook snapshot)
    bk: object
    tokens: object  # (B, T+1) int64 on the backend
    tok: np.ndarray  # the same on the host
    B: int
    T: int
    i: int  # chosen position
    b: int  # chosen batch row
    seed: int
    out: object = None  # ModelOutput
    cache: object = None  # ModelCache

    def h(self, a) -> np.ndarray:
        """Device array -> host float64 copy."""
        return np.array(self.bk.to_numpy(a), dtype=np.float64)

    def R(self, name) -> np.ndarray:
        return self.ref[name]

    @property
    def positions(self):
        return self.bk.xp.arange(self.T, dtype=self.bk.xp.int64)


def _read_reference(ckpt: Path) -> dict:
    """Every tensor of the checkpoint's safetensors files, read directly (host float64)."""
    from safetensors import safe_open

    files = sorted(Path(ckpt).glob("*.safetensors"))
    if not files:
        raise ValueError(f"checkpoint {ckpt} has no .safetensors file")
    ref = {}
    for f in files:
        with safe_open(str(f), framework="numpy") as st:
            for name in st.keys():
                ref[name] = np.array(st.get_tensor(name), dtype=np.float64)
    return ref


def _n_params(cfg) -> int:
    from refmtp.params import param_shapes

    return sum(math.prod(s) for s in param_shapes(cfg).values())


def load_audit_model(*, preset=None, ckpt=None, config=None, seed=0, backend="numpy"):
    """-> (cfg, params, ref, source). Exactly one of preset / ckpt / config (default preset tiny).

    preset/config: ``init_params(cfg, seed, std=0.3, bias_std=0.05)`` in float64 and a host
    snapshot as the reference; ckpt: ``load_checkpoint(dtype="float64")`` and the file itself.
    """
    from refmtp.model import init_params

    given = [x for x in (preset, ckpt, config) if x is not None]
    if len(given) > 1:
        raise ValueError("give one of --preset, --ckpt or --config, not several")
    bk = get_backend(backend) if isinstance(backend, (str, type(None))) else backend
    if ckpt is not None:
        from refmtp.checkpoint import load_checkpoint

        cfg, params = load_checkpoint(ckpt, backend=bk, dtype="float64")
        _check_size(cfg)
        return cfg, params, _read_reference(Path(ckpt)), f"checkpoint {ckpt}"
    if config is not None:
        cfg = ModelConfig.load(config)
        source = f"config {config}"
    else:
        name = preset or "tiny"
        cfg = get_preset(name)
        source = f"preset {name}"
    _check_size(cfg)
    params = init_params(cfg, seed=seed, backend=bk, dtype="float64", std=AUDIT_STD,
                         bias_std=AUDIT_BIAS_STD)
    ref = {k: np.array(bk.to_numpy(v), dtype=np.float64) for k, v in params.items()}
    return cfg, params, ref, source


def _check_size(cfg):
    n = _n_params(cfg)
    if n > MAX_PARAMS:
        raise ValueError(
            f"this config has {n:,} parameters; the audit runs the whole model in float64 on the "
            f"host (limit {MAX_PARAMS:,}): use --preset tiny or a smaller config"
        )


# -------------------------------------------------------------------------------------------
# component: MLA
# -------------------------------------------------------------------------------------------
def _audit_mla(ctx: _Ctx) -> list:
    from refmtp.model.block import sub_params
    from refmtp.inference.decode import KVCache, mla_decode
    from refmtp.model.mla import mla_forward, mla_kv_b_heads
    from refmtp.model.ops.rope import rope_forward, rope_tables, softmax_scale

    cfg, bk, xp = ctx.cfg, ctx.bk, ctx.bk.xp
    b, i, B, T = ctx.b, ctx.i, ctx.B, ctx.T
    H, Dn, Dr, Dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    Rkv, eps = cfg.kv_lora_rank, cfg.rms_norm_eps
    pre = "model.layers.0."

    def P(name):  # reference weight of layer 0's MLA
        return ctx.R(pre + "self_attn." + name)

    bc = ctx.cache.blocks[0]
    p_attn = sub_params(ctx.params, pre + "self_attn.")
    x_dev = bc.attn.kv_a_proj.x  # (B,T,d) input_layernorm output, as the model computed it
    out_dev, c = mla_forward(x_dev, p_attn, cfg, ctx.positions)  # the layer, from the model's input
    X = ctx.h(x_dev)
    pos = list(range(T))
    theta, a = _host_rope(cfg)
    steps = []

    def add(title, ref, formula, shapes, values, checks):
        steps.append(Step("mla", len(steps) + 1, title, ref, formula, shapes, values, checks))

    # 1. embedding + input_layernorm ---------------------------------------------------------
    h_in = ctx.h(bc.attn_norm.x)  # (B,T,d) block input
    E = ctx.R("model.embed_tokens.weight")
    add("embedding lookup and input_layernorm", "spec 1, 2.3",
        "h = E[t] (no sqrt(d) scaling);  x = w * h / sqrt(mean(h^2) + eps)",
        {"E": list(E.shape), "h": _shape(h_in), "x": _shape(X)},
        {"t[b,i]": [int(ctx.tok[b, i])], "h[b,i,:4]": _few(h_in[b, i]), "x[b,i,:4]": _few(X[b, i])},
        [_close("h equals the checkpoint rows E[t]", h_in, E[ctx.tok[:, :T]]),
         _rmsnorm_check("x is RMSNorm(h) (scale/direction identity)", X, h_in,
                        ctx.R(pre + "input_layernorm.weight"), eps)])

    # 2. query down-projection (q-LoRA) ------------------------------------------------------
    if cfg.q_lora_rank is not None:
        cq_raw = ctx.h(c.q_a_layernorm.x)  # (B,T,Rq)
        cq = ctx.h(c.q_proj.x)  # (B,T,Rq)
        Wqa = P("q_a_proj.weight")
        add("query latent c^Q and q_a_layernorm", "eq. 6 (+ norm, spec 2.3 step 1)",
            "cQ = q_a_layernorm(x Wq_a^T)",
            {"Wq_a": list(Wqa.shape), "cQ": _shape(cq)},
            {"cQ_raw[b,i,:4]": _few(cq_raw[b, i]), "cQ[b,i,:4]": _few(cq[b, i])},
            [_close("cQ_raw[b,i] = exactly rounded dot products with Wq_a rows", cq_raw[b, i],
                    _fmatvec(Wqa, X[b, i])),
             _rmsnorm_check("cQ is RMSNorm(cQ_raw)", cq, cq_raw, P("q_a_layernorm.weight"), eps)])
        Wqb = P("q_b_proj.weight")
        q_src, q_name = cq, "cQ Wq_b^T"
    else:
        Wqb = P("q_proj.weight")
        q_src, q_name = X, "x Wq^T"

    # 3. query up-projection, per-head rows --------------------------------------------------
    Q = ctx.h(c.attn.q)  # (B,H,T,Dn+Dr) as attention saw it
    K = ctx.h(c.attn.k)  # (B,H,T,Dn+Dr)
    V = ctx.h(c.attn.v)  # (B,H,T,Dv)
    w = Dn + Dr
    q_raw = np.stack([q_src @ Wqb[h * w:(h + 1) * w].T for h in range(H)], axis=1)  # (B,H,T,Dn+Dr)
    add("query up-projection, split per head", "eqs. 7, 9; spec 2.2 row layout",
        f"q = {q_name}; head h = rows h*(Dn+Dr)..: q_nope = rows c < Dn, q_pe = rows c >= Dn",
        {"W": list(Wqb.shape), "q_nope": [B, H, T, Dn], "q_pe": [B, H, T, Dr]},
        {"q_nope[b,0,i,:4]": _few(Q[b, 0, i, :Dn])},
        [_close("q_nope = row block h of the weight (explicit slices, no reshape)", Q[..., :Dn],
                q_raw[..., :Dn]),
         _close("q_nope[b,0,i] by exactly rounded dot products", Q[b, 0, i, :Dn],
                _fmatvec(Wqb[:Dn], q_src[b, i]))])

    # 4. RoPE on q_pe --------------------------------------------------------------------------
    add("RoPE on the query's decoupled part", "eq. 8; spec 2.4 (interleaved pairs, YaRN)",
        "y[2j] + i y[2j+1] = a e^(i m theta'_j) (x[2j] + i x[2j+1]),  m = position",
        {"q_pe": [B, H, T, Dr], "theta'": [Dr // 2]},
        {"theta'[:4]": _few(theta), "q_pe_raw[b,0,i,:4]": _few(q_raw[b, 0, i, Dn:]),
         "q_pe[b,0,i,:4]": _few(Q[b, 0, i, Dn:])},
        _rot_check("RoPE(q_pe)", q_raw[..., Dn:], Q[..., Dn:], pos, theta, a))

    # 5. KV down-projection --------------------------------------------------------------------
    Wkva = P("kv_a_proj_with_mqa.weight")
    c_raw = ctx.h(c.kv_a_layernorm.x)  # (B,T,Rkv)
    k_raw = X @ Wkva[Rkv:].T  # (B,T,Dr) host, from the reference rows Rkv..
    add("joint KV down-projection, latent first", "eqs. 1, 3; spec 2.2",
        "[c_raw | k_pe_raw] = x Wkv_a^T  (rows 0..Rkv-1: W^DKV, rows Rkv..: W^KR)",
        {"Wkv_a": list(Wkva.shape), "c_raw": _shape(c_raw), "k_pe_raw": [B, T, Dr]},
        {"c_raw[b,i,:4]": _few(c_raw[b, i]), "k_pe_raw[b,i,:4]": _few(k_raw[b, i])},
        [_close("c_raw[b,i] = exactly rounded dots with reference rows 0..Rkv-1", c_raw[b, i],
                _fmatvec(Wkva[:Rkv], X[b, i])),
         _close("c_raw at every position from the reference's latent rows", c_raw,
                X @ Wkva[:Rkv].T)])

    # 6. kv_a_layernorm ------------------------------------------------------------------------
    C = ctx.h(c.c_kv)  # (B,T,Rkv) post-norm latent
    add("kv_a_layernorm on the latent", "eq. 1 (+ norm, spec 2.3 step 3)",
        "c_KV = kv_a_layernorm(c_raw)   (what the latent cache stores)",
        {"c_KV": _shape(C)}, {"c_KV[b,i,:4]": _few(C[b, i])},
        [_rmsnorm_check("c_KV is RMSNorm(c_raw)", C, c_raw, P("kv_a_layernorm.weight"), eps)])

    # 7. RoPE on k_pe, shared by all heads ----------------------------------------------------
    kpe = ctx.h(c.k_pe)  # (B,T,Dr)
    # relative positions: the library's RoPE at positions shifted by s leaves q.k unchanged
    j = list(range(i + 1))
    qv = bk.asarray(q_raw[b, 0, i:i + 1, Dn:], dtype="float64")  # (1, Dr)
    kv = bk.asarray(k_raw[b, :i + 1], dtype="float64")  # (i+1, Dr)
    dots = []
    for s in (0, 5, 37):
        pq = xp.asarray([i + s], dtype=xp.int64)
        pk = xp.asarray([t + s for t in j], dtype=xp.int64)
        qr, _ = rope_forward(qv, *rope_tables(cfg, pq, qv))
        kr, _ = rope_forward(kv, *rope_tables(cfg, pk, kv))
        dots.append(ctx.h(kr) @ ctx.h(qr)[0])  # (i+1,)
    d_rel = max(_maxdiff(dots[1], dots[0]), _maxdiff(dots[2], dots[0]))
    add("RoPE on the shared key part k_pe (no norm)", "eq. 3; spec 2.3 step 3, 2.4",
        "k_pe = RoPE(k_pe_raw), one (Dr,) vector per token, shared by every head",
        {"k_pe": _shape(kpe)},
        {"k_pe[b,i,:4]": _few(kpe[b, i]), "q_pe.k_pe[b,0,i,j<=i][:4]": _few(dots[0])},
        _rot_check("RoPE(k_pe)", k_raw, kpe, pos, theta, a) + [
            _close("every head's key ends in the same k_pe", K[..., Dn:],
                   np.broadcast_to(kpe[:, None], (B, H, T, Dr))),
            _check("q_pe . k_pe depends only on m - n (library RoPE at positions + 5, + 37)",
                   d_rel <= TOL * max(1.0, float(np.max(np.abs(dots[0])))),
                   f"max |dot change| {d_rel:.1e}")])

    # 8. KV up-projection ----------------------------------------------------------------------
    Wkvb = P("kv_b_proj.weight")
    wv = Dn + Dv
    W_UK = np.stack([Wkvb[h * wv: h * wv + Dn] for h in range(H)])  # (H,Dn,Rkv)
    W_UV = np.stack([Wkvb[h * wv + Dn:(h + 1) * wv] for h in range(H)])  # (H,Dv,Rkv)
    kn_host = np.einsum("btc,hnc->bhtn", C, W_UK)
    v_host = np.einsum("btc,hvc->bhtv", C, W_UV)
    add("KV up-projection: per-head k_nope and v", "eqs. 2, 5; spec 2.2 row layout",
        "head h = rows h*(Dn+Dv)..: k_nope = c_KV W_UK[h]^T (c < Dn), v = c_KV W_UV[h]^T (c >= Dn)",
        {"Wkv_b": list(Wkvb.shape), "k_nope": [B, H, T, Dn], "v": _shape(V)},
        {"k_nope[b,0,i,:4]": _few(K[b, 0, i, :Dn]), "v[b,0,i,:4]": _few(V[b, 0, i])},
        [_close("k_nope from reference row blocks", K[..., :Dn], kn_host),
         _close("v from reference row blocks", V, v_host)])

    # 9. scores: naive vs absorbed ------------------------------------------------------------
    scale = _host_scale(cfg)
    mask = np.tril(np.ones((T, T), dtype=bool))  # key j visible to query t iff j <= t
    S_naive = scale * np.einsum("bhtc,bhsc->bhts", Q, K)
    q_lat = np.einsum("bhtn,hnc->bhtc", Q[..., :Dn], W_UK)  # q~ = W_UK^T q_nope (Rkv)
    S_abs = scale * (np.einsum("bhtc,bsc->bhts", q_lat, C) + np.einsum("bhtr,bsr->bhts", Q[..., Dn:], kpe))
    W_UK_lib, W_UV_lib = (ctx.h(t) for t in mla_kv_b_heads(p_attn, cfg))
    add("attention scores, naive and absorbed", "eqs. 4, 9, 10; spec 2.5, 2.7",
        "s = scale [q_nope; q_pe].[k_nope; k_pe] = scale (W_UK^T q_nope . c_KV + q_pe . k_pe), "
        "scale = (Dn+Dr)^-1/2 mscale^2",
        {"s": [B, H, T, T], "q~": [B, H, T, Rkv]},
        {"scale": [_num(scale)], "s[b,0,i,j<=i][:4]": _few(S_naive[b, 0, i, :i + 1])},
        [_check("softmax scale = (Dn+Dr)^-1/2 mscale^2 (spec 2.5)",
                abs(softmax_scale(cfg) - scale) <= 1e-15 and abs(c.attn.scale - scale) <= 1e-15,
                f"library {c.attn.scale:.12g}, spec formula {scale:.12g}"),
         _close("absorbed scores (W_UK folded into the query) = naive scores",
                np.where(mask, S_abs, 0.0), np.where(mask, S_naive, 0.0)),
         _close("mla_kv_b_heads = reference row blocks (W_UK, W_UV)",
                np.concatenate([W_UK_lib, W_UV_lib], axis=1), np.concatenate([W_UK, W_UV], axis=1))])

    # 10. softmax with the causal mask ---------------------------------------------------------
    Pm = ctx.h(c.attn.p)  # (B,H,T,T)
    P_host = np.exp(_logsoftmax(np.where(mask, S_naive, -np.inf)))
    above = float(np.max(np.abs(Pm[..., ~mask]))) if (~mask).any() else 0.0
    add("causal softmax", "eq. 10; spec 2.6",
        "p[t,j] = softmax_j(s[t,j]) over j <= t;  p[t,j] = 0 for j > t",
        {"p": _shape(Pm)}, {"p[b,0,i,j<=i][:4]": _few(Pm[b, 0, i, :i + 1])},
        [_close("softmax rows sum to 1", np.sum(Pm, axis=-1), np.ones(Pm.shape[:-1])),
         _check("masked keys (j > t) get probability exactly 0", above == 0.0,
                f"max p above the diagonal {above:.1e}"),
         _close("p = exp(s - logaddexp.reduce(s)) (host, no max subtraction)", Pm, P_host)])

    # 11. attention output ---------------------------------------------------------------------
    O = ctx.h(c.o_proj.x)  # (B,T,H*Dv) heads concatenated
    O_heads = np.stack([O[..., h * Dv:(h + 1) * Dv] for h in range(H)], axis=1)  # (B,H,T,Dv)
    o_naive = np.einsum("bhts,bhsv->bhtv", Pm, V)
    x_lat = np.einsum("bhts,bsc->bhtc", Pm, C)  # sum_j p_j c_KV_j (Rkv)
    o_abs = np.einsum("bhtc,hvc->bhtv", x_lat, W_UV)
    add("attention output per head", "eq. 10; spec 2.7",
        "o_h = sum_j p_j v_j = W_UV[h] (sum_j p_j c_KV_j)  (absorbed: W_UV after attention)",
        {"o": [B, H, T, Dv]}, {"o[b,0,i,:4]": _few(O_heads[b, 0, i])},
        [_close("o = sum_j p_j v_j", O_heads, o_naive),
         _close("o = W_UV (sum_j p_j c_KV_j)  (absorbed form)", O_heads, o_abs)])

    # 12. output projection and the residual ---------------------------------------------------
    Wo = P("o_proj.weight")
    out = ctx.h(out_dev)
    out_host = sum(O_heads[:, h] @ Wo[:, h * Dv:(h + 1) * Dv].T for h in range(H))
    add("output projection and residual", "eq. 11; spec 1 (block)",
        "u = sum_h Wo[:, head h columns] o_h;  block: h = x_in + u",
        {"Wo": list(Wo.shape), "u": _shape(out)}, {"u[b,i,:4]": _few(out[b, i])},
        [_close("u = sum over heads of column blocks of Wo", out, out_host),
         _close("block residual h = x_in + u", ctx.h(bc.ffn_norm.x), h_in + out)])

    # 13. latent-cache decoding ----------------------------------------------------------------
    dec = {}
    per_tok = {}
    for mode in ("absorbed", "naive"):
        kvc = KVCache(cfg, [0], like=x_dev, batch=B, mode=mode, capacity=T)
        rows = []
        if i > 0:  # prefill positions 0..i-1 at once, then one token at a time
            rows.append(ctx.h(mla_decode(x_dev[:, :i], p_attn, cfg, kvc, 0, 0)))
            kvc.length = i
        for t in range(i, T):
            rows.append(ctx.h(mla_decode(x_dev[:, t:t + 1], p_attn, cfg, kvc, 0, t)))
            kvc.length = t + 1
        dec[mode] = np.concatenate(rows, axis=1)
        per_tok[mode] = kvc.bytes_per_token // kvc.itemsize
    add("decoding with the latent KV cache", "spec 2.7",
        "cache per token and layer: [c_KV | k_pe] (Rkv + Dr numbers); prefill 0..i-1, then one "
        "token at a time",
        {"cache row": [Rkv + Dr]}, {"u_dec[b,i,:4]": _few(dec["absorbed"][b, i])},
        [_close("absorbed cached decoding = full-sequence forward", dec["absorbed"], out),
         _close("naive cached decoding = full-sequence forward", dec["naive"], out),
         _check("the absorbed cache holds Rkv + Dr numbers per token",
                per_tok["absorbed"] == Rkv + Dr,
                f"{per_tok['absorbed']} (naive: {per_tok['naive']} = H (Dn + Dr + Dv))")])

    # 14. causality -------------------------------------------------------------------------------
    noise = np.zeros(X.shape)
    noise[:, i + 1:] = np.random.default_rng(ctx.seed + 1).standard_normal(noise[:, i + 1:].shape)
    out2 = ctx.h(mla_forward(x_dev + bk.asarray(noise, dtype="float64"), p_attn, cfg, ctx.positions)[0])
    moved = _maxdiff(out2[:, i + 1:], out[:, i + 1:]) if i + 1 < T else 1.0
    add("causality", "spec 2.6",
        "changing the inputs after position i leaves u[:, :i+1] unchanged",
        {"x": _shape(X)}, {},
        [_close("rows <= i unchanged when rows > i are perturbed", out2[:, :i + 1], out[:, :i + 1]),
         _check("the perturbation is visible after i (the check can fail)", moved > 1e-6,
                f"max change after i {moved:.2e}" if i + 1 < T else "i = T-1: nothing after i")])
    return steps


# -------------------------------------------------------------------------------------------
# component: MoE
# -------------------------------------------------------------------------------------------
def _moe_layers(cfg) -> list:
    return [layer for layer in range(cfg.num_hidden_layers + cfg.D) if cfg.is_moe_layer(layer)]


def _block_cache(ctx, layer):
    L = ctx.cfg.num_hidden_layers
    if layer < L:
        return ctx.cache.blocks[layer]
    c = ctx.cache.mtp[layer - L]
    return c.block if ctx.cfg.refmtp.mtp_kind == "causal" else c


def _host_mask_groups(sc, cfg):
    """Group-limited selection scores of one token (spec 3.2 step 4), host; (masked, gscores)."""
    E, G, TG = cfg.n_routed_experts, cfg.n_group, cfg.topk_group
    if cfg.topk_method == "greedy" or G == 1 or TG >= G:
        return sc.copy(), None
    grp = sc.reshape(G, E // G)
    if cfg.scoring_func == "sigmoid":
        gs = np.array([sum(sorted(row.tolist())[-2:]) for row in grp])  # top-2 sum
    else:
        gs = np.array([max(row.tolist()) for row in grp])  # max (V2)
    kept = _topk_set(gs, TG)
    masked = np.array([sc[e] if (e // (E // G)) in kept else -np.inf for e in range(E)])
    return masked, gs


def _host_balance(s, idx_actual, cfg):
    """Balance loss of one layer from its affinities s (B,T',E), host (eqs. 17-20 / V2)."""
    kind, E, K = cfg.refmtp.balance_loss, cfg.n_routed_experts, cfg.num_experts_per_tok
    if kind == "none":
        return 0.0, None, None
    if kind == "seq":
        groups = [(s[bb], [_topk_set(row, K) for row in s[bb]]) for bb in range(s.shape[0])]
    else:
        groups = [(s.reshape(-1, E), [list(r) for r in idx_actual.reshape(-1, K)])]
    losses, f_first, P_first = [], None, None
    for sg, sel in groups:
        Tg = sg.shape[0]
        counts = np.zeros(E)
        for row in sel:
            for e in row:
                counts[e] += 1
        f = E / (K * Tg) * counts  # eq. 18
        sn = sg / sg.sum(axis=-1, keepdims=True)  # eq. 19
        Pi = sn.mean(axis=0)  # eq. 20
        losses.append(math.fsum(f * Pi))  # eq. 17 without alpha
        if f_first is None:
            f_first, P_first = f, Pi
    return math.fsum(losses) / len(losses), f_first, P_first


def _audit_moe(ctx: _Ctx) -> list:
    from refmtp.model.balance import update_bias
    from refmtp.model.block import sub_params
    from refmtp.model import backward
    from refmtp.model.moe import moe_forward
    from refmtp.model.router import router_forward

    cfg, bk, xp = ctx.cfg, ctx.bk, ctx.bk.xp
    layers = _moe_layers(cfg)
    if not layers:
        return [Step("moe", 1, "no MoE layer in this config", "spec 3.1",
                     "layers >= first_k_dense_replace use MoE", {}, {},
                     [_check("the model's forward recorded no routing", not ctx.out.routing,
                             f"routing recorded for layers {sorted(ctx.out.routing)}")])]
    layer = layers[0]
    E, K, G, TG = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
    rho = float(cfg.routed_scaling_factor)
    pre = f"model.layers.{layer}.mlp."
    bc = _block_cache(ctx, layer)
    B, Tl, d = bc.ffn.x_shape
    u_dev = bc.ffn.router.x  # (N, d) post_attention_layernorm output
    p_mlp = sub_params(ctx.params, pre)
    out_dev, aux_dev, mc = moe_forward(xp.reshape(u_dev, (B, Tl, d)), p_mlp, cfg)
    rc = mc.router
    U = ctx.h(u_dev)
    N = U.shape[0]
    i = min(ctx.i, Tl - 1)
    n = ctx.b * Tl + i  # token index of (b, i)
    has_bias = cfg.topk_method == "noaux_tc"
    s = ctx.h(rc.s)  # (N, E)
    idx = np.array(bk.to_numpy(rc.topk_idx), dtype=np.int64)  # (N, K)
    g = ctx.h(mc.topk_weight).reshape(N, K)
    bias = ctx.R(pre + "gate.e_score_correction_bias") if has_bias else np.zeros(E)
    Wg = ctx.R(pre + "gate.weight")
    steps = []

    def add(title, ref, formula, shapes, values, checks):
        steps.append(Step("moe", len(steps) + 1, title, ref, formula, shapes, values, checks))

    where = f"layer {layer}, token (b={ctx.b}, i={i})"
    # 1. router logits and affinities --------------------------------------------------------
    z_host = _fmatvec(Wg, U[n])  # (E,)
    if cfg.scoring_func == "sigmoid":
        logit = np.log(s[n]) - np.log1p(-s[n])  # the inverse of the sigmoid
        checks = [_close("logit(s) = log s - log(1-s) equals exactly rounded u . e_i", logit, z_host,
                         tol=1e-9),
                  _check("0 < s < 1 for every token and expert", bool(np.all((s > 0) & (s < 1))),
                         f"min {s.min():.3g}, max {s.max():.3g}")]
        formula = "z = u Wg^T;  s = sigmoid(z)"
    else:
        checks = [_close("log s_e - log s_0 = z_e - z_0 (softmax log-ratios)", np.log(s[n]) - np.log(s[n, 0]),
                         z_host - z_host[0], tol=1e-9),
                  _close("softmax affinities sum to 1", s.sum(-1), np.ones(N))]
        formula = "z = u Wg^T;  s = softmax(z)"
    add(f"router affinities ({where})", "eq. 15; spec 3.2 steps 1-2", formula,
        {"u": _shape(U), "gate.weight": list(Wg.shape), "s": _shape(s)},
        {"z[:4]": _few(z_host), "s[:4]": _few(s[n])}, checks)

    # 2. selection scores with the bias ---------------------------------------------------------
    sel = ctx.h(rc.sel_scores)  # (N, E) -inf outside kept groups
    sc = s + bias[None, :]
    fin = np.isfinite(sel)
    if has_bias:
        b_dt = str(p_mlp["gate.e_score_correction_bias"].dtype)
        add("selection scores (bias for selection only)", "eq. 16; spec 3.2 step 3, 3.4",
            "sc = s + b,  b = e_score_correction_bias (float32, no gradient)",
            {"b": [E], "sc": _shape(sc)},
            {"b[:4]": _few(bias), "sc[:4]": _few(sc[n])},
            [_check("the bias is float32", b_dt == "float32", f"dtype {b_dt}"),
             _close("selection scores = s + b (host, float64)", np.where(fin, sel, 0.0),
                    np.where(fin, sc, 0.0), tol=1e-12)])
    else:
        add("selection scores (no bias: V2 router)", "spec 3.3", "sc = s",
            {"sc": _shape(sc)}, {"sc[:4]": _few(sc[n])},
            [_close("selection scores = s", np.where(fin, sel, 0.0), np.where(fin, sc, 0.0))])

    # 3. group-limited selection -----------------------------------------------------------------
    host_masked, gs_n = [], None
    for t in range(N):
        m, gs = _host_mask_groups(sc[t], cfg)
        host_masked.append(m)
        if t == n:
            gs_n = gs
    host_masked = np.array(host_masked)
    active = gs_n is not None
    gname = "top-2 sum" if cfg.scoring_func == "sigmoid" else "max"
    checks = [_close("masked scores = host group limiting (-inf outside the kept groups)", sel, host_masked)]
    if active:
        checks.append(_close("group scores = host " + gname, ctx.h(rc.group_scores)[n], gs_n))
    else:
        n_masked = int((~np.isfinite(sel)).sum())
        checks.append(_check("no group is dropped (topk_group >= n_group or greedy)", n_masked == 0,
                             f"{n_masked} masked entries"))
    add("group-limited routing", "spec 3.2 step 4 (P-V3 node-limited routing)",
        f"group score = {gname} of sc in each of G={G} groups; keep topk_group={TG}; others -> -inf",
        {"groups": [G, E // G]},
        {**({"group scores": _few(gs_n)} if active else {}), "masked[:4]": _few(host_masked[n])}, checks)

    # 4. top-K -----------------------------------------------------------------------------------
    host_sets = [sorted(_topk_set(host_masked[t], K)) for t in range(N)]
    lib_sets = [sorted(int(e) for e in idx[t]) for t in range(N)]
    bad = sum(1 for a_, b_ in zip(host_sets, lib_sets) if a_ != b_)
    gap = min(float(np.min(sel[t][idx[t]])) - float(np.max(np.delete(sel[t], idx[t]))) for t in range(N)) \
        if E > K else math.inf
    add("top-K experts", "eq. 16 (TopK); spec 3.2 step 4",
        f"S = TopK(masked sc, K={K})  (ties -> lowest index)",
        {"topk_idx": [N, K]}, {"S": [int(e) for e in idx[n]], "sc[S]": _few(sc[n][idx[n]])},
        [_check("selected sets = host sort by (-score, index)", bad == 0, f"{bad} of {N} tokens differ"),
         _check("every selected score >= every unselected score", gap >= 0, f"min margin {gap:.3g}")])

    # 5. the bias changes the selection, not the gate values ---------------------------------------
    if has_bias:
        zero = xp.zeros_like(p_mlp["gate.e_score_correction_bias"])  # float32 zeros
        idx0_dev, g0_dev, _ = router_forward(u_dev, p_mlp["gate.weight"], zero, cfg)
        idx0 = np.array(bk.to_numpy(idx0_dev), dtype=np.int64)
        g0 = ctx.h(g0_dev)
        same = [t for t in range(N) if sorted(idx0[t]) == lib_sets[t]]
        changed = [t for t in range(N) if t not in same]
        d_same = 0.0
        for t in same:  # compare gates expert by expert (slot order may differ)
            m1 = dict(zip(idx[t].tolist(), g[t].tolist()))
            m0 = dict(zip(idx0[t].tolist(), g0[t].tolist()))
            d_same = max(d_same, max(abs(m1[e] - m0[e]) for e in m1))
        add("the bias moves selection, never gate values", "eq. 16 vs eq. 13; P-LF",
            "run the router again with b = 0: tokens whose S is unchanged keep identical g",
            {}, {"tokens whose S the bias changed": [len(changed)]},
            [_check("identical gate values where the bias did not change S", d_same <= 1e-15,
                    f"max |g(b) - g(0)| {d_same:.1e} over {len(same)} tokens; the bias changed S "
                    f"for {len(changed)} of {N} tokens")])

    # 6. gate values ---------------------------------------------------------------------------------
    # V3 sigmoid: normalise then scale by rho; V2 softmax + norm_topk_prob: normalise, no rho
    # (DeepSeek-V2's modeling_deepseek.py; docs/math-decisions.md)
    v2_norm = cfg.scoring_func == "softmax" and cfg.norm_topk_prob
    c_ = 1.0 if v2_norm else rho
    g_host = []
    for t in range(N):
        w_ = s[t][idx[t]]
        g_host.append(c_ * w_ / (w_.sum() + 1e-20) if cfg.norm_topk_prob else c_ * w_)
    g_host = np.array(g_host)
    c_name = "1" if v2_norm else "rho"
    checks = [_close(f"g = {c_name} s_S / sum_S s from the UNBIASED s", g, g_host)]
    if cfg.norm_topk_prob:
        total = "1 (softmax + norm_topk_prob: no rho)" if v2_norm else "routed_scaling_factor"
        checks.insert(0, _close(f"selected gate values sum to {total} = {c_:g}",
                                g.sum(axis=-1), np.full(N, c_)))
    add("gate values", "eq. 13 (+ routed_scaling_factor); spec 3.2 step 5",
        (f"g_i = {c_name} s_i / sum_{{j in S}} s_j" if cfg.norm_topk_prob
         else "g_i = rho s_i"),
        {"topk_weight": [N, K]}, {"g": _few(g[n], K), "sum g": [_num(g[n].sum())]}, checks)

    # 7. dispatch and load ---------------------------------------------------------------------------
    order = np.array(bk.to_numpy(mc.order), dtype=np.int64)
    off = mc.offsets
    load = np.array(bk.to_numpy(mc.load), dtype=np.int64)
    flat = idx.reshape(-1)
    blocks_ok = all(np.all(flat[order[off[e]:off[e + 1]]] == e)
                    and np.all(np.diff(order[off[e]:off[e + 1]]) > 0) for e in range(E))
    add("dispatch plan and expert load", "spec 3.4 (load c_i); docs/derivations/moe-combine.md",
        "order = slots sorted by expert (stable); load_e = #slots routed to e",
        {"order": [N * K], "load": [E]}, {"load": [int(v) for v in load]},
        [_check("load = bincount of the selected experts",
                np.array_equal(load, np.bincount(flat, minlength=E)) and load.sum() == N * K,
                f"sum {int(load.sum())}, N K = {N * K}"),
         _check("each expert's block holds exactly its slots, in token order", blocks_ok,
                "blocks checked for all experts")])

    # 8. eq. 12 output -------------------------------------------------------------------------------
    out = ctx.h(out_dev).reshape(N, d)
    proj = ("gate_proj", "up_proj", "down_proj")
    shared = np.zeros((N, d))
    if cfg.n_shared_experts > 0:
        shared = _host_swiglu(U, *(ctx.R(pre + f"shared_experts.{w}.weight") for w in proj))
    routed = np.zeros((N, d))
    for t in range(N):  # per token, no permutation
        for kk in range(K):
            W = [ctx.R(pre + f"experts.{int(idx[t, kk])}.{w}.weight") for w in proj]
            routed[t] += g[t, kk] * _host_swiglu(U[t:t + 1], *W)[0]
    add("routed and shared experts", "eq. 12; spec 3.2 step 6",
        "out = SharedMLP(u) + sum_{i in S} g_i FFN_i(u),  FFN(x) = down(silu(gate x) * up x)",
        {"out": [N, d]}, {"out[:4]": _few(out[n]), "shared[:4]": _few(shared[n])},
        [_close("dispatched/combined output = per-token loop over S (host SwiGLU, silu = a/(1+e^-a))",
                out, shared + routed)])

    # 9. balance loss ---------------------------------------------------------------------------------
    aux = float(ctx.h(aux_dev))
    aux_host, f, Pi = _host_balance(s.reshape(B, Tl, E), idx.reshape(B, Tl, K), cfg)
    kind = cfg.refmtp.balance_loss
    formula = {"seq": "per sequence: f_i = E/(K T) #{t: i in TopK(s_t)}, s' = s/sum s, P_i = mean_t s'_i, "
                      "L = sum_i f_i P_i; mean over sequences (alpha applied in the loss)",
               "expert": "V2: f_i = E/(K N) #{selected i}, P_i = mean s'_i over all tokens, L = sum f P",
               "none": "no balance loss"}[kind]
    vals = {"aux": [_num(aux)]}
    if f is not None:
        vals.update({"f (seq 0)[:4]": _few(f), "P (seq 0)[:4]": _few(Pi)})
    add("balance loss (without alpha)", "eqs. 17-20; spec 3.5", formula, {"s": [B, Tl, E]}, vals,
        [_close("balance loss = host recount (seq: unbiased, ungrouped TopK per sequence)", aux, aux_host)])

    # 10. bias update ---------------------------------------------------------------------------------
    if has_bias:
        gamma = float(cfg.refmtp.bias_update_gamma)
        b_dev = p_mlp["gate.e_score_correction_bias"]
        new = np.array(bk.to_numpy(update_bias(b_dev, mc.load, gamma)))
        b32 = np.array(bk.to_numpy(b_dev))
        c_ = load.astype(np.float64)
        step = np.where(c_ < c_.mean(), 1.0, np.where(c_ > c_.mean(), -1.0, 0.0)).astype(np.float32)
        want = b32 + step * np.float32(gamma)
        add("auxiliary-loss-free bias update", "spec 3.4 (P-V3 2.1.2)",
            f"b_i += gamma sign(mean(c) - c_i), gamma = {gamma:g}: overloaded experts go down",
            {"b": [E]}, {"b_new - b": _few(new.astype(np.float64) - b32, E)},
            [_check("update = +gamma below the mean load, -gamma above, float32",
                    new.dtype == np.float32 and np.array_equal(new, want),
                    f"dtype {new.dtype}, max |diff| {_maxdiff(new, want):.1e}")])

    # 11. no gradient for the bias --------------------------------------------------------------------
    grads = backward(ctx.cache)
    from refmtp.params import is_bias

    nb = [k for k in grads if is_bias(k)]
    missing = [k for k in ctx.params if not is_bias(k) and k not in grads]
    add("what has a gradient", "spec 3.4, 3.5",
        "e_score_correction_bias gets none (updated by the sign rule); every other tensor does",
        {}, {"gradients": [len(grads)]},
        [_check("backward returns no e_score_correction_bias entry", not nb, f"{len(nb)} bias entries"),
         _check("every other parameter has a gradient", not missing, f"missing: {missing[:3]}")])
    return steps


# -------------------------------------------------------------------------------------------
# component: MTP
# -------------------------------------------------------------------------------------------
def _audit_mtp(ctx: _Ctx) -> list:
    cfg, out, cache = ctx.cfg, ctx.out, ctx.cache
    B, T, D, L, d = ctx.B, ctx.T, cfg.D, cfg.num_hidden_layers, cfg.hidden_size
    eps, b = cfg.rms_norm_eps, ctx.b
    steps = []

    def add(title, ref, formula, shapes, values, checks):
        steps.append(Step("mtp", len(steps) + 1, title, ref, formula, shapes, values, checks))

    if D == 0:
        add("no MTP module (num_nextn_predict_layers = 0)", "eq. 25", "L = L_main (+ balance)", {}, {},
            [_check("no MTP logits", not out.mtp_logits, f"{len(out.mtp_logits)} depths")])
        return steps
    h0 = ctx.h(out.hidden)  # (B,T,d)
    kind = cfg.refmtp.mtp_kind
    theta, a = _host_rope(cfg)

    # 1. alignment ----------------------------------------------------------------------------------
    ok_ids, ok_tg, rows = True, True, []
    for k in range(1, D + 1):
        tg = np.array(ctx.bk.to_numpy(cache.mtp_xent[k - 1].targets)).reshape(B, T - k)
        ok_tg &= np.array_equal(tg, ctx.tok[:, k + 1:T + 1])
        if kind == "causal":
            ids = np.array(ctx.bk.to_numpy(cache.mtp_emb[k - 1].ids))
            ok_ids &= np.array_equal(ids, ctx.tok[:, k:T])
        rows.append(int(out.mtp_logits[k - 1].shape[1]))
    add("what depth k sees and predicts", "eqs. 21-24; spec 4.5",
        "depth k, row i (0 <= i < T-k): input token t_{i+k}, state h^{k-1}_i, target t_{i+k+1}",
        {f"logits^{k}": _shape(out.mtp_logits[k - 1]) for k in range(1, D + 1)},
        {"rows per depth": rows, f"t[b, i..i+{D + 1}]": [int(v) for v in ctx.tok[b, ctx.i:ctx.i + D + 2]]},
        ([_check("embedded tokens are t_{i+k} (tokens[:, k:T])", ok_ids, "all depths")]
         if kind == "causal" else [])
        + [_check("targets are t_{i+k+1} (tokens[:, k+1:T+1])", ok_tg, "all depths"),
           _check("depth k has T-k rows", rows == [T - k for k in range(1, D + 1)], f"{rows}")])

    if kind != "causal":
        for k in range(1, D + 1):
            bc = cache.mtp[k - 1]
            add(f"parallel head {k}: block on the trunk state", "spec 6 (Gloeckle et al.)",
                "logits^k = lm_head(model.norm(Block_{L+k-1}(z[:, :T-k])))",
                {"logits": _shape(out.mtp_logits[k - 1])}, {},
                [_close("head input = the trunk output z (pre-norm) rows :T-k",
                        ctx.h(bc.attn_norm.x), ctx.h(cache.norm.x)[:, :T - k])])
        _mtp_loss_steps(ctx, add)
        return steps

    # 2. h^0 ------------------------------------------------------------------------------------------
    z = ctx.h(cache.norm.x)
    add("h^0: the main model's output after model.norm", "spec 4.4",
        "h^0 = model.norm(z), the tensor lm_head reads; MTP module 1 reads h^0[:, :T-1]",
        {"h^0": _shape(h0)}, {"h^0[b,i,:4]": _few(h0[b, ctx.i])},
        [_rmsnorm_check("h^0 is RMSNorm(z) with model.norm", h0, z, ctx.R("model.norm.weight"), eps),
         _close("the main lm_head reads h^0", ctx.h(cache.head.x), h0),
         _close("module 1's hnorm reads h^0[:, :T-1]", ctx.h(cache.mtp[0].hnorm.x), h0[:, :T - 1])])

    h_prev = h0
    for k in range(1, D + 1):
        Tk = T - k
        i = min(ctx.i, Tk - 1)
        pre = f"model.layers.{L + k - 1}."
        mc = cache.mtp[k - 1]
        E = ctx.ref.get(pre + "embed_tokens.weight", ctx.R("model.embed_tokens.weight"))
        copy_head = pre + "shared_head.head.weight" in ctx.ref  # checkpoint files carry a copy
        W_head = ctx.ref.get(pre + "shared_head.head.weight", ctx.R("lm_head.weight"))
        M = ctx.R(pre + "eh_proj.weight")  # (d, 2d)
        emb = E[ctx.tok[:, k:T]]  # (B,Tk,d) Emb(t_{i+k})

        def norm(v, w):
            return w * v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + eps)

        e = norm(emb, ctx.R(pre + "enorm.weight"))
        hh = norm(h_prev[:, :Tk], ctx.R(pre + "hnorm.weight"))
        x_host = e @ M[:, :d].T + hh @ M[:, d:].T  # checkpoint semantics: columns 0..d-1 read enorm(emb)
        x_paper = hh @ M[:, :d].T + e @ M[:, d:].T  # the report's order [h; emb]
        x_lib = ctx.h(mc.block.attn_norm.x)  # the block's input
        d_paper = _maxdiff(x_lib, x_paper)
        add(f"depth {k}: combine embedding and previous state", "eq. 21 as released; spec 4.2, 4.3",
            "x = M_k [enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)]  (embedding FIRST: eh_proj columns 0..d-1)",
            {"eh_proj": list(M.shape), "x": _shape(x_lib)},
            {"enorm(emb)[b,i,:4]": _few(e[b, i]), "hnorm(h)[b,i,:4]": _few(hh[b, i]),
             "x[b,i,:4]": _few(x_lib[b, i])},
            [_close("enorm reads the embedding rows E[t_{i+k}]" + (" (the module's embed_tokens copy)"
                    if pre + "embed_tokens.weight" in ctx.ref else ""), ctx.h(mc.enorm.x), emb),
             _close("x = reference eh_proj applied to [enorm(emb); hnorm(h)] (host RMSNorm, column halves)",
                    x_lib, x_host),
             _check("the order is observable here: [hnorm(h); enorm(emb)] differs",
                    _maxdiff(x_host, x_paper) > 1e-6,
                    f"max |x_lib - x_paper_order| {d_paper:.2e}")])

        # block positions, shared_head.norm, shared lm_head
        y = ctx.h(mc.head_norm.x)  # (B,Tk,d) block output
        n_ = ctx.h(cache.mtp_head[k - 1].x)  # (B,Tk,d) lm_head input
        logits = ctx.h(out.mtp_logits[k - 1])  # (B,Tk,V)
        cos = ctx.h(mc.block.attn.q_rope.cos)  # (Tk, Dr/2)
        cos_host = np.array([[a * math.cos(m * th) for th in theta] for m in range(Tk)])
        add(f"depth {k}: block, shared_head.norm, shared output head", "eqs. 22-23; spec 4.3, 4.5",
            "y = TRM_k(x) over T-k rows at RoPE positions 0..T-k-1;  logits = lm_head(shared_head.norm(y))",
            {"y": _shape(y), "logits": _shape(logits)},
            {"y[b,i,:4]": _few(y[b, i]), "logits[b,i,:4]": _few(logits[b, i])},
            [_close("the block's RoPE uses the main-model positions 0..T-k-1", cos, cos_host),
             _rmsnorm_check("lm_head input is shared_head.norm(y) (the module's own norm)", n_, y,
                            ctx.R(pre + "shared_head.norm.weight"), eps),
             _close("logits = n @ lm_head^T (reference" + (" shared_head.head copy)" if copy_head else ")"),
                    logits, n_ @ W_head.T)])

        # chain
        h_k = ctx.h(out.mtp_hidden[k - 1])
        post = cfg.refmtp.mtp_chain == "post_norm"
        checks = [_close("h^k = " + ("shared_head.norm(y)" if post else "y (pre-norm chain)"), h_k,
                         n_ if post else y)]
        if k < D:
            checks.append(_close(f"module {k + 1}'s hnorm reads h^{k}[:, :T-{k + 1}]",
                                 ctx.h(cache.mtp[k].hnorm.x), h_k[:, :Tk - 1]))
        add(f"depth {k}: state chained to depth {k + 1}" if k < D else f"depth {k}: chained state (last)",
            "spec 4.4",
            "h^k = shared_head.norm(y_k)  (mtp_chain = post_norm)" if post else "h^k = y_k (mtp_chain = pre_norm)",
            {"h^k": _shape(h_k)}, {"h^k[b,i,:4]": _few(h_k[b, i])}, checks)
        h_prev = h_k
    _mtp_loss_steps(ctx, add)
    return steps


def _mtp_loss_steps(ctx, add) -> None:
    """Per-depth losses (eq. 24) and the MTP objective (eq. 25), appended through ``add``."""
    cfg, out = ctx.cfg, ctx.out
    B, T, D = ctx.B, ctx.T, cfg.D
    lam = float(cfg.refmtp.mtp_lambda)
    Lk = []
    for k in range(1, D + 1):
        logits = ctx.h(out.mtp_logits[k - 1]).reshape(B * (T - k), -1)
        rows = _host_ce(logits, ctx.tok[:, k + 1:].reshape(-1))
        Nk = B * T if cfg.refmtp.mtp_loss_norm == "paper" else B * (T - k)  # eq. 24 vs Megatron
        host = math.fsum(rows) / Nk
        Lk.append(host)
        lib = float(ctx.h(out.losses[f"mtp.{k}"]))
        paper = cfg.refmtp.mtp_loss_norm == "paper"
        add(f"depth {k} loss", "eq. 24; spec 4.5",
            f"L^{k} = -(1/{'T' if paper else '(T-k)'}) sum over the T-k rows of log P^k[t_(i+k+1)], "
            "averaged over the batch",
            {"terms": [B * (T - k)]}, {f"L^{k}": [_num(lib)], "normaliser": [Nk]},
            [_check(f"{B}x{T - k} = {B * (T - k)} terms (T-k per sequence)", rows.shape[0] == B * (T - k),
                    f"{rows.shape[0]}"),
             _close(f"L^{k} = host cross-entropy sum / {Nk} ({'B T: paper' if paper else 'B (T-k): valid_mean'})",
                    lib, host, tol=1e-12)])
    los = {k: float(ctx.h(v)) for k, v in out.losses.items()}
    mtp_total = lam / D * math.fsum(Lk)
    add("MTP objective", "eq. 25",
        f"L_MTP = (lambda/D) sum_k L^k,  lambda = {lam:g}, D = {D}",
        {}, {"L_MTP": [_num(mtp_total)]},
        [_close("total - main - balance = (lambda/D) sum_k L^k", los["total"] - los["main"] - los["balance"],
                mtp_total, tol=1e-12)])


# -------------------------------------------------------------------------------------------
# component: loss
# -------------------------------------------------------------------------------------------
def _audit_loss(ctx: _Ctx) -> list:
    from refmtp.model.loss import loss_backward
    from refmtp.model.ops.xent import xent_backward

    cfg, out, cache = ctx.cfg, ctx.out, ctx.cache
    B, T, D, V = ctx.B, ctx.T, cfg.D, cfg.vocab_size
    b, i = ctx.b, ctx.i
    steps = []

    def add(title, ref, formula, shapes, values, checks):
        steps.append(Step("loss", len(steps) + 1, title, ref, formula, shapes, values, checks))

    h0 = ctx.h(out.hidden)
    Wh = ctx.R("lm_head.weight")
    logits = ctx.h(out.logits)  # (B,T,V)
    add("main logits", "spec 5.1 step 3", "logits = h^0 lm_head^T  (lm_head untied from the embedding)",
        {"lm_head": list(Wh.shape), "logits": _shape(logits)}, {"logits[b,i,:4]": _few(logits[b, i])},
        [_close("logits[b,i] = exactly rounded dots with reference lm_head rows", logits[b, i],
                _fmatvec(Wh, h0[b, i]))])

    z = logits.reshape(B * T, V)
    y = ctx.tok[:, 1:].reshape(-1)
    rows = _host_ce(z, y)
    lse = ctx.h(cache.xent.lse)
    main = float(ctx.h(out.losses["main"]))
    add("main cross-entropy", "spec 5.1; docs/derivations/cross-entropy.md",
        "loss_n = logsumexp(z_n) - z_n[t_{n+1}];  L_main = (1/(B T)) sum_n loss_n",
        {"rows": [B * T]}, {"loss[b,i]": [_num(rows[b * T + i])], "L_main": [_num(main)]},
        [_close("softmax rows sum to 1: sum exp(z - lse) (library lse)", np.exp(z - lse[:, None]).sum(-1),
                np.ones(B * T)),
         _close("L_main = mean of logaddexp.reduce(z) - z[y] (host)", main, math.fsum(rows) / (B * T),
                tol=1e-12)])

    lam, alpha = float(cfg.refmtp.mtp_lambda), float(cfg.refmtp.seq_aux_alpha)
    norms = list(cache.loss.mtp_norms)
    paper = cfg.refmtp.mtp_loss_norm == "paper"
    want_norms = [float(B * T if paper else B * (T - k)) for k in range(1, D + 1)]
    dl = loss_backward({"total": 1.0}, cache.loss)
    d_main = ctx.h(dl.dmain_rows)
    d_mtp = [ctx.h(r) for r in dl.dmtp_rows]
    want_d = [np.full(B * (T - k), (lam / D) / want_norms[k - 1]) for k in range(1, D + 1)]
    add("per-term normalisers and row weights", "eqs. 24-25; spec 4.5",
        "d total / d loss_row: main 1/(B T); depth k (lambda/D)/N_k with N_k = B T (paper) or B (T-k)",
        {f"depth {k} rows": [B * (T - k)] for k in range(1, D + 1)},
        {"N_k": [int(v) for v in norms], "d row main": [_num(1 / (B * T))]},
        [_check("N_k = " + ("B T for every depth (T-k terms over 1/T)" if cfg.refmtp.mtp_loss_norm == "paper"
                            else "B (T-k)"), norms == want_norms, f"{norms}"),
         _close("main row weights = 1/(B T)", d_main, np.full(B * T, 1 / (B * T)), tol=1e-12),
         _close("depth-k row weights = (lambda/D)/N_k", np.concatenate(d_mtp) if d_mtp else np.zeros(0),
                np.concatenate(want_d) if want_d else np.zeros(0), tol=1e-12)])

    # balance over every MoE layer
    layers = _moe_layers(cfg)
    host_aux = []
    for layer in layers:
        mc = _block_cache(ctx, layer).ffn
        Bl, Tl, _ = mc.x_shape
        s = ctx.h(mc.router.s).reshape(Bl, Tl, -1)
        idx = np.array(ctx.bk.to_numpy(mc.topk_idx), dtype=np.int64)
        host_aux.append(_host_balance(s, idx, cfg)[0])
    bal = float(ctx.h(out.losses["balance"]))
    add("balance loss over every MoE layer", "eq. 17; spec 3.5",
        f"L_bal = alpha sum_l L_l over the MoE layers (main and MTP blocks), alpha = {alpha:g}",
        {"MoE layers": [len(layers)]}, {"layers": layers, "L_l": _few(host_aux, 8)},
        [_check("one balance term per MoE layer", list(cache.aux_layers) == layers,
                f"{list(cache.aux_layers)} vs config {layers}"),
         _close("L_bal = alpha * sum of host per-layer losses", bal, alpha * math.fsum(host_aux), tol=1e-12)])

    los = {k: float(ctx.h(v)) for k, v in out.losses.items()}
    mtp_sum = math.fsum(los[f"mtp.{k}"] for k in range(1, D + 1))
    total = los["main"] + (lam / D * mtp_sum if D else 0.0) + los["balance"]
    add("total loss", "eq. 25 (+ eq. 17)", "L = L_main + (lambda/D) sum_k L^k + L_bal",
        {}, {k: [_num(v)] for k, v in los.items()},
        [_close("total = main + (lambda/D) sum mtp + balance", los["total"], total, tol=1e-12)])

    dz = ctx.h(xent_backward(dl.dmain_rows, cache.xent).dlogits)  # (B*T, V)
    p = np.exp(_logsoftmax(z))
    onehot = np.zeros_like(p)
    onehot[np.arange(B * T), y] = 1.0
    add("gradient at the logits", "docs/derivations/cross-entropy.md",
        "dL/dz_n = (softmax(z_n) - onehot(t_{n+1})) / (B T)",
        {"dz": _shape(dz)}, {"dz[b,i,:4]": _few(dz[b * T + i])},
        [_close("dz = (softmax - onehot)/(B T) (host softmax)", dz, (p - onehot) / (B * T), tol=1e-12),
         _close("every row of dz sums to 0", dz.sum(-1), np.zeros(B * T), tol=1e-12)])
    return steps


# -------------------------------------------------------------------------------------------
# component: speculative decoding
# -------------------------------------------------------------------------------------------
def _host_icdf(w, u):
    """R5 on the host: smallest y with w[y] > 0 and fsum(w[:y+1]) > u fsum(w); else last positive."""
    total = math.fsum(w)
    t = u * total
    acc = []
    for y, wy in enumerate(w):
        acc.append(float(wy))
        if wy > 0 and math.fsum(acc) > t:
            return y
    pos = [y for y, wy in enumerate(w) if wy > 0]
    return pos[-1] if pos else -1


def _audit_speculative(ctx: _Ctx) -> list:
    from refmtp.inference.decode import Decoder, generate
    from refmtp.model import forward
    from refmtp.inference.speculative import speculative_generate
    from refmtp.inference.acceptance import verify_drafts
    from refmtp.inference.sampling import icdf, rng_v1_draws

    cfg, bk, xp = ctx.cfg, ctx.bk, ctx.bk.xp
    D, b = cfg.D, ctx.b
    steps = []

    def add(title, ref, formula, shapes, values, checks):
        steps.append(Step("speculative", len(steps) + 1, title, ref, formula, shapes, values, checks))

    dec = Decoder(ctx.params, cfg)
    n = min(max(ctx.i + 2, D + 1, 2), ctx.T + 1)
    seq = [int(v) for v in ctx.tok[b, :n]]
    K = D
    tau = TEMPERATURE
    if K == 0:
        res0 = speculative_generate(dec, seq, 4, k=0, temperature=0.0)
        ref_tokens = generate(dec, seq, 4, temperature=0.0)
        add("no MTP module: no drafts", "spec-SD 1.4 (K = 0)", "every step emits one target token",
            {}, {"tokens": res0.tokens},
            [_check("K = 0 output = plain greedy decoding", res0.tokens == ref_tokens,
                    f"{res0.tokens} vs {ref_tokens}")])
        return steps

    res = speculative_generate(dec, seq, K + 1, k=K, temperature=tau, seed=ctx.seed, sample_drafts=True,
                               trace=True)
    tr = res.trace[0]
    drafts = list(tr["drafts"])
    draft_rows = [ctx.h(r) for r in tr["draft_logits"]]  # K rows (V,)
    q_lib = [ctx.h(r) for r in tr["q"]] if tr["q"] is not None else None
    target = ctx.h(tr["logits"])  # (K+1, V)
    A_lib = res.steps[0].A
    emitted = res.tokens[:res.steps[0].emitted]

    # 1. drafts ---------------------------------------------------------------------------------------
    checks = []
    if cfg.refmtp.mtp_kind == "causal":
        for s_ in range(1, K + 1):
            z = seq + drafts[:s_ - 1] + [0]  # a dummy target column: depth s's last row needs one
            o, _ = forward(ctx.params, cfg, xp.asarray([z], dtype=xp.int64), need_cache=False)
            want = ctx.h(o.mtp_logits[s_ - 1])[0, n - 2]
            checks.append(_close(f"draft {s_} logits (cached decoder) = training forward, depth {s_} row n-2",
                                 draft_rows[s_ - 1], want, tol=1e-9))
    q_host = [np.exp(_logsoftmax(r / tau)) for r in draft_rows]
    if q_lib is not None:
        checks.append(_close("q_k = softmax(draft logits / T) (host)", np.array(q_lib), np.array(q_host),
                             tol=1e-12))
    add("drafts from the MTP modules", "spec 4.6; spec-SD 3",
        f"module s at row n-2 of seq + d_<s drafts d_s ~ q_s = softmax(logits_s / T), T = {tau:g}",
        {"seq": [len(seq)], "drafts": [K]}, {"seq[-4:]": seq[-4:], "drafts": drafts}, checks)

    # 2. verification rows ----------------------------------------------------------------------------
    o, _ = forward(ctx.params, cfg, xp.asarray([seq + drafts + [0]], dtype=xp.int64), need_cache=False)
    want = ctx.h(o.logits)[0, n - 1:n + K]
    p = np.exp(_logsoftmax(target / tau))  # (K+1, V)
    q = np.array(q_host)
    add("one target pass over [x_{n-1}, d_1..d_K]", "spec-SD 0, 1.1",
        "p_k = softmax(target logits / T) at positions n-1..n-1+K (K+1 rows, the last is the bonus row)",
        {"p": list(p.shape)}, {"p_1[:4]": _few(p[0])},
        [_close("cached verification logits = full forward on seq + drafts", target, want, tol=1e-9),
         _close("every p row sums to 1", p.sum(-1), np.ones(K + 1), tol=1e-12)])

    # 3. per-draft decisions ---------------------------------------------------------------------------
    u_acc, u_s = rng_v1_draws(bk.rng(ctx.seed), K)  # the documented RNG-v1 stream (R9)
    A_host = K
    for k in range(K):
        d_ = drafts[k]
        pd, qd = float(p[k, d_]), float(q[k, d_])
        ratio = min(1.0, pd / qd)
        accept = pd > 0 and u_acc[k] * qd <= pd
        if A_host == K and not accept:
            A_host = k
        examined = k <= A_host
        lib_acc = A_lib > k
        word = {True: "accept", False: "reject"}
        checks = [_check("decision = host rule accept iff u q(d) <= p(d) (R2)",
                         (not examined) or (lib_acc == accept),
                         f"host {word[accept]}, library {word[lib_acc]}"
                         if examined else "after the first rejection: not examined (R6)")]
        if ratio < 1.0:  # the library's acceptance boundary sits exactly at min(1, p/q)
            u_lo, u_hi = ratio * (1 - 1e-9), min(ratio * (1 + 1e-9), 1 - 1e-16)
            lo = verify_drafts(p[k:k + 2], q[k:k + 1], [d_], [u_lo], 0.5).num_accepted
            hi = verify_drafts(p[k:k + 2], q[k:k + 1], [d_], [u_hi], 0.5).num_accepted
            checks.append(_check("library accepts at u = a(1-1e-9) and rejects at u = a(1+1e-9)",
                                 lo == 1 and hi == 0, f"accepted {lo}, {hi}"))
        add(f"draft {k + 1}: acceptance ratio and decision", "spec-SD 1.1, 2.2 R2",
            "a_k = min(1, p_k(d_k) / q_k(d_k));  accept iff u_k q_k(d_k) <= p_k(d_k)",
            {}, {"d": [d_], "p(d)": [_num(pd)], "q(d)": [_num(qd)], "a": [_num(ratio)], "u": [_num(u_acc[k])],
                 "decision": ["accept" if accept else "reject"] if examined else ["not examined"]},
            checks)

    # 4. residual or bonus --------------------------------------------------------------------------
    if A_host < K:
        w = np.maximum(p[A_host] - q[A_host], 0.0)
        what, formula = f"residual at position {A_host + 1}", "r = max(p_j - q_j, 0), y = ICDF(r, u_sample)"
        beta = math.fsum(np.minimum(p[A_host], q[A_host]))
        extra = [_close("residual mass = 1 - sum min(p, q)  (P(reject) = R, spec-SD 1.2)", math.fsum(w),
                        1 - beta, tol=1e-12)]
    else:
        w = p[K]
        what, formula = "bonus row", "all K accepted: y = ICDF(p_{K+1}, u_sample)"
        extra = []
    y_host = _host_icdf(w, u_s)
    S = math.fsum(w)
    part_ok, n_pos = True, 0
    acc = 0.0
    for yy, wy in enumerate(w):  # every token owns the u-interval [C_{y-1}, C_y) / S of length w_y / S
        if wy > 0:
            n_pos += 1
            mid = (acc + wy / 2) / S
            part_ok &= icdf(w, mid) == yy
        acc = math.fsum([acc, float(wy)])
    add(f"emitted token: {what}", "spec-SD 1.1, 2.2 R3-R5", formula,
        {"w": [len(w)]}, {"u_sample": [_num(u_s)], "y": [y_host], "emitted": emitted},
        [_check("A and the tokens = host replay (RNG-v1 coins, host ICDF with fsum)",
                A_lib == A_host and emitted == drafts[:A_host] + [y_host],
                f"library A={A_lib} {emitted}, host A={A_host} {drafts[:A_host] + [y_host]}"),
         _check("library ICDF gives token y the u-interval of length w_y/sum(w) (midpoints)", part_ok,
                f"{n_pos} tokens with positive weight")] + extra)

    # 5. the accept path: drafts equal to the target's own greedy continuation --------------------------
    g_tokens = generate(dec, seq, K + 1, temperature=0.0)  # plain cached greedy decoding
    o, _ = forward(ctx.params, cfg, xp.asarray([seq + g_tokens[:K] + [0]], dtype=xp.int64), need_cache=False)
    rows = o.logits[0, n - 1:n + K]  # (K+1, V) target rows over [x_{n-1}, d_1..d_K]
    vg = verify_drafts(None, None, g_tokens[:K], None, None, greedy=True, logits=rows)
    p_g = np.exp(_logsoftmax(ctx.h(rows) / tau))
    vs = verify_drafts(p_g, None, g_tokens[:K], u_acc, u_s)  # one-hot q: a_k = p_k(d_k)
    A_oh = next((k for k in range(K) if not (p_g[k, g_tokens[k]] > 0 and u_acc[k] <= p_g[k, g_tokens[k]])), K)
    add("accept path: drafts = the target's greedy continuation", "spec-SD 1.4, 2.2 R1, R2, R4",
        "greedy: accept while d_k = argmax p_k, then the bonus argmax p_{K+1}; "
        "one-hot q: accept iff u_k <= p_k(d_k)",
        {}, {"drafts": g_tokens[:K], "p_k(d_k)": [_num(p_g[k, g_tokens[k]]) for k in range(K)],
             "greedy verdict": list(vg.tokens), "one-hot A": [vs.num_accepted]},
        [_check("greedy: every draft accepted and the bonus = the next greedy token",
                vg.num_accepted == K and vg.is_bonus and list(vg.tokens) == g_tokens,
                f"A={vg.num_accepted}, tokens {list(vg.tokens)} vs greedy {g_tokens}"),
         _check("one-hot q: A = host rule (accept iff u_k <= p_k(d_k))", vs.num_accepted == A_oh,
                f"library A={vs.num_accepted}, host A={A_oh}")])

    # 6. greedy end-to-end ------------------------------------------------------------------------------
    new = 8
    res_g = speculative_generate(dec, seq, new, k=K, temperature=0.0)
    ref_g = generate(dec, seq, new, temperature=0.0)
    tps = len(res_g.tokens) / max(1, len(res_g.steps))
    add("temperature 0: speculative = greedy decoding", "spec-SD 1.4, 2.2 R1",
        f"{new} tokens with K = {K} drafts per step vs one main-model call per token",
        {}, {"tokens": res_g.tokens, "tokens per step": [_num(tps)]},
        [_check("identical token streams", res_g.tokens == ref_g, f"{res_g.tokens} vs {ref_g}")])
    return steps


# -------------------------------------------------------------------------------------------
# component: backward (central differences)
# -------------------------------------------------------------------------------------------
def _grad_scope(cfg, component):
    """(which parameter names to check, whether to check layer inputs too) for a component."""
    moe_pre = tuple(f"model.layers.{layer}.mlp." for layer in _moe_layers(cfg))
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


SHARED = ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight")


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
    from refmtp.verification.gradcheck import check_grad

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
    checks = []
    for name in names:
        r, worst, n = results[name]
        checks.append(_check(name, r.max_rel_error <= GRAD_TOL,
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
    return h_default, [_check("routing margin leaves room for finite differences", False,
                              f"smallest routing score gap {margin:.1e}: pick another --seed")]


def _audit_backward(ctx: _Ctx, component: str, coords: int) -> list:
    """Per layer: the layer's own backward against central differences of the layer's forward
    (random dout on its outputs, so every parameter's gradient is O(1) and well resolved); then
    the whole model for the shared tensors, whose gradient runs back through every layer and
    depth (the composition: chain between depths, shared-gradient sums)."""
    from refmtp.model.block import block_backward, block_forward, sub_params
    from refmtp.verification.gradcheck import SelectionFlip
    from refmtp.params import is_bias
    from refmtp.model import backward, forward, routing_margin, routing_selection
    from refmtp.model.moe import routing_margin as moe_margin
    from refmtp.model.moe import routing_selection as moe_selection
    from refmtp.model.mtp import mtp_backward, mtp_forward

    cfg, xp = ctx.cfg, ctx.bk.xp
    L, D, T = cfg.num_hidden_layers, cfg.D, ctx.T
    keep, with_inputs = _grad_scope(cfg, component)
    causal = cfg.refmtp.mtp_kind == "causal"
    steps = []

    def add(title, ref, formula, shapes, values, checks):
        steps.append(Step("backward", len(steps) + 1, title, ref, formula, shapes, values, checks))

    def run(fwd, bwd, inputs, names, selection, h):
        try:
            return _sampled_gradcheck(ctx.bk, fwd, bwd, inputs, names, coords=coords, seed=ctx.seed, h=h,
                                      selection=selection), None
        except SelectionFlip as exc:
            return None, _check("no routing flip under perturbation", False, str(exc))

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
            ref = "spec 1, 2.8, 3.5; docs/derivations/README.md"
        h, checks = _step_for_margin(margin, GRAD_H)
        reports, flip = run(fwd, bwd, inputs, names, sel, h=h)
        checks += [flip] if flip is not None else _grad_checks(reports, names)
        worst = max((reports[nm][0].max_rel_error for nm in names), default=0.0) if reports else math.inf
        add(title, ref, formula + f", h = {h:.2g}", {"tensors": [len(names)]},
            {"worst rel err": [_num(worst)], **({"routing margin": [_num(margin)]} if moe else {})}, checks)

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
        add("whole model: shared tensors (gradient through every layer and depth)",
            "eq. 25; docs/derivations/mtp.md (sums of shared gradients)",
            formula.replace("L = sum(out * dout)", "L = sum_terms dout_term * loss_term") + f", h = {h:.2g}",
            {"tensors": [len(names)]},
            {"worst rel err": [_num(max(r[0].max_rel_error for r in reports.values()))] if reports else [],
             "routing margin": [_num(margin)]},
            checks)
    return steps  # empty for "speculative": decoding has no trainable math


# -------------------------------------------------------------------------------------------
# the entry point
# -------------------------------------------------------------------------------------------
AUDITORS = {"mla": _audit_mla, "moe": _audit_moe, "mtp": _audit_mtp, "loss": _audit_loss,
            "speculative": _audit_speculative}


def run_audit(*, preset=None, ckpt=None, config=None, component: str = "all", position=None,
              batch_row: int = 0, backward: bool = False, seed: int = 0, backend="numpy",
              corrupt=None, coords: int = 2, cfg=None, params=None) -> AuditReport:
    """Run the audit and return its :class:`AuditReport` (see the module docstring).

    ``component``: one of :data:`COMPONENTS` or "all". ``position`` (default T-D-1) and
    ``batch_row`` pick the values shown. ``corrupt``: a name in :data:`CORRUPTIONS` or a
    callable ``f(params, cfg)`` applied to the parameters the library runs on AFTER the
    reference is taken. ``cfg``/``params`` (both) audit an in-memory model (reference = a host
    copy of ``params``). Bad input raises ValueError (or ConfigError) with one line.
    """
    t0 = time.perf_counter()
    from refmtp.model import forward

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
    ctx = _Ctx(cfg=cfg, params=params, ref=ref, bk=bk, tokens=bk.asarray(tok, dtype="int64"), tok=tok,
               B=B, T=T, i=position, b=batch_row, seed=seed)
    ctx.out, ctx.cache = forward(params, cfg, ctx.tokens)

    comps = list(COMPONENTS) if component == "all" else [component]
    steps = []
    for comp in comps:
        steps += AUDITORS[comp](ctx)
    if backward:
        steps += _audit_backward(ctx, component, coords)  # nothing for "speculative"
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


# -------------------------------------------------------------------------------------------
# renderers
# -------------------------------------------------------------------------------------------
def _fmt_vals(values: dict) -> str:
    parts = []
    for k, v in values.items():
        if isinstance(v, list) and len(v) == 1:
            v = v[0]
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, list):
            v = "[" + ", ".join(f"{x:.4g}" if isinstance(x, float) else str(x) for x in v) + "]"
        parts.append(f"{k} = {v}")
    return "  ".join(parts)


def _fmt_shapes(shapes: dict) -> str:
    return "  ".join(f"{k} ({', '.join(str(s) for s in v)})" for k, v in shapes.items())


def _header_lines(r: AuditReport) -> list:
    m = r.meta
    c = m["config"]
    lines = [
        f"refmtp audit: {m['source']}, seed {m['seed']}, {m['backend']} {m['dtype']}, "
        f"B={m['B']} T={m['T']}, position i={m['position']}, batch row b={m['batch_row']}"
        + (f", CORRUPTED: {m['corrupt']}" if m["corrupt"] else ""),
        f"config: d={c['hidden_size']} L={c['num_hidden_layers']} D={c['num_nextn_predict_layers']} "
        f"H={c['num_attention_heads']} Rq={c['q_lora_rank']} Rkv={c['kv_lora_rank']} "
        f"Dn={c['qk_nope_head_dim']} Dr={c['qk_rope_head_dim']} Dv={c['v_head_dim']} "
        f"E={c['n_routed_experts']} K={c['num_experts_per_tok']} G={c['n_group']}/{c['topk_group']} "
        f"V={c['vocab_size']}",
        f"tokens[b] = {m['tokens[b]']}",
    ]
    return lines


def _render_text(r: AuditReport) -> str:
    lines = _header_lines(r)
    for comp in r.components:
        lines += ["", f"== {comp}: {TITLES.get(comp, comp)} =="]
        for s in (x for x in r.steps if x.component == comp):
            lines.append(f"[{comp} {s.index}] {s.title}   ({s.ref})")
            lines.append(f"  formula: {s.formula}")
            if s.shapes:
                lines.append(f"  shapes:  {_fmt_shapes(s.shapes)}")
            if s.values:
                lines.append(f"  values:  {_fmt_vals(s.values)}")
            for c in s.checks:
                lines.append(f"  {'pass' if c.passed else 'FAIL'}  {c.name}: {c.detail}")
    lines += ["", "summary:"]
    for comp, n in r.counts().items():
        lines.append(f"  {comp:<12} {n['steps']:>3} steps {n['checks']:>4} checks  "
                     + ("all pass" if not n["failed"] else f"{n['failed']} FAIL"))
    total_f = len(r.failures())
    lines.append(f"{'PASS' if r.passed else 'FAIL'}: {sum(n['checks'] for n in r.counts().values())} checks, "
                 f"{total_f} failed, {r.meta['seconds']:.1f} s")
    return "\n".join(lines)


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _render_markdown(r: AuditReport) -> str:
    m = r.meta
    lines = ["# refmtp audit", ""]
    lines += [f"- {_md(x)}" for x in _header_lines(r)]
    lines += [f"- result: **{'PASS' if r.passed else 'FAIL'}** in {m['seconds']:.1f} s", "",
              "| component | steps | checks | failed |", "|---|---:|---:|---:|"]
    for comp, n in r.counts().items():
        lines.append(f"| {comp} | {n['steps']} | {n['checks']} | {n['failed']} |")
    for comp in r.components:
        lines += ["", f"## {comp}: {_md(TITLES.get(comp, comp))}", "",
                  "| # | step | ref | formula | shapes | values at (b, i) | checks | result |",
                  "|---:|---|---|---|---|---|---|---|"]
        for s in (x for x in r.steps if x.component == comp):
            checks = "<br>".join(f"{'✓' if c.passed else '✗ **FAIL**'} {_md(c.name)}: {_md(c.detail)}"
                                 for c in s.checks)
            lines.append(f"| {s.index} | {_md(s.title)} | {_md(s.ref)} | `{_md(s.formula)}` | "
                         f"{_md(_fmt_shapes(s.shapes))} | {_md(_fmt_vals(s.values))} | {checks} | "
                         f"{'pass' if s.passed else '**FAIL**'} |")
    return "\n".join(lines) + "\n"
