"""The parameter schema: every checkpoint name, shape, layer prefix and parameter kind.

Every module that needs to know what a parameter is asks here: the model (refmtp.model), the
seeded initialisation (refmtp.model.init), the optimizer (which names decay), the checkpoint
files (the MTP modules' checkpoint-only copies), the golden files and the audit.

    shapes = param_shapes(cfg)       # {checkpoint name: shape}, each tensor once
    kind(name)                       # "matrix" | "norm" | "bias"
    decays(name), has_gradient(name) # AdamW weight decay; the bias moves only by its update rule
    copy_names(cfg)                  # checkpoint-only copies -> the shared tensor they duplicate
    check_params(params, cfg)        # names, shapes and dtypes, once, at the model's entry points

Names are the DeepSeek-V3 / HF checkpoint names. Main layer l lives at ``model.layers.{l}.``;
MTP module k (1-based) at ``model.layers.{L+k-1}.`` with ``enorm``, ``hnorm``, ``eh_proj``,
``shared_head.norm`` and a full decoder block. With ``cfg.refmtp.mtp_kind == "parallel"`` the
prefix ``model.layers.{L+k-1}.`` holds only the block of parallel head k. The checkpoint-only
copies (``embed_tokens`` and ``shared_head.head`` of each causal MTP module) are NOT parameters:
:mod:`refmtp.checkpoint` writes them from the shared tensors (:func:`copy_names`).

Kinds: every 2-D tensor is a ``matrix`` (projections, experts, the embedding and lm_head;
weight-decayed); every 1-D ``...norm.weight`` an RMSNorm weight (``norm``; no decay); every
``mlp.gate.e_score_correction_bias`` the balancing ``bias`` (float32 always, no gradient, no
decay: it moves only by the aux-loss-free update).
"""
from __future__ import annotations

from refmtp.backends import backend_of
from refmtp.config import ModelConfig
from refmtp.mutation import on

EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"
BIAS = "gate.e_score_correction_bias"  # local name under a MoE layer's "mlp."
BIAS_NAME = "mlp." + BIAS  # under a block's prefix; float32 always, no gradient
KINDS = ("matrix", "norm", "bias")


# -------------------------------------------------------------------------------------------
# prefixes
# -------------------------------------------------------------------------------------------
def layer_prefix(layer: int) -> str:
    """Checkpoint prefix of layer ``layer`` (main layers 0..L-1, MTP module k at L+k-1)."""
    return f"model.layers.{layer}."


def mtp_layer(cfg: ModelConfig, k: int) -> int:
    """Layer index of MTP module / parallel head ``k`` (1-based): L + k - 1."""
    return cfg.num_hidden_layers + k - 1


def sub_params(p: dict, prefix: str) -> dict:
    """The entries of ``p`` under ``prefix``, with the prefix stripped (:class:`FrozenParams`
    keep the views they have made: decoding asks for the same ones on every token)."""
    if isinstance(p, FrozenParams):
        return p.sub(prefix)
    n = len(prefix)
    return {k[n:]: v for k, v in p.items() if k.startswith(prefix)}


class FrozenParams(dict):
    """A read-only copy of a parameter dict that remembers its :func:`sub_params` views.

    Splitting the flat checkpoint dict by layer prefix costs a pass over every name, and the
    model does it for each layer on each call: negligible for a training step, a measurable
    share of a decoded token (:class:`refmtp.inference.decode.Decoder` holds its params as
    FrozenParams). Read-only, so a remembered view can never go stale; the arrays are shared.
    """

    __slots__ = ("_subs",)

    def __init__(self, params: dict):
        super().__init__(params)
        self._subs = {}

    def sub(self, prefix: str) -> "FrozenParams":
        view = self._subs.get(prefix)
        if view is None:
            n = len(prefix)
            view = self._subs[prefix] = FrozenParams({k[n:]: v for k, v in self.items()
                                                      if k.startswith(prefix)})
        return view

    def _read_only(self, *args, **kwargs):
        raise TypeError("FrozenParams are read-only: change a plain dict and build a new Decoder")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _read_only
    __ior__ = _read_only


# -------------------------------------------------------------------------------------------
# shapes
# -------------------------------------------------------------------------------------------
def mla_param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """MLA's local names (under ``self_attn.``) -> shape ``[out, in]``. V3: q_b_proj (24576, 1536)."""
    d, H = cfg.hidden_size, cfg.num_attention_heads
    Dn, Dr, Dv, Rkv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    shapes: dict[str, tuple[int, ...]] = {}
    if cfg.q_lora_rank is None:
        shapes["q_proj.weight"] = (H * (Dn + Dr), d)
    else:
        Rq = cfg.q_lora_rank
        shapes["q_a_proj.weight"] = (Rq, d)
        shapes["q_a_layernorm.weight"] = (Rq,)
        shapes["q_b_proj.weight"] = (H * (Dn + Dr), Rq)
    shapes["kv_a_proj_with_mqa.weight"] = (Rkv + Dr, d)
    shapes["kv_a_layernorm.weight"] = (Rkv,)
    shapes["kv_b_proj.weight"] = (H * (Dn + Dv), Rkv)
    shapes["o_proj.weight"] = (d, H * Dv)
    return shapes


def moe_param_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """A MoE layer's local names (under ``mlp.``) -> shape.

    ``gate.e_score_correction_bias`` (float32, no gradient) exists only for
    ``topk_method="noaux_tc"``: the V2 routers have no bias (as in vLLM). The shared experts are
    one SwiGLU of width ``n_shared_experts * moe_intermediate_size`` (absent when 0).
    """
    d, I, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
    shapes = {"gate.weight": (E, d)}
    if cfg.topk_method == "noaux_tc":
        shapes[BIAS] = (E,)
    for e in range(E):
        shapes[f"experts.{e}.gate_proj.weight"] = (I, d)
        shapes[f"experts.{e}.up_proj.weight"] = (I, d)
        shapes[f"experts.{e}.down_proj.weight"] = (d, I)
    if cfg.n_shared_experts > 0:
        Is = cfg.n_shared_experts * I
        shapes["shared_experts.gate_proj.weight"] = (Is, d)
        shapes["shared_experts.up_proj.weight"] = (Is, d)
        shapes["shared_experts.down_proj.weight"] = (d, Is)
    return shapes


def dense_mlp_param_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """A dense SwiGLU MLP's local names (layers < first_k_dense_replace) -> shape."""
    d, I = cfg.hidden_size, cfg.intermediate_size
    return {"gate_proj.weight": (I, d), "up_proj.weight": (I, d), "down_proj.weight": (d, I)}


def block_param_shapes(cfg: ModelConfig, layer: int) -> dict[str, tuple]:
    """Local names (prefix stripped) and shapes of one decoder block at index ``layer``."""
    d = cfg.hidden_size
    shapes = {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,)}
    shapes.update({f"self_attn.{k}": tuple(v) for k, v in mla_param_shapes(cfg).items()})
    ffn = moe_param_shapes(cfg) if cfg.is_moe_layer(layer) else dense_mlp_param_shapes(cfg)
    shapes.update({f"mlp.{k}": tuple(v) for k, v in ffn.items()})
    return shapes


def mtp_module_param_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """The MTP-only tensors of one module (V3 eq. 21); the block comes on top."""
    d = cfg.hidden_size
    return {
        "enorm.weight": (d,),  # RMSNorm of Emb(t_{i+k})
        "hnorm.weight": (d,),  # RMSNorm of h^{k-1}_i
        "eh_proj.weight": (d, 2 * d),  # M_k; input columns [enorm(emb) ; hnorm(h)]
        "shared_head.norm.weight": (d,),  # the module's own output norm (not model.norm)
    }


def param_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """Every parameter of the model (each tensor once), checkpoint name -> shape."""
    V, d, L = cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers
    shapes = {EMBED: (V, d)}
    for layer in range(L):
        pre = layer_prefix(layer)
        shapes.update({pre + k: v for k, v in block_param_shapes(cfg, layer).items()})
    shapes[NORM] = (d,)
    shapes[LM_HEAD] = (V, d)  # untied (tie_word_embeddings = false)
    for k in range(1, cfg.D + 1):
        layer = mtp_layer(cfg, k)
        pre = layer_prefix(layer)
        if cfg.refmtp.mtp_kind == "causal":
            shapes.update({pre + n: s for n, s in mtp_module_param_shapes(cfg).items()})
        shapes.update({pre + n: s for n, s in block_param_shapes(cfg, layer).items()})
    return dict(sorted(shapes.items()))


def param_count(cfg: ModelConfig) -> int:
    """Number of parameters of ``cfg`` (= the sum over :func:`param_shapes`), computed from the
    dimensions without listing a single name: fast even for absurd configs (1e9 layers or
    experts), so sizes can be checked before anything is allocated (refmtp.memory)."""
    V, d, L, D = cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.D
    mla = sum(_prod(s) for s in mla_param_shapes(cfg).values())
    E, I = cfg.n_routed_experts, cfg.moe_intermediate_size
    moe = E * d + (E if cfg.topk_method == "noaux_tc" else 0) + E * 3 * I * d
    moe += 3 * cfg.n_shared_experts * I * d
    dense = 3 * cfg.intermediate_size * d

    def block(is_moe: bool) -> int:
        return 2 * d + mla + (moe if is_moe else dense)

    n_dense_main = min(L, cfg.first_k_dense_replace) if E > 0 else L
    total = 2 * V * d + d + n_dense_main * block(False) + (L - n_dense_main) * block(True)
    n_dense_mtp = max(0, min(L + D, cfg.first_k_dense_replace) - L) if E > 0 else D
    total += n_dense_mtp * block(False) + (D - n_dense_mtp) * block(True)
    if cfg.refmtp.mtp_kind == "causal":
        total += D * (3 * d + 2 * d * d)
    return total


def _prod(shape) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


def copy_names(cfg: ModelConfig) -> dict[str, str]:
    """Checkpoint-only copies -> the shared tensor they duplicate (causal MTP modules only)."""
    if cfg.refmtp.mtp_kind != "causal":
        return {}
    out = {}
    for k in range(1, cfg.D + 1):
        pre = layer_prefix(mtp_layer(cfg, k))
        out[pre + "embed_tokens.weight"] = EMBED
        out[pre + "shared_head.head.weight"] = LM_HEAD
    return out


# -------------------------------------------------------------------------------------------
# kinds
# -------------------------------------------------------------------------------------------
def kind(name: str) -> str:
    """``"bias"`` (e_score_correction_bias: any name ending in ``bias``), ``"norm"`` (an RMSNorm
    weight) or ``"matrix"``."""
    if name.endswith("bias"):
        return "bias"
    if name.endswith("norm.weight"):
        return "norm"
    return "matrix"


def routed_expert(name: str) -> int | None:
    """The routed expert ``e`` of a name ``model.layers.{l}.mlp.experts.{e}.*`` (None for every
    other parameter: attention, router, shared experts, norms, embedding, head). Expert
    parallelism shards exactly these (docs/distributed.md §3)."""
    head, sep, rest = name.partition(".mlp.experts.")
    if not sep or not head.startswith("model.layers."):
        return None
    return int(rest.split(".", 1)[0])


def is_bias(name: str) -> bool:
    return kind(name) == "bias"


def has_gradient(name: str) -> bool:
    """Every parameter but the balancing bias (it moves only by its update rule)."""
    return kind(name) != "bias"


def decays(name: str) -> bool:
    """AdamW weight decay applies to matrices (embedding and lm_head included), not to RMSNorm
    weights nor the balancing bias."""
    return on("optim.decay_norms") or kind(name) == "matrix"


# -------------------------------------------------------------------------------------------
# validation, once at the model's entry points
# -------------------------------------------------------------------------------------------
def check_params(params: dict, cfg: ModelConfig, experts=None) -> None:
    """Names, shapes and dtypes of ``params`` against the config; one-line ValueError.

    Every matrix and norm has one float dtype (float32 or float64); every bias is float32.
    ``experts`` (a range of expert ids, None: all) are the routed experts ``params`` holds: an
    expert-parallel rank holds only its own (refmtp.training.expert_parallel).
    """
    expected = param_shapes(cfg)
    if experts is not None:
        expected = {n: s for n, s in expected.items()
                    if routed_expert(n) is None or routed_expert(n) in experts}
    missing = sorted(set(expected) - set(params))
    extra = sorted(set(params) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        if extra:
            parts.append(f"unexpected {len(extra)}: {', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}")
        raise ValueError(
            "params do not match the config (" + "; ".join(parts) + "): build them with "
            "init_params(cfg) or load_checkpoint for this config"
        )
    for name, shape in expected.items():
        if tuple(params[name].shape) != tuple(shape):
            raise ValueError(
                f"params[{name!r}] has shape {tuple(params[name].shape)}, the config needs {tuple(shape)}"
            )
    dtype = params[EMBED].dtype
    f32 = backend_of(params[EMBED]).xp.float32
    for name in expected:
        want = f32 if is_bias(name) else dtype
        if params[name].dtype != want:
            why = ("the balancing bias is always float32" if is_bias(name)
                   else f"every matrix and norm must have one dtype ({EMBED} is {dtype})")
            raise ValueError(f"params[{name!r}] is {params[name].dtype}: {why}")
