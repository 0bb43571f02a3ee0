"""ModelConfig: DeepSeek-V3's published config.json loads and round-trips; bad values are rejected."""
from __future__ import annotations

import json

import pytest

from refmtp.config import ConfigError, ModelConfig, preset

# The published DeepSeek-V3 config.json (HUB, docs/deepseek-v3.md §5.3), quantization block included.
PUBLISHED_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                 "AutoModel": "modeling_deepseek.DeepseekV3Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1,
    "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168,
    "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1,
    "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                            "quant_method": "fp8", "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                     "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
    "seq_aux": True, "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16", "transformers_version": "4.33.1", "use_cache": True,
    "v_head_dim": 128, "vocab_size": 129280,
}


def test_published_v3_config_loads_and_keeps_every_field(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(PUBLISHED_V3))
    cfg = ModelConfig.load(path)
    assert cfg.hidden_size == 7168 and cfg.n_group == 8 and cfg.yarn["factor"] == 40.0
    out = cfg.to_dict()
    for key, value in PUBLISHED_V3.items():
        assert out[key] == value, key
    assert out["refmtp"]["mtp_lambda"] == 0.3
    cfg.save(tmp_path / "again.json")
    assert ModelConfig.load(tmp_path / "again.json") == cfg


@pytest.mark.parametrize("name", ["tiny", "mini", "small", "deepseek-v3"])
def test_presets_validate_and_round_trip(name, tmp_path):
    cfg = preset(name)
    cfg.save(tmp_path / "c.json")
    assert ModelConfig.load(tmp_path / "c.json") == cfg


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset("huge")


@pytest.mark.parametrize("change,match", [
    ({"attention_bias": True}, "attention_bias=true"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"num_key_value_heads": 64}, "num_key_value_heads=64"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"frobnicate": 1}, "unknown config field 'frobnicate'"),
    ({"num_experts_per_tok": 300}, "num_experts_per_tok=300 must be <= n_routed_experts=256"),
    ({"n_group": 7}, "n_group=7 must divide n_routed_experts=256"),
    ({"topk_group": 9}, "topk_group=9 must be <= n_group=8"),
    ({"topk_group": 1, "num_experts_per_tok": 33}, "must be >= num_experts_per_tok=33"),
    ({"qk_rope_head_dim": 63}, "qk_rope_head_dim=63 must be even"),
    ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling type 'linear'"),
    ({"scoring_func": "softmax"}, "topk_method='noaux_tc' does not go with scoring_func='softmax'"),
    ({"hidden_size": 0}, "hidden_size=0 must be an integer >= 1"),
    ({"first_k_dense_replace": 70}, "first_k_dense_replace=70 must be <= num_hidden_layers=61"),
    ({"refmtp": {"mtp_chain": "sideways"}}, "refmtp.mtp_chain='sideways'"),
    ({"refmtp": {"bogus": 1}}, "unknown config field 'refmtp.bogus'"),
])
def test_rejections_name_the_field(change, match):
    data = dict(PUBLISHED_V3, **change)
    with pytest.raises(ConfigError, match=match) as info:
        ModelConfig.from_dict(data)
    assert "\n" not in str(info.value)


def test_q_lora_rank_null_is_allowed():
    cfg = ModelConfig.from_dict(dict(PUBLISHED_V3, q_lora_rank=None))
    assert cfg.q_lora_rank is None


def test_bad_json_file(tmp_path):
    p = tmp_path / "c.json"
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.load(p)
    with pytest.raises(ConfigError, match="cannot read config"):
        ModelConfig.load(tmp_path / "missing.json")


def test_yarn_reads_missing_mscales_as_zero_and_keeps_the_raw_config():
    # config.yarn fills no "mscale 1" default: a missing mscale / mscale_all_dim is 0 ("not
    # given"), which is how HF's rope code reads it (None and 0 are both falsy).
    rs = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "mscale": 0.707}
    cfg = preset("tiny").replace(rope_scaling=dict(rs))
    assert cfg.yarn["mscale"] == 0.707 and cfg.yarn["mscale_all_dim"] == 0.0
    assert preset("tiny").replace(rope_scaling={k: v for k, v in rs.items() if k != "mscale"}
                                  ).yarn["mscale"] == 0.0
    assert cfg.to_dict()["rope_scaling"] == rs  # written back as given, nothing filled in
    v3 = preset("deepseek-v3").yarn
    assert v3["mscale"] == 1.0 and v3["mscale_all_dim"] == 1.0
