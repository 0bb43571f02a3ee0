"""A plain PyTorch DeepSeek-V3 (MLA, DeepSeekMoE, causal MTP or parallel heads) for the tests.

It plays the ``MyDeepseekV3`` of the PyTorch example in docs/golden-format.md section 6: an
outside implementation written from the format page and the config's HF field names only. It
imports nothing from refmtp; gradients come from autograd (torch lives in the tests only).

    model = MyDeepseekV3.from_config_json("golden/tiny_d2/config.json").to(torch.float64)
    model.load_state_dict(load_file("golden/tiny_d2/model.safetensors"))
    out = model(tokens)         # tokens (B, T+1) int64
    out.logits, out.mtp_logits, out.losses, out.routing {layer: (idx, weight)}, out.load {layer: (E,)}

Parameter names are the checkpoint names. The MTP modules' checkpoint copies
``model.layers.{L+k-1}.embed_tokens`` / ``.shared_head.head`` are the shared modules registered
a second time (tied), so ``named_parameters()`` lists each tensor once, under the shared name.
``e_score_correction_bias`` is a buffer: it has no gradient. Only what the shipped cases use
is implemented (sigmoid ``noaux_tc`` routing, ``seq`` balance loss); anything else raises.
"""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

# Deliberate bugs this independent implementation can carry (names from refmtp's bug catalog),
# for tests/test_golden_torch.py: verify must fail and name the bug. Empty in normal use.
BUGS: set[str] = set()


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt((x * x).mean(-1, keepdim=True) + self.eps))


def linear(i, o):
    return nn.Linear(i, o, bias=False)


class SwiGLU(nn.Module):
    def __init__(self, d, width):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = linear(d, width), linear(d, width), linear(width, d)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_inv_freq(c) -> list[float]:
    """theta_j = base^(-2j/Dr), YaRN-interpolated when rope_scaling is set (HF yarn)."""
    Dr, base = c["qk_rope_head_dim"], float(c["rope_theta"])
    theta = [base ** (-2.0 * j / Dr) for j in range(Dr // 2)]
    rs = c.get("rope_scaling")
    if not rs:
        return theta
    s, L0 = float(rs["factor"]), rs["original_max_position_embeddings"]

    def corr(r):
        return Dr * math.log(L0 / (2 * math.pi * r)) / (2 * math.log(base))

    low = max(math.floor(corr(rs.get("beta_fast", 32))), 0)
    high = min(math.ceil(corr(rs.get("beta_slow", 1))), Dr - 1)
    if high == low:
        high += 0.001
    out = []
    for j, th in enumerate(theta):
        ramp = min(max((j - low) / (high - low), 0.0), 1.0)
        out.append(th / s * ramp + th * (1 - ramp))
    return out


def yarn_mscale(s, m):
    return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0


class MLA(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, H = c["hidden_size"], c["num_attention_heads"]
        self.H, self.Dn, self.Dr, self.Dv = H, c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
        self.Rkv, self.eps, self.c = c["kv_lora_rank"], c["rms_norm_eps"], c
        if c["q_lora_rank"] is None:
            self.q_proj = linear(d, H * (self.Dn + self.Dr))
        else:
            self.q_a_proj = linear(d, c["q_lora_rank"])
            self.q_a_layernorm = RMSNorm(c["q_lora_rank"], self.eps)
            self.q_b_proj = linear(c["q_lora_rank"], H * (self.Dn + self.Dr))
        self.kv_a_proj_with_mqa = linear(d, self.Rkv + self.Dr)
        self.kv_a_layernorm = RMSNorm(self.Rkv, self.eps)
        self.kv_b_proj = linear(self.Rkv, H * (self.Dn + self.Dv))
        self.o_proj = linear(H * self.Dv, d)
        rs = c.get("rope_scaling")
        self.scale = (self.Dn + self.Dr) ** -0.5
        self.rope_factor = 1.0
        if rs:
            s = float(rs["factor"])
            m = yarn_mscale(s, rs.get("mscale_all_dim", 0.0))
            self.scale *= m * m
            self.rope_factor = yarn_mscale(s, rs.get("mscale", 1.0)) / m

    def rope(self, x, T):
        """Interleaved pairs (x[2j], x[2j+1]) rotated by angle t * theta_j (angles in float64)."""
        ang = torch.arange(T, dtype=torch.float64)[:, None] * torch.tensor(rope_inv_freq(self.c), dtype=torch.float64)
        cos = (torch.cos(ang) * self.rope_factor).to(x.dtype)
        sin = (torch.sin(ang) * self.rope_factor).to(x.dtype)
        if "rope.neox_pairs" in BUGS:  # rotate_half layout
            h = x.shape[-1] // 2
            x0, x1 = x[..., :h], x[..., h:]
            return torch.cat([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).reshape(x.shape)

    def forward(self, x):
        B, T, _ = x.shape
        H, Dn, Dr, Dv = self.H, self.Dn, self.Dr, self.Dv
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, H, Dn + Dr).transpose(1, 2)  # (B, H, T, Dn+Dr)
        q = torch.cat([q[..., :Dn], self.rope(q[..., Dn:], T)], dim=-1)
        kv = self.kv_a_proj_with_mqa(x)  # (B, T, Rkv+Dr), latent first
        c_kv = self.kv_a_layernorm(kv[..., :self.Rkv])
        k_pe = self.rope(kv[..., self.Rkv:], T)  # (B, T, Dr), shared by the heads
        kvb = self.kv_b_proj(c_kv).view(B, T, H, Dn + Dv).transpose(1, 2)
        k_nope, v = kvb[..., :Dn], kvb[..., Dn:]
        if "mla.kv_b_split_swapped" in BUGS:
            v, k_nope = kvb[..., :Dv], kvb[..., Dv:]
        k = torch.cat([k_nope, k_pe[:, None].expand(B, H, T, Dr)], dim=-1)
        s = (q @ k.transpose(-1, -2)) * self.scale
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
        o = (p @ v).transpose(1, 2).reshape(B, T, H * Dv)
        return self.o_proj(o)


class Gate(nn.Module):
    def __init__(self, c):
        super().__init__()
        E = c["n_routed_experts"]
        self.weight = nn.Parameter(torch.empty(E, c["hidden_size"]))
        self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))


class MoE(nn.Module):
    def __init__(self, c):
        super().__init__()
        if c["scoring_func"] != "sigmoid" or c["topk_method"] != "noaux_tc":
            raise NotImplementedError("this test model routes like V3 only (sigmoid, noaux_tc)")
        d, I, E = c["hidden_size"], c["moe_intermediate_size"], c["n_routed_experts"]
        self.c, self.E, self.K = c, E, c["num_experts_per_tok"]
        self.gate = Gate(c)
        self.experts = nn.ModuleList([SwiGLU(d, I) for _ in range(E)])
        if c["n_shared_experts"]:
            self.shared_experts = SwiGLU(d, c["n_shared_experts"] * I)

    def forward(self, x):
        """-> (out, idx (B, T, K), gate values (B, T, K), load (E,), balance loss without alpha)."""
        c, E, K = self.c, self.E, self.K
        B, T, d = x.shape
        x2 = x.reshape(B * T, d)
        s = torch.sigmoid(x2 @ self.gate.weight.T)  # (N, E) affinities
        sc = s + self.gate.e_score_correction_bias.to(s.dtype)  # selection only
        G, TG = c["n_group"], c["topk_group"]
        if 1 < G and TG < G:  # group-limited: keep the TG groups with the best top-2 sums
            grouped = sc.view(-1, G, E // G)
            gs = grouped.topk(2, dim=-1).values.sum(-1)  # (N, G)
            keep = torch.zeros_like(gs, dtype=torch.bool).scatter_(1, gs.topk(TG, dim=-1).indices, True)
            fill = 0.0 if "router.mask_zero" in BUGS else float("-inf")
            sc = grouped.masked_fill(~keep[..., None], fill).view(-1, E)
        idx = sc.topk(K, dim=-1).indices  # (N, K)
        w = (sc if "router.bias_in_gate_values" in BUGS else s).gather(1, idx)
        if c["norm_topk_prob"]:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        if "router.no_scaling" not in BUGS:
            w = w * c["routed_scaling_factor"]
        out = torch.zeros_like(x2)
        for e in range(E):
            tok, slot = torch.nonzero(idx == e, as_tuple=True)
            if tok.numel():  # an expert no token chose is not run: its weights get no .grad
                out = out.index_add(0, tok, w[tok, slot, None] * self.experts[e](x2[tok]))
        if hasattr(self, "shared_experts"):
            out = out + self.shared_experts(x2)
        load = torch.bincount(idx.reshape(-1), minlength=E)
        if c["refmtp"].get("balance_loss", "seq") != "seq":
            raise NotImplementedError("this test model has the sequence-wise balance loss only")
        sb = s.view(B, T, E)  # V3 eqs. 17-20 per sequence, f from the top-K of the unbiased s
        count = torch.zeros(B, E, dtype=s.dtype).scatter_add_(
            1, sb.topk(K, dim=-1).indices.reshape(B, T * K), torch.ones(B, T * K, dtype=s.dtype))
        f = count * (E / (K * T))
        P = (sb / sb.sum(-1, keepdim=True)).mean(1)
        aux = (f * P).sum(-1).mean()
        return out.view(B, T, d), idx.view(B, T, K), w.view(B, T, K), load, aux


class Block(nn.Module):
    def __init__(self, c, layer):
        super().__init__()
        d, eps = c["hidden_size"], c["rms_norm_eps"]
        self.input_layernorm = RMSNorm(d, eps)
        self.self_attn = MLA(c)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.moe = layer >= c["first_k_dense_replace"] and c["n_routed_experts"] > 0
        self.mlp = MoE(c) if self.moe else SwiGLU(d, c["intermediate_size"])

    def forward(self, x):
        """-> (y, routing record or None)."""
        h = x + self.self_attn(self.input_layernorm(x))
        m = self.post_attention_layernorm(h)
        if not self.moe:
            return h + self.mlp(m), None
        f, idx, w, load, aux = self.mlp(m)
        return h + f, (idx, w, load, aux)


class MTPLayer(Block):
    """Causal MTP module k: eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)]) -> block -> shared_head.norm."""

    def __init__(self, c, layer, embed_tokens, lm_head):
        super().__init__(c, layer)
        d, eps = c["hidden_size"], c["rms_norm_eps"]
        self.enorm, self.hnorm = RMSNorm(d, eps), RMSNorm(d, eps)
        self.eh_proj = linear(2 * d, d)
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(d, eps)
        self.shared_head.head = lm_head  # the checkpoint's copies, tied to the shared modules
        self.embed_tokens = embed_tokens


class MyDeepseekV3(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.c = c
        V, d, L = c["vocab_size"], c["hidden_size"], c["num_hidden_layers"]
        self.D = c.get("num_nextn_predict_layers", 0)
        self.kind = c["refmtp"].get("mtp_kind", "causal")
        self.lm_head = linear(d, V)  # registered first: named_parameters() names it lm_head.weight
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(V, d)
        layers = [Block(c, i) for i in range(L)]
        for k in range(1, self.D + 1):
            layers.append(MTPLayer(c, L + k - 1, self.model.embed_tokens, self.lm_head)
                          if self.kind == "causal" else Block(c, L + k - 1))
        self.model.layers = nn.ModuleList(layers)
        self.model.norm = RMSNorm(d, c["rms_norm_eps"])

    @classmethod
    def from_config_json(cls, path):
        with open(path) as f:
            return cls(json.load(f))

    def forward(self, tokens):
        c, D, L = self.c, self.D, self.c["num_hidden_layers"]
        r = c["refmtp"]
        B, T = tokens.shape[0], tokens.shape[1] - 1
        V = c["vocab_size"]
        routing, load, aux = {}, {}, []

        def block(layer, x):
            y, rec = self.model.layers[layer](x)
            if rec is not None:
                routing[layer], load[layer] = rec[:2], rec[2]
                aux.append(rec[3])
            return y

        def xent_sum(logits, targets):
            return F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), reduction="sum")

        x = self.model.embed_tokens(tokens[:, :T])
        for layer in range(L):
            x = block(layer, x)
        z = x
        h = self.model.norm(z)
        logits = self.lm_head(h)
        losses = {"main": xent_sum(logits, tokens[:, 1:]) / (B * T)}
        total = losses["main"]
        mtp_logits = []
        for k in range(1, D + 1):
            Tk, layer = T - k, L + k - 1
            if self.kind == "causal":
                m = self.model.layers[layer]
                e = self.model.embed_tokens(tokens[:, k:T])
                eh = [m.enorm(e), m.hnorm(h[:, :Tk])]
                y = block(layer, m.eh_proj(torch.cat(eh[::-1] if "mtp.eh_concat_swapped" in BUGS else eh, dim=-1)))
                n = m.shared_head.norm(y)
                h = n if r.get("mtp_chain", "post_norm") == "post_norm" else y
            else:  # parallel head k on the trunk output, then the shared model.norm
                n = self.model.norm(block(layer, z[:, :Tk]))
            lk = self.lm_head(n)
            mtp_logits.append(lk)
            norm = B * T if r.get("mtp_loss_norm", "paper") == "paper" else B * Tk
            losses[f"mtp.{k}"] = xent_sum(lk, tokens[:, k + 1:]) / norm
            total = total + r["mtp_lambda"] / D * losses[f"mtp.{k}"]
        losses["balance"] = r["seq_aux_alpha"] * (sum(aux) if aux else torch.zeros((), dtype=logits.dtype))
        losses["total"] = total + losses["balance"]
        return SimpleNamespace(logits=logits, mtp_logits=mtp_logits, losses=losses, routing=routing, load=load)
