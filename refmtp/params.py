"""Parameter names, shapes and seeded initialisation of the whole model (spec sections 4.7, 5.2).

    shapes = param_shapes(cfg)                 # {checkpoint name: shape}, each tensor once
    params = init_params(cfg, seed=0, backend="numpy", dtype="float64")

Names are the DeepSeek-V3 / HF checkpoint names. Main layer l lives at ``model.layers.{l}.``;
MTP module k (1-based) at ``model.layers.{L+k-1}.`` with ``enorm``, ``hnorm``, ``eh_proj``,
``shared_head.norm`` and a full decoder block. With ``cfg.refmtp.mtp_kind == "parallel"`` the
prefix ``model.layers.{L+k-1}.`` holds only the block of parallel head k. The checkpoint-only
copies (``embed_tokens``, ``shared_head.head`` of each MTP module) are NOT parameters: they are
written by :mod:`refmtp.checkpoint`.

Initialisation (identical on every backend: all draws are host PCG64 through ``bk.rng(seed)``):

1. every 2-D matrix, in ``sorted(names)`` order (plain Python string order, so
   ``model.layers.10`` sorts before ``model.layers.2``), gets ``normal(0, std)`` with
   ``std = initializer_range`` (config ``extra["initializer_range"]``, default 0.02);
2. every RMSNorm weight (the 1-D tensors whose name ends in ``norm.weight``) is ones;
3. every ``mlp.gate.e_score_correction_bias`` is float32 zeros, or, when ``bias_std > 0``, a
   float32 ``normal(0, bias_std)`` drawn from the same generator AFTER all matrices (again in
   sorted order), so switching the bias on never changes a matrix.
"""
from __future__ import annotations

from refmtp.backends import get_backend
from refmtp.config import ModelConfig

BIAS_NAME = "mlp.gate.e_score_correction_bias"  # float32 always, no gradient (spec 3.4)
DEFAULT_INITIALIZER_RANGE = 0.02


def layer_prefix(layer: int) -> str:
    """Checkpoint prefix of layer ``layer`` (main layers 0..L-1, MTP module k at L+k-1)."""
    return f"model.layers.{layer}."


def mtp_layer(cfg: ModelConfig, k: int) -> int:
    """Layer index of MTP module / parallel head ``k`` (1-based): L + k - 1 (spec 4.7)."""
    return cfg.num_hidden_layers + k - 1


def block_param_shapes(cfg: ModelConfig, layer: int) -> dict[str, tuple]:
    """Local names (prefix stripped) and shapes of one decoder block at index ``layer``."""
    from refmtp.model.mla import mla_param_shapes
    from refmtp.model.moe import dense_mlp_param_shapes, moe_param_shapes

    d = cfg.hidden_size
    shapes = {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,)}
    shapes.update({f"self_attn.{k}": tuple(v) for k, v in mla_param_shapes(cfg).items()})
    ffn = moe_param_shapes(cfg) if cfg.is_moe_layer(layer) else dense_mlp_param_shapes(cfg)
    shapes.update({f"mlp.{k}": tuple(v) for k, v in ffn.items()})
    return shapes


def mtp_module_param_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """The MTP-only tensors of one module (V3 eq. 21, spec 4.3); the block comes on top."""
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
    shapes = {"model.embed_tokens.weight": (V, d)}
    for layer in range(L):
        pre = layer_prefix(layer)
        shapes.update({pre + k: v for k, v in block_param_shapes(cfg, layer).items()})
    shapes["model.norm.weight"] = (d,)
    shapes["lm_head.weight"] = (V, d)  # untied (tie_word_embeddings = false)
    for k in range(1, cfg.D + 1):
        layer = mtp_layer(cfg, k)
        pre = layer_prefix(layer)
        if cfg.refmtp.mtp_kind == "causal":
            shapes.update({pre + n: s for n, s in mtp_module_param_shapes(cfg).items()})
        shapes.update({pre + n: s for n, s in block_param_shapes(cfg, layer).items()})
    return dict(sorted(shapes.items()))


def is_bias(name: str) -> bool:
    return name.endswith(BIAS_NAME)


def initializer_range(cfg: ModelConfig) -> float:
    return float(cfg.extra.get("initializer_range", DEFAULT_INITIALIZER_RANGE))


def init_params(cfg: ModelConfig, seed: int = 0, backend="numpy", dtype: str = "float64", *,
                std: float | None = None, bias_std: float = 0.0) -> dict:
    """Seeded parameters ``{checkpoint name: array}``; see the module docstring for the order.

    ``std`` overrides the config's initializer_range; ``bias_std > 0`` draws a non-zero float32
    ``e_score_correction_bias`` (golden files and tests need one). Every matrix and norm is
    ``dtype``; the bias is float32 whatever ``dtype`` is.
    """
    bk = get_backend(backend) if isinstance(backend, (str, type(None))) else backend
    bk.check_float_dtype(dtype)
    std = initializer_range(cfg) if std is None else float(std)
    if not std >= 0 or not bias_std >= 0:
        raise ValueError(f"init_params: std={std} and bias_std={bias_std} must be >= 0")
    rng = bk.rng(seed)
    shapes = param_shapes(cfg)
    params = {}
    for name in sorted(shapes):  # 1. matrices, sorted order
        shape = shapes[name]
        if len(shape) == 2:
            params[name] = rng.normal(shape, std=std, dtype=dtype)
        elif is_bias(name):
            continue
        elif name.endswith("norm.weight") and len(shape) == 1:  # 2. RMSNorm weights
            params[name] = bk.xp.ones(shape, dtype=bk.dtype(dtype))
        else:
            raise AssertionError(f"init_params: no rule for {name} {shape}")
    for name in sorted(shapes):  # 3. balancing biases, float32, after every matrix
        if is_bias(name):
            if bias_std > 0:
                params[name] = rng.normal(shapes[name], std=bias_std, dtype="float32")
            else:
                params[name] = bk.zeros(shapes[name], dtype="float32")
    return dict(sorted(params.items()))
