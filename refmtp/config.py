"""Model configuration with DeepSeek-V3's HF ``config.json`` field names.

``ModelConfig`` holds every field refmtp uses, under the names of the published DeepSeek-V3
``config.json`` (HF ``DeepseekV3Config``), plus refmtp's own training settings under the
``"refmtp"`` key (:class:`RefmtpSettings`). Fields of the published config that refmtp does not
use (architectures, model_type, torch_dtype, bos_token_id, ...) are kept in ``extra`` and written
back unchanged. Values refmtp cannot honour (attention_bias=true, hidden_act other than silu,
num_key_value_heads != num_attention_heads, ...) and unknown or inconsistent fields are rejected
with a one-line :class:`ConfigError` naming the field and the rule.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """An invalid config: the message names the field and the rule, in one line."""


@dataclass
class RefmtpSettings:
    """refmtp-only settings, stored in config.json under ``"refmtp"``."""

    mtp_lambda: float = 0.3  # lambda in L = L_main + (lambda/D) sum_k L_MTP^k (V3 eq. 25)
    seq_aux_alpha: float = 1e-4  # alpha of the sequence-wise balance loss (V3 eq. 17)
    mtp_chain: str = "post_norm"  # state chained to depth k+1: "post_norm" | "pre_norm"
    mtp_loss_norm: str = "paper"  # "paper" (sum / (B*T)) | "valid_mean" (sum / (B*(T-k)))
    mtp_kind: str = "causal"  # "causal" (DeepSeek-V3) | "parallel" (Gloeckle et al. heads)
    bias_update_gamma: float = 0.001  # gamma of b_i += gamma * sign(mean_load - load_i)
    balance_loss: str = "seq"  # "seq" (V3 eqs. 17-20) | "expert" (V2 expert-level) | "none"

    CHOICES = {
        "mtp_chain": ("post_norm", "pre_norm"),
        "mtp_loss_norm": ("paper", "valid_mean"),
        "mtp_kind": ("causal", "parallel"),
        "balance_loss": ("seq", "expert", "none"),
    }

    def validate(self):
        for name, choices in self.CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                raise ConfigError(
                    f"refmtp.{name}={value!r} is not allowed: choose one of {', '.join(choices)}"
                )
        for name in ("mtp_lambda", "seq_aux_alpha", "bias_update_gamma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value):
                raise ConfigError(f"refmtp.{name}={value!r} must be a finite number >= 0")


# Fields of the published DeepSeek-V3/R1 config.json (and of HF DeepseekV3Config) that refmtp
# does not use: kept in ``ModelConfig.extra`` and written back unchanged.
PASSTHROUGH_FIELDS = (
    "architectures", "auto_map", "model_type", "torch_dtype", "dtype", "transformers_version",
    "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "ep_size", "aux_loss_alpha",
    "seq_aux", "initializer_range", "pretraining_tp", "quantization_config", "head_dim",
    "num_key_value_heads", "attention_bias", "attention_dropout", "hidden_act", "moe_layer_freq",
    "tie_word_embeddings", "rope_interleave", "_name_or_path", "output_router_logits",
    "router_aux_loss_coef", "mlp_layer_types", "rope_parameters",
)


@dataclass
class ModelConfig:
    """DeepSeek-V3 model dimensions, HF ``config.json`` names (docs/deepseek-v3.md §5.3)."""

    vocab_size: int = 256
    hidden_size: int = 32  # d
    intermediate_size: int = 64  # dense-MLP width (layers < first_k_dense_replace)
    moe_intermediate_size: int = 16  # width of each routed expert
    num_hidden_layers: int = 2
    num_nextn_predict_layers: int = 1  # D, number of MTP modules
    num_attention_heads: int = 2  # n_h
    q_lora_rank: int | None = 24  # d_c'; None -> plain q_proj
    kv_lora_rank: int = 16  # d_c
    qk_nope_head_dim: int = 8  # d_h
    qk_rope_head_dim: int = 4  # d_h^R (even)
    v_head_dim: int = 8
    n_routed_experts: int = 8  # N_r
    n_shared_experts: int = 1  # N_s (fused into one SwiGLU of width N_s * moe_intermediate_size)
    num_experts_per_tok: int = 2  # K_r
    n_group: int = 2  # expert groups for group-limited routing
    topk_group: int = 1  # groups kept per token
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"  # "sigmoid" (V3) | "softmax" (V2)
    topk_method: str = "noaux_tc"  # "noaux_tc" (V3) | "greedy" | "group_limited_greedy" (V2)
    first_k_dense_replace: int = 1
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # YaRN: {"type": "yarn", "factor", ...}
    max_position_embeddings: int = 4096
    refmtp: RefmtpSettings = field(default_factory=RefmtpSettings)
    extra: dict = field(default_factory=dict)  # passthrough fields, written back unchanged

    # ---------------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def D(self) -> int:
        return self.num_nextn_predict_layers

    def is_moe_layer(self, layer: int) -> bool:
        """Layer index (main layers 0..L-1, MTP module k at L+k-1) uses MoE iff >= first_k_dense_replace."""
        return layer >= self.first_k_dense_replace and self.n_routed_experts > 0

    @property
    def yarn(self) -> dict | None:
        """Normalised YaRN parameters, or None when rope_scaling is absent.

        A missing ``mscale`` or ``mscale_all_dim`` reads as 0.0, "not given": HF transformers
        treats None and 0 alike (falsy), and refmtp.model.ops.rope follows HF's rule for both fields.
        """
        if self.rope_scaling is None:
            return None
        rs = self.rope_scaling
        return {
            "factor": float(rs["factor"]),
            "original_max_position_embeddings": int(rs["original_max_position_embeddings"]),
            "beta_fast": float(rs.get("beta_fast", 32)),
            "beta_slow": float(rs.get("beta_slow", 1)),
            "mscale": float(rs.get("mscale") or 0.0),
            "mscale_all_dim": float(rs.get("mscale_all_dim") or 0.0),
        }

    # ---------------------------------------------------------------------------------------
    def validate(self) -> "ModelConfig":
        def pos_int(name, minimum=1):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ConfigError(f"{name}={v!r} must be an integer >= {minimum}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings",
                     "intermediate_size"):
            pos_int(name)
        for name in ("qk_nope_head_dim", "num_nextn_predict_layers", "n_shared_experts",
                     "n_routed_experts", "first_k_dense_replace", "moe_intermediate_size"):
            pos_int(name, 0)
        if self.q_lora_rank is not None:
            pos_int("q_lora_rank")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(
                f"qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE rotates pairs)"
            )
        for name in ("rms_norm_eps", "rope_theta", "routed_scaling_factor"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
                raise ConfigError(f"{name}={v!r} must be a finite number > 0")
        if not isinstance(self.norm_topk_prob, bool):
            raise ConfigError(f"norm_topk_prob={self.norm_topk_prob!r} must be true or false")
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ConfigError(
                f"first_k_dense_replace={self.first_k_dense_replace} must be <= "
                f"num_hidden_layers={self.num_hidden_layers}"
            )
        self._validate_moe()
        self._validate_rope()
        self._validate_extra()
        if not isinstance(self.refmtp, RefmtpSettings):
            raise ConfigError("refmtp must be an object of refmtp settings")
        self.refmtp.validate()
        return self

    def _validate_moe(self):
        if self.scoring_func not in ("sigmoid", "softmax"):
            raise ConfigError(f"scoring_func={self.scoring_func!r}: choose sigmoid or softmax")
        allowed = {"sigmoid": ("noaux_tc",), "softmax": ("greedy", "group_limited_greedy")}
        if self.topk_method not in allowed[self.scoring_func]:
            raise ConfigError(
                f"topk_method={self.topk_method!r} does not go with scoring_func="
                f"{self.scoring_func!r}: use {' or '.join(allowed[self.scoring_func])}"
            )
        if self.n_routed_experts == 0:
            return
        pos_n = ("moe_intermediate_size", "num_experts_per_tok", "n_group", "topk_group")
        for name in pos_n:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}={v!r} must be an integer >= 1")
        E, K, G, TG = self.n_routed_experts, self.num_experts_per_tok, self.n_group, self.topk_group
        if K > E:
            raise ConfigError(
                f"num_experts_per_tok={K} must be <= n_routed_experts={E}"
            )
        if E % G:
            raise ConfigError(f"n_group={G} must divide n_routed_experts={E}")
        if TG > G:
            raise ConfigError(f"topk_group={TG} must be <= n_group={G}")
        if TG * (E // G) < K:
            raise ConfigError(
                f"topk_group*experts_per_group = {TG}*{E // G} = {TG * (E // G)} must be >= "
                f"num_experts_per_tok={K} (not enough experts survive group-limiting)"
            )
        if self.scoring_func == "sigmoid" and G > 1 and E // G < 2:
            raise ConfigError(
                f"n_group={G} leaves {E // G} expert per group: the V3 group score is the sum of "
                "the top-2 scores in a group, so each group needs >= 2 experts"
            )

    def _validate_rope(self):
        rs = self.rope_scaling
        if rs is None:
            return
        if not isinstance(rs, dict):
            raise ConfigError("rope_scaling must be null or an object with type 'yarn'")
        kind = rs.get("type", rs.get("rope_type"))
        if kind != "yarn":
            raise ConfigError(
                f"rope_scaling type {kind!r} is not supported: refmtp implements 'yarn' or null"
            )
        known = {"type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast",
                 "beta_slow", "mscale", "mscale_all_dim"}
        for key in rs:
            if key not in known:
                raise ConfigError(f"rope_scaling.{key} is not a YaRN field refmtp knows")
        for key in ("factor", "original_max_position_embeddings"):
            if key not in rs:
                raise ConfigError(f"rope_scaling.{key} is required for yarn")
        def number(key, optional):
            v = rs.get(key)
            if v is None and optional:
                return
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"rope_scaling.{key}={v!r} must be a finite number"
                                  + (" or null" if optional else ""))

        number("factor", False)
        if not rs["factor"] >= 1.0:
            raise ConfigError(f"rope_scaling.factor={rs['factor']} must be >= 1")
        ompe = rs["original_max_position_embeddings"]
        if isinstance(ompe, float) and ompe.is_integer():
            ompe = int(ompe)
        if isinstance(ompe, bool) or not isinstance(ompe, int) or ompe < 1:
            raise ConfigError(
                f"rope_scaling.original_max_position_embeddings={ompe!r} must be an integer >= 1")
        for key in ("beta_fast", "beta_slow"):
            if key in rs:
                number(key, False)
        for key in ("mscale", "mscale_all_dim"):
            number(key, True)

    def _validate_extra(self):
        ex = self.extra
        for key in ex:
            if key not in PASSTHROUGH_FIELDS:
                raise ConfigError(f"unknown config field {key!r}")
        if ex.get("attention_bias", False) not in (False, None):
            raise ConfigError("attention_bias=true is not supported: DeepSeek-V3 linears have no bias")
        if ex.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act={ex['hidden_act']!r} is not supported: use silu (SwiGLU)")
        nkv = ex.get("num_key_value_heads", self.num_attention_heads)
        if nkv != self.num_attention_heads:
            raise ConfigError(
                f"num_key_value_heads={nkv} must equal num_attention_heads="
                f"{self.num_attention_heads} (MLA has no grouped KV heads)"
            )
        if ex.get("tie_word_embeddings", False):
            raise ConfigError(
                "tie_word_embeddings=true is not supported: DeepSeek-V3 keeps lm_head separate"
            )
        if ex.get("moe_layer_freq", 1) != 1:
            raise ConfigError(f"moe_layer_freq={ex['moe_layer_freq']} is not supported: use 1")
        if ex.get("attention_dropout", 0.0) not in (0, 0.0):
            raise ConfigError("attention_dropout must be 0: refmtp has no dropout")
        if ex.get("rope_interleave", True) is not True:
            raise ConfigError(
                "rope_interleave=false is not supported: refmtp uses DeepSeek's interleaved RoPE"
            )
        if "head_dim" in ex and ex["head_dim"] != self.qk_rope_head_dim:
            raise ConfigError(
                f"head_dim={ex['head_dim']} must equal qk_rope_head_dim={self.qk_rope_head_dim} "
                "(HF uses head_dim for the RoPE width)"
            )

    # ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {}
        for f in dataclasses.fields(self):
            if f.name in ("refmtp", "extra"):
                continue
            d[f.name] = getattr(self, f.name)
        d.update(self.extra)
        d["refmtp"] = dataclasses.asdict(self.refmtp)
        return dict(sorted(d.items()))

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        if not isinstance(data, dict):
            raise ConfigError("config must be a JSON object")
        data = dict(data)
        own = {f.name for f in dataclasses.fields(cls)} - {"refmtp", "extra"}
        kwargs, extra = {}, {}
        settings = data.pop("refmtp", {}) or {}
        if not isinstance(settings, dict):
            raise ConfigError("refmtp must be an object of refmtp settings")
        known_settings = {f.name for f in dataclasses.fields(RefmtpSettings)}
        for key in settings:
            if key not in known_settings:
                raise ConfigError(
                    f"unknown config field 'refmtp.{key}' (known: {', '.join(sorted(known_settings))})"
                )
        for key, value in data.items():
            if key in own:
                kwargs[key] = value
            elif key in PASSTHROUGH_FIELDS:
                extra[key] = value
            else:
                raise ConfigError(f"unknown config field {key!r}")
        # HF v5 folds rope_theta / rope_scaling into rope_parameters: accept that spelling too.
        rp = extra.get("rope_parameters")
        if isinstance(rp, dict) and "rope_theta" in rp and "rope_theta" not in kwargs:
            kwargs["rope_theta"] = rp["rope_theta"]
        for key in ("hidden_size", "vocab_size"):
            if key in kwargs and isinstance(kwargs[key], float) and kwargs[key].is_integer():
                kwargs[key] = int(kwargs[key])
        cfg = cls(**kwargs, refmtp=RefmtpSettings(**settings), extra=extra)
        return cfg.validate()

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path) -> "ModelConfig":
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path} is not UTF-8 text: not a config.json") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
        return cls.from_dict(data)

    def replace(self, **changes) -> "ModelConfig":
        """A validated copy with some fields changed (``refmtp=`` takes a dict of settings)."""
        if "refmtp" in changes and isinstance(changes["refmtp"], dict):
            changes["refmtp"] = dataclasses.replace(self.refmtp, **changes["refmtp"])
        return dataclasses.replace(self, **changes).validate()


# -------------------------------------------------------------------------------------------
# Presets
# -------------------------------------------------------------------------------------------
def _tiny() -> ModelConfig:
    # Every feature on, every dimension small: MoE with 2 groups, D=2 MTP modules, q-LoRA.
    return ModelConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, moe_intermediate_size=8,
        num_hidden_layers=2, num_nextn_predict_layers=2, num_attention_heads=2,
        q_lora_rank=12, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=2,
        routed_scaling_factor=2.5, first_k_dense_replace=1, max_position_embeddings=512,
    ).validate()


def _small() -> ModelConfig:
    # The default training model (byte-level vocab 256), 3.6M parameters (~1.8M active per
    # token). Chosen by measurement for `refmtp train`'s ~10 min on 2 CPU cores: at equal compute
    # it beat hidden 256 (6.1M) and 6 layers (5.1M); see docs/training.md.
    return ModelConfig(
        vocab_size=256, hidden_size=192, intermediate_size=512, moe_intermediate_size=128,
        num_hidden_layers=4, num_nextn_predict_layers=1, num_attention_heads=4,
        q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=2,
        routed_scaling_factor=2.5, first_k_dense_replace=1, max_position_embeddings=2048,
    ).validate()


def _mini() -> ModelConfig:
    # The MTP experiment's model (refmtp experiment mtp, docs/experiments.md): 3 layers (1 dense +
    # 2 MoE), hidden 128, byte-level vocab 256: 0.80M parameters without MTP, 1.12M with D=1. Sized by measured step
    # times so 4 variants x 3 seeds plus the matched-compute runs fit in the experiment's budget.
    return ModelConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
        num_hidden_layers=3, num_nextn_predict_layers=1, num_attention_heads=4,
        q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=2,
        routed_scaling_factor=2.5, first_k_dense_replace=1, max_position_embeddings=512,
    ).validate()


def _draft() -> ModelConfig:
    # An independent draft model for speculative decoding with a small-preset target (docs/inference.md,
    # "Independent draft model"): the same byte vocabulary, MLA, dense SwiGLU layers (no MoE), no MTP.
    # 0.42M parameters; measured 0.75 ms per decoded token against the small preset's 3.4 ms (one
    # thread, random weights), and about 5x cheaper per training step.
    return ModelConfig(
        vocab_size=256, hidden_size=128, intermediate_size=384, moe_intermediate_size=0,
        num_hidden_layers=2, num_nextn_predict_layers=0, num_attention_heads=2,
        q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        n_routed_experts=0, n_shared_experts=0, first_k_dense_replace=2, max_position_embeddings=2048,
    ).validate()


def _decode_membound() -> ModelConfig:
    # A decoding-speed probe, never trained (random weights are fine for timing): the small
    # preset's layout (4 layers, 1 dense + 3 MoE, one MTP module, bytes) widened to d = 2048 so
    # the weights (327M parameters, 1.3 GB in float32) and the ~137M read per decoded token
    # (~550 MB) are far larger than the CPU caches: decoding streams them from memory
    # (benchmarks/decode.py, docs/performance.md "Decoding").
    return ModelConfig(
        vocab_size=256, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1024,
        num_hidden_layers=4, num_nextn_predict_layers=1, num_attention_heads=16,
        q_lora_rank=768, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=2,
        routed_scaling_factor=2.5, first_k_dense_replace=1, max_position_embeddings=4096,
    ).validate()


def _deepseek_v3() -> ModelConfig:
    # The published dimensions (for shapes and audits only: 671B parameters).
    return ModelConfig(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_nextn_predict_layers=1, num_attention_heads=128,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
        n_group=8, topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True,
        scoring_func="sigmoid", topk_method="noaux_tc", first_k_dense_replace=3,
        rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=163840,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        extra={"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
               "num_key_value_heads": 128, "hidden_act": "silu", "attention_bias": False,
               "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
               "initializer_range": 0.02, "moe_layer_freq": 1, "ep_size": 1,
               "aux_loss_alpha": 0.001, "seq_aux": True, "torch_dtype": "bfloat16"},
    ).validate()


PRESETS = {"tiny": _tiny, "mini": _mini, "small": _small, "draft": _draft,
           "decode-membound": _decode_membound, "deepseek-v3": _deepseek_v3}


def preset(name: str) -> ModelConfig:
    """A fresh copy of a named preset: tiny, mini, small, draft, decode-membound or deepseek-v3."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()
