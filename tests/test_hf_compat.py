"""Optional: a refmtp checkpoint loads in HF transformers' DeepseekV3ForCausalLM and gives the
same main-model logits (needs torch and transformers; skipped with the reason otherwise).

Known, accepted differences (spec sections 1, 2.4, 3.2), all below the tolerances here:
* HF computes every RMSNorm and the router (logits, sigmoid, top-K weights) in float32 even in
  a float64 model, so float64 logits agree to ~1e-6, not to 1e-15;
* HF de-interleaves RoPE on the fly (rope_interleave=True): equivalent, no weight permutation;
* HF masks dropped groups with -inf and scores groups by the top-2 sum, as refmtp does.
The MTP layers (model.layers.{L}..) are not part of HF's model: from_pretrained ignores them.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs torch (optional extra: pip install 'refmtp[torch]')")
transformers = pytest.importorskip(
    "transformers", reason="needs transformers (optional extra: pip install 'refmtp[torch]')"
)

from refmtp.checkpoint import save_checkpoint  # noqa: E402
from refmtp.config import preset  # noqa: E402
from refmtp.model import init_params  # noqa: E402
from refmtp.model import forward  # noqa: E402

pytestmark = pytest.mark.torch

TOL = {"float64": 1e-5, "float32": 1e-4}  # max |logit difference|, logits are O(1)


def _hf_logits(path, dtype, ids):
    from transformers import DeepseekV3ForCausalLM

    tdtype = getattr(torch, dtype)
    # eager attention and eager experts: the fused grouped-GEMM experts of transformers 5 have
    # no float64 kernel
    kw = {"attn_implementation": "eager"}
    if int(transformers.__version__.split(".")[0]) >= 5:
        kw.update(dtype=tdtype, experts_implementation="eager")
    else:
        kw.update(torch_dtype=tdtype)
    model = DeepseekV3ForCausalLM.from_pretrained(path, **kw)
    model.eval()
    with torch.no_grad():
        out = model(torch.from_numpy(ids))
    assert out.logits.dtype == tdtype
    return out.logits.numpy()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("topk_group", [2, 1])  # 1: groups really dropped (-inf masking)
def test_hf_main_logits_match(tmp_path, dtype, topk_group):
    cfg = preset("tiny").replace(topk_group=topk_group)
    params = init_params(cfg, seed=11, dtype=dtype, std=0.2, bias_std=0.05)
    save_checkpoint(tmp_path / "ck", cfg, params)
    rng = np.random.default_rng(11)
    tokens = rng.integers(0, cfg.vocab_size, size=(2, 9))
    out, _ = forward(params, cfg, tokens, need_cache=False)
    ours = np.asarray(out.logits)  # (B, T, V) main-model logits of tokens[:, :T]
    theirs = _hf_logits(str(tmp_path / "ck"), dtype, tokens[:, :-1])
    diff = float(np.max(np.abs(ours - theirs)))
    print(f"HF {transformers.__version__} {dtype} topk_group={topk_group}: max |logit diff| = {diff:.3e}")
    assert theirs.shape == ours.shape
    assert diff < TOL[dtype], f"max |logit diff| {diff:.3e} vs HF DeepseekV3ForCausalLM"


def _full_precision_hf(monkeypatch):
    """Patch HF's float32 islands (RMSNorm, router, RoPE tables, attention softmax) to compute
    in the model dtype; each patch is HF's own code with the float32 casts removed."""
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

    F = torch.nn.functional

    def norm_forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def router_forward(self, hidden_states):
        hidden_states = hidden_states.view(-1, self.hidden_dim)
        scores = F.linear(hidden_states, self.weight).sigmoid()
        choice = scores + self.e_score_correction_bias.to(scores.dtype)
        G = self.num_group
        group_scores = choice.view(-1, G, self.num_experts // G).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        mask = group_mask.unsqueeze(-1).expand(-1, G, self.num_experts // G).reshape(-1, self.num_experts)
        choice = choice.masked_fill(~mask.bool(), float("-inf"))
        idx = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]
        w = scores.gather(1, idx)
        if self.norm_topk_prob:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return None, w * self.routed_scaling_factor, idx

    def rope_forward(self, x, position_ids):
        dim = self.config.head_dim
        base = self.config.rope_parameters["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        freqs = position_ids[..., None].to(torch.float64) * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        w = torch.matmul(query, key.transpose(2, 3)) * scaling
        if attention_mask is not None:
            w = w + attention_mask
        w = F.softmax(w, dim=-1)
        return torch.matmul(w, value).transpose(1, 2).contiguous(), w

    monkeypatch.setattr(hf.DeepseekV3RMSNorm, "forward", norm_forward)
    monkeypatch.setattr(hf.DeepseekV3TopkRouter, "forward", router_forward)
    monkeypatch.setattr(hf.DeepseekV3RotaryEmbedding, "forward", rope_forward)
    monkeypatch.setattr(hf, "eager_attention_forward", attention)


def test_hf_float64_logits_exact_with_full_precision_norms(tmp_path, monkeypatch):
    """With HF's float32 islands switched to float64 the logits agree to rounding: the ~5e-7 of
    the test above is HF's float32 arithmetic, not a mismatch of weights or equations."""
    _full_precision_hf(monkeypatch)
    cfg = preset("tiny").replace(topk_group=1)
    params = init_params(cfg, seed=12, dtype="float64", std=0.2, bias_std=0.05)
    save_checkpoint(tmp_path / "ck", cfg, params)
    tokens = np.random.default_rng(12).integers(0, cfg.vocab_size, size=(2, 9))
    ours = np.asarray(forward(params, cfg, tokens, need_cache=False)[0].logits)
    theirs = _hf_logits(str(tmp_path / "ck"), "float64", tokens[:, :-1])
    diff = float(np.max(np.abs(ours - theirs)))
    print(f"HF {transformers.__version__} float64, float32 islands patched to float64: max |logit diff| = {diff:.3e}")
    assert diff < 1e-12
