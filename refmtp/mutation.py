"""Mutation switches: deliberate implementation mistakes, off unless a caller turns one on.

Each entry of :data:`CATALOG` names one plausible bug that an implementation of DeepSeek-V3 can
carry (many were shipped by real projects: ``source`` cites the issue or pull request). The
math modules test for it at the exact line the bug changes::

    if on("router.mask_zero"):          # the mutant: dropped groups masked with 0
        ...
    else:
        ...                             # the reference

Nothing is active unless code enters :func:`mutation`, so the reference path pays one set
lookup per switch. Entering a mutation also switches the accelerated kernels off, so the
mutated line is on the path that runs. The catalog is run against the shipped golden cases by
:mod:`refmtp.verification.conformance` (``refmtp golden conformance``; docs/conformance.md): every mutant must
make at least one shipped case fail, and the failure fingerprints feed ``verify``'s diagnosis.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple

from refmtp.backends import kernels_enabled, set_kernels_enabled


class Mutant(NamedTuple):
    id: str  # "<component>.<what>", the switch name used in the code
    component: str  # rope, mla, decode, router, experts, balance, bias_update, mtp, loss, optim, acceptance
    what: str  # one line: what the mutated implementation does wrong
    source: str = ""  # public trackers where this bug class was reported ("owner/repo#N", ...)


CATALOG: tuple[Mutant, ...] = (
    # --- RoPE / YaRN (refmtp/model/ops/rope.py) ------------------------------------------------------
    Mutant("rope.neox_pairs", "rope",
           "rotates the halves (x[j], x[j+Dr/2]) (NeoX rotate_half) instead of the interleaved "
           "pairs (x[2j], x[2j+1]) the checkpoint's RoPE dims use",
           "vllm-project/vllm#28968, sgl-project/sglang#13495, ml-explore/mlx-lm#1431"),
    Mutant("rope.inv_freq_exponent", "rope",
           "inverse frequencies base^(-j/Dr) instead of base^(-2j/Dr)"),
    Mutant("rope.yarn_ramp_inverted", "rope",
           "YaRN ramp applied the wrong way round: high-frequency pairs interpolated, low ones kept"),
    Mutant("rope.yarn_no_floor_ceil", "rope",
           "YaRN correction range without floor(low) / ceil(high)"),
    Mutant("rope.yarn_betas_swapped", "rope",
           "YaRN correction range computed with beta_fast and beta_slow swapped"),
    Mutant("rope.yarn_cos_sin_factor_dropped", "rope",
           "cos/sin not multiplied by get_mscale(s, mscale) / get_mscale(s, mscale_all_dim)"),
    Mutant("rope.yarn_cos_sin_factor_inverted", "rope",
           "cos/sin factor inverted: get_mscale(s, mscale_all_dim) / get_mscale(s, mscale)"),
    Mutant("rope.yarn_cos_sin_plain_mscale", "rope",
           "cos/sin multiplied by get_mscale(s) = 0.1 ln s + 1 instead of the ratio "
           "get_mscale(s, mscale) / get_mscale(s, mscale_all_dim)",
           "ggml-org/llama.cpp#17945, sgl-project/sglang#22711"),
    Mutant("rope.yarn_softmax_mscale_dropped", "rope",
           "softmax scale left at qk_head_dim^-1/2, without the YaRN mscale^2",
           "huggingface/transformers#47435, vllm-project/tpu-inference#521"),
    Mutant("rope.yarn_softmax_mscale_once", "rope",
           "softmax scale multiplied by mscale once instead of mscale^2"),
    Mutant("rope.yarn_softmax_mscale_from_mscale", "rope",
           "softmax mscale computed from rope_scaling.mscale instead of mscale_all_dim",
           "NVIDIA/Megatron-LM#1429"),
    # --- MLA (refmtp/model/mla.py, refmtp/model/ops/attention.py) ------------------------------------------
    Mutant("mla.q_split_swapped", "mla",
           "each head's query split as [q_pe | q_nope] instead of [q_nope | q_pe]"),
    Mutant("mla.kv_a_split_swapped", "mla",
           "kv_a_proj_with_mqa output split as [k_pe | c_KV] instead of [c_KV | k_pe] (latent first)"),
    Mutant("mla.kv_b_split_swapped", "mla",
           "each head's kv_b_proj rows split as [v | k_nope] instead of [k_nope | v]"),
    Mutant("mla.no_kv_a_layernorm", "mla",
           "kv_a_layernorm skipped: the raw latent goes into kv_b_proj"),
    Mutant("mla.no_q_a_layernorm", "mla",
           "q_a_layernorm skipped between q_a_proj and q_b_proj"),
    Mutant("mla.latent_norm_eps", "mla",
           "the two latent RMSNorms use eps 1e-5 instead of rms_norm_eps",
           "huggingface/transformers#44261"),
    Mutant("mla.scale_nope_dim", "mla",
           "softmax scale qk_nope_head_dim^-1/2 instead of (qk_nope_head_dim + qk_rope_head_dim)^-1/2",
           "NVIDIA/Megatron-LM#1501"),
    Mutant("mla.scale_v_dim", "mla",
           "softmax scale v_head_dim^-1/2 instead of qk_head_dim^-1/2"),
    Mutant("mla.no_causal_mask", "mla",
           "attention without the causal mask (every query sees every key)"),
    Mutant("mla.k_pe_grad_one_head", "mla",
           "backward: the shared k_pe receives head 0's gradient instead of the sum over heads",
           "NVIDIA/Megatron-LM#6839"),
    # --- absorbed (latent-cache) decoding (refmtp/inference/decode.py) -------------------------------------
    Mutant("decode.absorbed_scale_latent_dim", "decode",
           "absorbed attention scaled by (kv_lora_rank + qk_rope_head_dim)^-1/2, the width of the "
           "absorbed key, instead of qk_head_dim^-1/2",
           "ollama/ollama#13893"),
    Mutant("decode.cache_latent_before_norm", "decode",
           "the latent cache stores c_KV before kv_a_layernorm"),
    Mutant("decode.cache_k_pe_unrotated", "decode",
           "the latent cache stores k_pe before RoPE"),
    Mutant("decode.positions_restart", "decode",
           "new tokens get RoPE positions 0..T-1 instead of cache_length..cache_length+T-1"),
    Mutant("decode.cache_not_read", "decode",
           "a decode call attends only to its own new tokens, not to the cached prefix"),
    Mutant("decode.values_from_w_uk", "decode",
           "absorbed output projected with W_UK instead of W_UV"),
    # --- router (refmtp/model/router.py) ------------------------------------------------------------
    Mutant("router.mask_zero", "router",
           "experts of dropped groups masked with 0 instead of -inf, so with negative biased "
           "scores a dropped group's experts win",
           "vllm-project/vllm#13474, sgl-project/sglang#3705, huggingface/transformers#45441, deepseek-ai/DeepSeek-V3#741"),
    Mutant("router.softmax_scores", "router",
           "affinities softmax(z) instead of sigmoid(z) under scoring_func sigmoid",
           "ggml-org/llama.cpp#18980"),
    Mutant("router.bias_in_gate_values", "router",
           "gate values taken from the biased scores s + b instead of the unbiased s",
           "vllm-project/vllm#12002, huggingface/transformers#41647"),
    Mutant("router.bias_ignored", "router",
           "e_score_correction_bias not added for selection"),
    Mutant("router.sigmoid_of_biased_logits", "router",
           "selection on sigmoid(z + b) instead of sigmoid(z) + b"),
    Mutant("router.no_scaling", "router",
           "routed_scaling_factor not applied to the gate values",
           "sgl-project/sglang-jax#1282"),
    Mutant("router.scaling_twice", "router",
           "routed_scaling_factor applied twice (in the gate values and again on the routed output)",
           "vllm-project/vllm#24119, sgl-project/sglang#35152"),
    Mutant("router.no_renormalisation", "router",
           "top-K gate values not renormalised to sum 1 (norm_topk_prob ignored)",
           "pytorch/torchtitan#1418, pytorch/torchtitan#1448"),
    Mutant("router.renormalise_over_all", "router",
           "gate values divided by the sum over all experts instead of the selected K"),
    Mutant("router.group_score_max", "router",
           "group score = max biased score of the group instead of the sum of its top 2",
           "vllm-project/vllm#13474, NVIDIA/Megatron-LM#1441"),
    Mutant("router.group_score_unbiased", "router",
           "group scores computed from the unbiased s instead of s + b"),
    Mutant("router.no_group_limit", "router",
           "n_group / topk_group ignored: top-K over all experts"),
    Mutant("router.backward_no_norm_term", "router",
           "backward of the renormalisation drops the -sum(dg w)/D term"),
    # --- experts (refmtp/model/moe.py, refmtp/model/ops/swiglu.py) --------------------------------------------
    Mutant("experts.shared_scaled", "experts",
           "shared-expert output multiplied by routed_scaling_factor",
           "sgl-project/sglang#28237, sgl-project/sglang#35163"),
    Mutant("experts.no_shared", "experts",
           "shared experts left out",
           "sgl-project/sglang#38963"),
    Mutant("experts.silu_on_up", "experts",
           "SwiGLU computes silu(up) * gate instead of silu(gate) * up"),
    Mutant("experts.combine_overwrites", "experts",
           "combine written as y[token] = w * y_e (assignment), so a token keeps one of its K experts"),
    # --- balance loss (refmtp/model/balance.py, refmtp/model/loss.py, refmtp/model/model.py) ------------------------
    Mutant("balance.f_from_routed_topk", "balance",
           "f_i counts the biased, group-limited routing instead of the top-K of the unbiased s (eq. 18)",
           "NVIDIA/Megatron-LM#1513"),
    Mutant("balance.p_unnormalised", "balance",
           "P_i averages s instead of s / sum_j s_j (eq. 19 skipped)",
           "NVIDIA/Megatron-LM#1438, PaddlePaddle/PaddleNLP#11160"),
    Mutant("balance.f_missing_scale", "balance",
           "f_i without the factor N_r / K (counts / T only)",
           "huggingface/transformers#43688"),
    Mutant("balance.batch_wise", "balance",
           "the sequence-wise loss computed once over the whole batch instead of per sequence"),
    Mutant("balance.mtp_layers_excluded", "balance",
           "the MTP modules' MoE blocks left out of the balance loss"),
    Mutant("balance.alpha_dropped", "balance",
           "seq_aux_alpha not applied to the balance loss"),
    Mutant("balance.alpha_zero", "balance",
           "the balance-loss coefficient silently 0, so the loss and its gradient vanish",
           "NVIDIA-NeMo/Megatron-Bridge#5165"),
    # --- auxiliary-loss-free bias update (refmtp/model/balance.py, refmtp/model/moe.py) -----------------------
    Mutant("bias_update.sign_flipped", "bias_update",
           "b += gamma sign(c_i - mean c): overloaded experts pushed up",
           "NVIDIA/Megatron-LM#7081"),
    Mutant("bias_update.proportional", "bias_update",
           "b += gamma (mean c - c_i) instead of gamma sign(mean c - c_i)"),
    Mutant("bias_update.load_unbiased", "bias_update",
           "the loads counted from the unbiased top-K instead of the routing actually used"),
    # --- MTP wiring (refmtp/model/mtp.py, refmtp/model/model.py) ----------------------------------------------
    Mutant("mtp.eh_concat_swapped", "mtp",
           "eh_proj input concatenated [hnorm(h) ; enorm(e)] instead of [enorm(e) ; hnorm(h)]",
           "ml-explore/mlx-lm#1469"),
    Mutant("mtp.norms_swapped", "mtp",
           "enorm applied to the hidden state and hnorm to the embedding"),
    Mutant("mtp.no_head_norm", "mtp",
           "the module's shared_head.norm skipped before the shared lm_head",
           "ROCm/ATOM#643"),
    Mutant("mtp.head_norm_is_model_norm", "mtp",
           "the main model's model.norm used in place of the module's shared_head.norm"),
    Mutant("mtp.hidden_before_final_norm", "mtp",
           "module 1 reads the trunk output before model.norm instead of h^0 = model.norm(z)",
           "vllm-project/vllm#47448"),
    Mutant("mtp.token_offset", "mtp",
           "module k embeds t_{i+k-1} instead of t_{i+k} (the shift off by one)",
           "vllm-project/vllm#14137"),
    Mutant("mtp.chain_from_main", "mtp",
           "every depth reads the main model's h^0 instead of the previous depth's state"),
    Mutant("mtp.chain_pre_norm", "mtp",
           "the state chained to depth k+1 is the block output y, not shared_head.norm(y)"),
    Mutant("mtp.embed_grad_not_summed", "mtp",
           "the MTP depths' embedding gradient not added to the shared embed_tokens gradient"),
    Mutant("mtp.lm_head_grad_not_summed", "mtp",
           "the MTP depths' lm_head gradient not added to the shared lm_head gradient"),
    # --- loss terms (refmtp/model/loss.py) --------------------------------------------------------------
    Mutant("loss.mtp_weight_no_D", "loss",
           "MTP terms weighted lambda instead of lambda / D (eq. 25)"),
    Mutant("loss.mtp_no_lambda", "loss",
           "MTP losses added to the main loss with weight 1 instead of lambda / D",
           "alibaba/Pai-Megatron-Patch#538"),
    Mutant("loss.mtp_norm_valid_rows", "loss",
           "depth-k loss divided by B*(T-k) valid rows instead of B*T (eq. 24)",
           "NVIDIA/Megatron-LM#2417"),
    Mutant("loss.main_sum", "loss",
           "main loss summed over tokens instead of averaged"),
    # --- optimizer and trajectory (refmtp/training/optim.py) -----------------------------------------------
    Mutant("optim.decay_norms", "optim",
           "weight decay applied to RMSNorm weights too",
           "huggingface/transformers#4360"),
    Mutant("optim.no_bias_correction", "optim",
           "AdamW without the 1 - beta^t bias corrections",
           "allenai/OLMo-core#317"),
    Mutant("optim.coupled_decay", "optim",
           "L2 decay added to the gradient (Adam + L2) instead of decoupled AdamW decay"),
    Mutant("optim.clip_per_tensor", "optim",
           "gradient clipping per tensor instead of by the global norm",
           "NVIDIA/Megatron-LM#5916"),
    Mutant("optim.warmup_from_zero", "optim",
           "warmup lr * s / warmup instead of lr * (s + 1) / warmup (step 0 gets lr 0)"),
    # --- speculative acceptance (refmtp/inference/acceptance.py) -------------------------------------------
    Mutant("acceptance.strict_less", "acceptance",
           "a draft accepted iff u q(d) < p(d) instead of u q(d) <= p(d)"),
    Mutant("acceptance.accepts_zero_p", "acceptance",
           "a draft with p(d) = 0 accepted when its coin is 0 (u q(d) <= p(d) without p(d) > 0)",
           "sgl-project/sglang#35771"),
    Mutant("acceptance.ignores_q", "acceptance",
           "a draft accepted iff u <= p(d), ignoring the draft probability q(d)"),
    Mutant("acceptance.residual_is_p", "acceptance",
           "after a rejection the token is drawn from p instead of max(p - q, 0)"),
    Mutant("acceptance.residual_softmax", "acceptance",
           "the residual is softmax(max(p - q, 0)) instead of max(p - q, 0) / sum",
           "huggingface/transformers#28508"),
    Mutant("acceptance.one_hot_keeps_draft", "acceptance",
           "with a one-hot drafter the residual keeps the rejected draft token"),
    Mutant("acceptance.bonus_from_last_draft_row", "acceptance",
           "the bonus token drawn from the last draft position's p instead of the row after it"),
    Mutant("acceptance.icdf_ge", "acceptance",
           "inverse-CDF sampling picks the first cumsum >= u S instead of > u S"),
    Mutant("acceptance.greedy_ties_last", "acceptance",
           "greedy argmax resolves ties to the highest index instead of the lowest"),
)

IDS = frozenset(m.id for m in CATALOG)

_ACTIVE: set[str] = set()
on = _ACTIVE.__contains__  # on(id) -> bool; the switch the math modules test


@contextmanager
def mutation(*ids: str):
    """Turn the named mutants on for the duration of the ``with`` block (kernels off meanwhile)."""
    unknown = [i for i in ids if i not in IDS]
    if unknown:
        raise ValueError(f"unknown mutant {unknown[0]!r}: see refmtp.mutation.CATALOG "
                         "(`refmtp golden conformance --list`)")
    before = set(_ACTIVE)
    kernels = kernels_enabled()
    set_kernels_enabled(False)
    _ACTIVE.update(ids)
    try:
        yield
    finally:
        _ACTIVE.clear()
        _ACTIVE.update(before)
        set_kernels_enabled(kernels)


def active() -> frozenset:
    """The mutants switched on now (empty in normal use)."""
    return frozenset(_ACTIVE)
