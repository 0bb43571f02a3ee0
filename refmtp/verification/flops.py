"""Analytic matmul FLOP count of the refmtp model: forward, backward and one training step.

Counted: every matrix product the implementation runs, at ``2*m*n*k`` FLOPs per
``(m, k) @ (k, n)`` product (one multiply and one add per term). Not counted: elementwise work
(RMSNorm, RoPE, softmax, SiLU, cross-entropy, the balance loss, AdamW), gathers and scatters;
on these models they are a few percent of the matmul FLOPs but not of the time (see
docs/performance.md). ``tests/test_flops.py`` checks every number here against a count of the
matmuls actually executed by ``refmtp.model.forward`` / ``backward``.

Per block on ``N = B*T'`` rows (``T'`` = T for main layers, T-k for MTP module / head k), with
the dimension letters of docs/architecture.md, forward FLOPs are

    MLA projections   2N [d Rq + Rq H(Dn+Dr) + d (Rkv+Dr) + Rkv H(Dn+Dv) + H Dv d]
                      (q_lora_rank None: 2N d H(Dn+Dr) in place of the first two terms)
    MLA attention     2 B H T'^2 (Dn+Dr+Dv)    q k^T and p v over the FULL T' x T' square:
                      the causal mask is applied to the computed scores, so half of this is
                      masked work (the ``attention_useful`` figure is the causal half)
    dense MLP         6N d I_dense                                   (layers < first_k_dense_replace)
    MoE               2N d E  (router)  +  6 N K d I  (routed: N*K token-slots, whatever the
                      routing)  +  6 N d (N_s I)  (shared experts)

plus, per model, ``2 B T d V`` for the main lm_head and, per MTP depth k, ``2 B (T-k) d V``
(shared lm_head) and ``2 B (T-k) (2d) d`` (eh_proj; causal MTP only). Every backward product
pair (``dx = dy W``, ``dW = dy^T x``; attention's ``dv, dp, dq, dk``; SwiGLU's five products) costs
exactly twice its forward, so ``backward = 2 * forward`` and a training step is
``3 * forward`` matmul FLOPs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["FlopCount", "block_flops", "model_flops", "train_step_flops", "useful_train_step_flops"]


@dataclass(frozen=True)
class FlopCount:
    """Matmul FLOPs of one forward and one backward, with the forward split by part."""

    forward: int
    backward: int
    parts: dict = field(default_factory=dict)  # part name -> forward FLOPs (sums to forward)
    attention_useful: int = 0  # forward FLOPs of the causal half of q k^T and p v (not run separately)

    @property
    def total(self) -> int:
        """Forward + backward: the matmul FLOPs of one training step."""
        return self.forward + self.backward

    @property
    def useful_total(self) -> int:
        """``total`` with the attention products counted on the causal half only (the masked half
        is not work a causal model needs; the attention kernel skips most of it)."""
        masked = self.parts.get("attention_scores", 0) - self.attention_useful  # forward
        return self.total - 3 * masked


def _check(cfg, batch, seq):
    for name, v in (("batch", batch), ("seq", seq)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"flops: {name}={v!r} must be an integer >= 1")
    if seq <= cfg.D:
        raise ValueError(
            f"flops: seq={seq} main positions must exceed num_nextn_predict_layers={cfg.D} "
            "(depth k trains on T-k rows)"
        )


def _add(parts: dict, name: str, flops: int) -> None:
    parts[name] = parts.get(name, 0) + int(flops)


def block_flops(cfg, layer: int, batch: int, rows: int) -> dict:
    """Forward matmul FLOPs of one decoder block (layer index ``layer``) on ``batch`` sequences
    of ``rows`` positions, split into parts (module docstring)."""
    d, H = cfg.hidden_size, cfg.num_attention_heads
    Dn, Dr, Dv, Rkv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    N = batch * rows
    parts: dict = {}
    # MLA (V3 eqs. 1-11): the five projections, then the two attention products
    if cfg.q_lora_rank is None:
        q = d * H * (Dn + Dr)  # q_proj
    else:
        q = d * cfg.q_lora_rank + cfg.q_lora_rank * H * (Dn + Dr)  # q_a_proj, q_b_proj
    proj = q + d * (Rkv + Dr) + Rkv * H * (Dn + Dv) + H * Dv * d  # + kv_a, kv_b, o_proj
    _add(parts, "attention_proj", 2 * N * proj)
    _add(parts, "attention_scores", 2 * batch * H * rows * rows * (Dn + Dr + Dv))  # q k^T, p v
    if cfg.is_moe_layer(layer):  # DeepSeekMoE (V3 eq. 12)
        E, K, I = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
        _add(parts, "moe_router", 2 * N * d * E)
        _add(parts, "moe_routed", 6 * N * K * d * I)  # N*K token-slots, 3 products each
        if cfg.n_shared_experts > 0:
            _add(parts, "moe_shared", 6 * N * d * cfg.n_shared_experts * I)
    else:  # dense SwiGLU MLP
        _add(parts, "dense_mlp", 6 * N * d * cfg.intermediate_size)
    return parts


def model_flops(cfg, batch: int, seq: int) -> FlopCount:
    """Matmul FLOPs of ``refmtp.model.forward`` and ``backward`` on tokens of shape
    ``(batch, seq+1)`` (``seq`` = T main positions)."""
    _check(cfg, batch, seq)
    d, V, L, D = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers, cfg.D
    H, Dq, Dv = cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    parts: dict = {}
    useful = 0

    def causal_half(rows):  # scores and p v restricted to j <= t: rows (rows + 1) / 2 pairs
        return 2 * batch * H * (rows * (rows + 1) // 2) * (Dq + Dv)

    for layer in range(L):
        for name, f in block_flops(cfg, layer, batch, seq).items():
            _add(parts, name, f)
        useful += causal_half(seq)
    _add(parts, "lm_head", 2 * batch * seq * d * V)
    for k in range(1, D + 1):
        rows = seq - k
        for name, f in block_flops(cfg, L + k - 1, batch, rows).items():
            _add(parts, name, f)
        useful += causal_half(rows)
        if cfg.refmtp.mtp_kind == "causal":
            _add(parts, "mtp_eh_proj", 2 * batch * rows * (2 * d) * d)
        _add(parts, "lm_head", 2 * batch * rows * d * V)  # the shared lm_head on depth k
    forward = sum(parts.values())
    return FlopCount(forward=forward, backward=2 * forward, parts=dict(sorted(parts.items())),
                     attention_useful=useful)


def train_step_flops(cfg, batch: int, seq: int) -> int:
    """Matmul FLOPs of one training step (forward + backward; AdamW adds no matmul)."""
    return model_flops(cfg, batch, seq).total


def useful_train_step_flops(cfg, batch: int, seq: int) -> int:
    """``train_step_flops`` without the masked half of the attention products (``useful_total``)."""
    return model_flops(cfg, batch, seq).useful_total
