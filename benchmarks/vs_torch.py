"""Benchmark: refmtp against the same model in PyTorch eager on the CPU (optional: torch + transformers).

    /path/to/torch-venv/bin/python benchmarks/vs_torch.py              # small, float32 + float64, 1 and 2 threads
    python benchmarks/vs_torch.py --presets tiny --threads 1 --quick

The PyTorch model is HF ``DeepseekV3ForCausalLM`` (the trunk and lm_head) loaded with
``from_pretrained`` from a checkpoint written by ``refmtp.checkpoint.save_checkpoint``, plus the
causal MTP modules written here in a few lines of PyTorch (``enorm``, ``hnorm``, ``eh_proj``, an HF
``DeepseekV3DecoderLayer``, ``shared_head.norm``; the shared embedding and lm_head), the V3
sequence-wise balance loss computed from the routers' logits (forward hooks), and the same loss
``L = L_main + lambda/D sum_k L_MTP^k + alpha sum_l aux_l``. Gradients come from autograd.

Three float32 islands of HF's code are patched to compute in the model dtype (they round
float64 runs to float32 precision; for float32 runs they are the same operations):
``DeepseekV3RMSNorm`` (upcasts to float32), ``DeepseekV3TopkRouter`` (router logits in float32)
and ``DeepseekV3RotaryEmbedding`` (angles in float32; refmtp forms them in float64 and rounds
cos/sin to the dtype). The correctness check is also run on the unpatched HF classes in
float64, to show what those islands cost. Routing agrees with HF here: the small preset keeps
every group (n_group = topk_group = 2), so HF's group mask is inert and both pick the top-K of
``sigmoid(z) + bias``.

Reported per dtype and thread count n (torch: ``torch.set_num_threads(n)``; refmtp at n > 1: n
microbatches side by side on n threads with OpenBLAS at 1 thread each, ``train_step(...,
grad_accum=n, workers=n)``, or with ``--refmtp-cores blas`` one batch with OpenBLAS at n threads;
each row's ``refmtp_schedule`` says which): tokens/s of the full training step (forward +
backward + grad clip + AdamW + expert-bias update) for both,
timed alternately (refmtp step, torch step, ...; median of ``--repeats`` after a warm-up), their
ratio, and the max differences of the loss terms and of every gradient on the first batch
(weights identical). For context each row also has both libraries' sustained 512 x 512 GEMM rate
(OpenBLAS via numpy, MKL via torch; ``gemm_512``) and the share of torch's step spent in its GEMM
ops (torch.profiler self time; ``torch_profile``). Writes ``benchmarks/results/vs_torch.json``. Not a test.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from gemm_peak import blas_kernel, blas_threads, run_context  # noqa: E402


def torch_missing() -> str | None:
    """Why the comparison cannot run here, or None."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        from transformers import DeepseekV3ForCausalLM  # noqa: F401
    except ImportError as exc:
        return f"torch/transformers not importable by {sys.executable}: {exc}"
    return None


# -------------------------------------------------------------------------------------------
# HF precision patches (model dtype instead of float32)
# -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def hf_in_model_dtype(enabled: bool = True):
    """Patch HF DeepseekV3's RMSNorm, router and RoPE to compute in the model dtype."""
    import torch
    import torch.nn.functional as F
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

    if not enabled:
        yield
        return

    def rms_forward(self, x):
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.variance_epsilon))

    def router_forward(self, hidden_states):
        hidden_states = hidden_states.view(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states, self.weight)  # HF: both cast to float32
        scores = router_logits.sigmoid()
        scores_for_choice = scores + self.e_score_correction_bias
        group_scores = (scores_for_choice.view(-1, self.num_group, self.num_experts // self.num_group)
                        .topk(2, dim=-1)[0].sum(dim=-1))
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = (group_mask.unsqueeze(-1)
                      .expand(-1, self.num_group, self.num_experts // self.num_group)
                      .reshape(-1, self.num_experts))
        scores_for_choice = scores_for_choice.masked_fill(~score_mask.bool(), float("-inf"))
        topk_indices = torch.topk(scores_for_choice, k=self.top_k, dim=-1, sorted=False)[1]
        topk_weights = scores.gather(1, topk_indices)
        if self.norm_topk_prob:
            topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
        return router_logits, topk_weights * self.routed_scaling_factor, topk_indices

    @torch.no_grad()
    def rope_forward(self, x, position_ids):
        inv = self.inv_freq64.to(x.device)  # float64, from refmtp.model.ops.rope.rope_freqs
        freqs = position_ids[..., None].to(torch.float64) * inv  # angles in float64
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)

    saved = (hf.DeepseekV3RMSNorm.forward, hf.DeepseekV3TopkRouter.forward,
             hf.DeepseekV3RotaryEmbedding.forward)
    hf.DeepseekV3RMSNorm.forward = rms_forward
    hf.DeepseekV3TopkRouter.forward = router_forward
    hf.DeepseekV3RotaryEmbedding.forward = rope_forward
    try:
        yield
    finally:
        (hf.DeepseekV3RMSNorm.forward, hf.DeepseekV3TopkRouter.forward,
         hf.DeepseekV3RotaryEmbedding.forward) = saved


# -------------------------------------------------------------------------------------------
# the PyTorch model: HF trunk + MTP modules + V3 loss
# -------------------------------------------------------------------------------------------
def build_torch_model(ckpt_dir, cfg, dtype: str):
    """(TorchMTPModel, name -> (parameter, index) map for every refmtp parameter name)."""
    import torch
    from safetensors.numpy import load_file
    from torch import nn
    from transformers import DeepseekV3ForCausalLM
    from transformers import logging as hf_logging
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

    from refmtp.params import layer_prefix, mtp_layer
    from refmtp.model.ops.rope import rope_freqs

    hf_logging.set_verbosity_error()  # the MTP layers are "unexpected" for HF: we load them below
    hf_logging.disable_progress_bar()
    tdtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
    # HF's default experts path (grouped_mm) takes float32/bf16 only: float64 runs the eager loop
    kw = {"experts_implementation": "eager"} if dtype == "float64" else {}
    trunk = DeepseekV3ForCausalLM.from_pretrained(str(ckpt_dir), dtype=tdtype, attn_implementation="sdpa",
                                                  **kw)
    trunk.model.rotary_emb.inv_freq64 = torch.tensor(list(rope_freqs(cfg)), dtype=torch.float64)
    hconf = trunk.config
    L, D, d, eps = cfg.num_hidden_layers, cfg.D, cfg.hidden_size, cfg.rms_norm_eps

    class MTPModule(nn.Module):  # V3 eqs. 21-23: n, y = module(Emb(t_{i+k}), h^{k-1}_i)
        def __init__(self, layer):
            super().__init__()
            self.enorm = hf.DeepseekV3RMSNorm(d, eps)
            self.hnorm = hf.DeepseekV3RMSNorm(d, eps)
            self.eh_proj = nn.Linear(2 * d, d, bias=False)
            self.block = hf.DeepseekV3DecoderLayer(hconf, layer)
            self.head_norm = hf.DeepseekV3RMSNorm(d, eps)

        def forward(self, emb, h_prev, pos_emb):
            x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))  # embedding first
            y = self.block(x, attention_mask=None, position_embeddings=pos_emb)  # causal (sdpa is_causal)
            return self.head_norm(y), y

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = trunk
            self.mtp = nn.ModuleList([MTPModule(mtp_layer(cfg, k)) for k in range(1, D + 1)])

    model = Model().to(tdtype)
    # name map: refmtp checkpoint name -> (torch parameter or buffer, index into it or None)
    I = cfg.moe_intermediate_size
    slots = {}
    named = dict(model.named_parameters())
    named.update(dict(model.named_buffers()))

    def local_to_torch(prefix_t, local):
        """A block-local refmtp name (self_attn.*, mlp.*, *_layernorm) -> torch name + index."""
        if local.startswith("mlp.experts."):
            e, proj = local.split(".")[2], local.split(".")[3]
            e = int(e)
            if proj == "gate_proj":
                return prefix_t + "mlp.experts.gate_up_proj", (e, slice(0, I))
            if proj == "up_proj":
                return prefix_t + "mlp.experts.gate_up_proj", (e, slice(I, 2 * I))
            return prefix_t + "mlp.experts.down_proj", (e,)
        return prefix_t + local, None

    from refmtp.params import param_shapes

    for name in param_shapes(cfg):
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        if layer is not None and layer >= L:  # MTP module k = layer - L + 1
            local = name[len(layer_prefix(layer)):]
            k = layer - L + 1
            pre = f"mtp.{k - 1}."
            special = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight",
                       "eh_proj.weight": "eh_proj.weight", "shared_head.norm.weight": "head_norm.weight"}
            if local in special:
                slots[name] = (named[pre + special[local]], None)
            else:
                tname, idx = local_to_torch(pre + "block.", local)
                slots[name] = (named[tname], idx)
        elif layer is not None:
            local = name[len(layer_prefix(layer)):]
            tname, idx = local_to_torch(f"trunk.model.layers.{layer}.", local)
            slots[name] = (named[tname], idx)
        else:
            slots[name] = (named["trunk." + name], None)
    # MTP weights from the safetensors file (HF's loader skipped them); trunk weights are checked
    tensors = load_file(str(Path(ckpt_dir) / "model.safetensors"))
    with torch.no_grad():
        for name, (t, idx) in slots.items():
            src = torch.from_numpy(tensors[name]).to(t.dtype)
            dst = t if idx is None else t[idx]
            if name.startswith(tuple(layer_prefix(mtp_layer(cfg, k)) for k in range(1, D + 1))):
                dst.copy_(src)
            elif not torch.equal(dst, src):
                raise RuntimeError(f"HF loaded {name} with different values")
    if model.trunk.lm_head.weight.data_ptr() == model.trunk.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("HF tied lm_head to embed_tokens: the checkpoint says tie_word_embeddings=false")
    return model, slots


class TorchStep:
    """Forward (V3 loss), backward (autograd), clip, AdamW and the expert-bias update in torch."""

    def __init__(self, model, cfg, lr=1e-3, grad_clip=1.0):
        import torch
        from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

        self.model, self.cfg, self.lr, self.grad_clip = model, cfg, lr, grad_clip
        self.routers = []  # (module, layer index) in forward order
        self.records = []
        L = cfg.num_hidden_layers
        for l, layer in enumerate(model.trunk.model.layers):
            if isinstance(layer.mlp, hf.DeepseekV3MoE):
                self.routers.append(layer.mlp.gate)
        for mod in model.mtp:
            if isinstance(mod.block.mlp, hf.DeepseekV3MoE):
                self.routers.append(mod.block.mlp.gate)
        for r in self.routers:
            r.register_forward_hook(self._hook)
        decay, no_decay = [], []
        for n, p in model.named_parameters():
            (no_decay if ("norm" in n or n.endswith("bias")) else decay).append(p)
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=lr, betas=(0.9, 0.95), eps=1e-8)
        self.L = L

    def _hook(self, module, inputs, output):
        B, Tk = inputs[0].shape[:2]
        self.records.append((module, B, Tk, output[0], output[2]))  # router logits (B*Tk, E), topk idx

    def losses(self, tokens):
        """tokens (B, T+1) int64 tensor -> dict of loss tensors (refmtp names)."""
        import torch
        import torch.nn.functional as F

        cfg, m = self.cfg, self.model
        B, T = tokens.shape[0], tokens.shape[1] - 1
        V, D = cfg.vocab_size, cfg.D
        self.records = []
        h0 = m.trunk.model(input_ids=tokens[:, :T]).last_hidden_state  # model.norm output h^0
        logits = m.trunk.lm_head(h0)
        out = {"main": F.cross_entropy(logits.reshape(-1, V), tokens[:, 1:].reshape(-1), reduction="sum") / (B * T)}
        total = out["main"]
        h = h0
        pos = torch.arange(T, dtype=torch.int64)[None, :]
        for k in range(1, D + 1):
            Tk = T - k
            emb = m.trunk.model.embed_tokens(tokens[:, k:T])
            pos_emb = m.trunk.model.rotary_emb(emb, pos[:, :Tk])
            n, y = m.mtp[k - 1](emb, h[:, :Tk], pos_emb)
            lk = m.trunk.lm_head(n)
            norm = B * T if cfg.refmtp.mtp_loss_norm == "paper" else B * Tk
            out[f"mtp.{k}"] = F.cross_entropy(lk.reshape(-1, V), tokens[:, k + 1:].reshape(-1),
                                              reduction="sum") / norm
            total = total + cfg.refmtp.mtp_lambda / D * out[f"mtp.{k}"]
            h = n if cfg.refmtp.mtp_chain == "post_norm" else y
        bal = torch.zeros((), dtype=h0.dtype)
        K, E = cfg.num_experts_per_tok, cfg.n_routed_experts
        for _, Bk, Tk, z, _ in self.records:  # V3 eqs. 17-20 per MoE layer, averaged over sequences
            s = torch.sigmoid(z).view(Bk, Tk, E)
            idx = torch.topk(s, K, dim=-1)[1]
            f = torch.zeros(Bk, E, dtype=s.dtype).scatter_add_(1, idx.reshape(Bk, -1),
                                                              torch.ones(Bk, Tk * K, dtype=s.dtype))
            f = f * (E / (K * Tk))
            P = (s / s.sum(-1, keepdim=True)).mean(1)
            bal = bal + (f * P).sum(-1).mean()
        out["balance"] = cfg.refmtp.seq_aux_alpha * bal
        out["total"] = total + out["balance"]
        return out

    def step(self, tokens):
        import torch

        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        losses = self.losses(tokens)
        loss = float(losses["total"].detach())
        t1 = time.perf_counter()
        losses["total"].backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.opt.step()
        with torch.no_grad():  # aux-loss-free bias update, b += gamma sign(mean(c) - c)
            gamma = self.cfg.refmtp.bias_update_gamma
            for module, _, _, _, idx in self.records:
                c = torch.bincount(idx.reshape(-1), minlength=self.cfg.n_routed_experts).to(torch.float64)
                module.e_score_correction_bias += (gamma * torch.sign(c.mean() - c)).to(
                    module.e_score_correction_bias.dtype)
        t3 = time.perf_counter()
        return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2, "step": t3 - t0, "loss": loss}


# -------------------------------------------------------------------------------------------
# correctness: losses and gradients on the same batch and weights
# -------------------------------------------------------------------------------------------
def compare(cfg, params, slots, tstep, tokens_np):
    import numpy as np
    import torch

    from refmtp.model import backward, forward

    out, cache = forward(params, cfg, tokens_np)
    grads = backward(cache)
    tstep.model.zero_grad(set_to_none=True)
    tl = tstep.losses(torch.from_numpy(tokens_np))
    tl["total"].backward()
    loss_diff = {k: abs(float(out.losses[k]) - float(tl[k].detach())) for k in tl}
    worst_abs, worst_rel, worst_name = 0.0, 0.0, None
    for name, g in grads.items():
        t, idx = slots[name]
        tg = t.grad if idx is None else t.grad[idx]
        tg = np.zeros(g.shape) if tg is None else tg.detach().numpy()
        diff = float(np.max(np.abs(np.asarray(g, dtype=np.float64) - tg)))
        scale = float(np.max(np.abs(g))) or 1.0
        worst_abs = max(worst_abs, diff)
        if diff / scale > worst_rel:
            worst_rel, worst_name = diff / scale, name
    # routing agreement: refmtp's chosen expert sets vs HF's, per MoE layer (forward order)
    same = total = 0
    for (layer, (idx, _)), rec in zip(sorted(out.routing.items()), tstep.records):
        a = np.sort(np.asarray(idx).reshape(-1, cfg.num_experts_per_tok), axis=-1)
        b = np.sort(rec[4].numpy().reshape(-1, cfg.num_experts_per_tok), axis=-1)
        same += int(np.all(a == b, axis=-1).sum())
        total += a.shape[0]
    return {"loss": {k: float(out.losses[k]) for k in tl}, "loss_abs_diff": loss_diff,
            "max_loss_abs_diff": max(loss_diff.values()), "grad_max_abs_diff": worst_abs,
            "grad_max_rel_diff": worst_rel, "grad_worst_tensor": worst_name,
            "routing_agreement": same / total if total else None, "n_grad_tensors": len(grads)}


def kernel_threads(n: int) -> int | None:
    """Numba's thread count for the parallel kernels: refmtp's own setting (REFMTP_NUMBA_THREADS,
    default 1, backends/numba_kernels.py), whatever the BLAS threads ``n`` (None without numba)."""
    try:
        import numba

        from refmtp.backends.numba_kernels import kernel_threads as configured
    except ImportError:
        return None
    numba.set_num_threads(configured())
    return numba.get_num_threads()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def step_peak_rss(step, tokens, interval_s: float = 0.002) -> dict:
    """Resident memory around one (untimed) step: before it (after glibc's ``malloc_trim`` has
    returned the freed heap), and the peak a sampling thread saw during it (every ``interval_s``);
    both sides live in this one process, so the step's own memory is ``peak - before``."""
    import ctypes
    import threading

    with contextlib.suppress(OSError, AttributeError):  # hand freed heap pages back (glibc)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _rss_bytes()
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            done.wait(interval_s)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        step(tokens)
    finally:
        done.set()
        th.join()
    peak[0] = max(peak[0], _rss_bytes())
    return {"before_mib": before / 2 ** 20, "peak_mib": peak[0] / 2 ** 20, "step_mib": (peak[0] - before) / 2 ** 20}


def numpy_gemm_peak(dtype: str, sizes=(512, 1024), samples: int = 3, seconds: float = 0.2) -> dict:
    """numpy's sustained square GEMM GFLOP/s at each size (median of ``samples``), and the best."""
    import numpy as np

    from train_step import gemm_sample

    rng = np.random.default_rng(0)
    rates = {}
    for n in sizes:
        a, b = rng.standard_normal((n, n)).astype(dtype), rng.standard_normal((n, n)).astype(dtype)
        a @ b
        rates[n] = statistics.median(gemm_sample(a, b, seconds) for _ in range(samples))
    best = max(rates, key=rates.get)
    return {"gflops_by_size": rates, "size": best, "peak_gflops": rates[best]}


class PairedPeak:
    """numpy's GEMM rate sampled right after each alternation (refmtp step, torch step), so the
    step and the peak it is compared with see the same load: the best of one sample per size in
    ``SIZES``, each as long as the refmtp step (at least 0.05 s), at the row's thread count n.
    On a shared machine whose speed drifts by 10-20% between minutes, a peak measured once after
    all the steps can come from a faster or slower minute than the steps; the per-alternation
    ratio cancels that drift. (``numpy_gemm_peak`` after the run stays in the results too.)"""

    SIZES = (512, 1024)

    def __init__(self, dtype: str, blas_threads_during_steps: int, n: int):
        import numpy as np

        rng = np.random.default_rng(0)
        self.pairs = [(rng.standard_normal((m, m)).astype(dtype), rng.standard_normal((m, m)).astype(dtype))
                      for m in self.SIZES]
        self.step_blas, self.n = blas_threads_during_steps, n

    def sample(self, step_s: float) -> float:
        from train_step import gemm_sample

        blas_threads(self.n)
        try:
            return max(gemm_sample(a, b, max(0.05, step_s)) for a, b in self.pairs)
        finally:
            blas_threads(self.step_blas)


def gemm_pair(dtype: str, n: int = 512, samples: int = 5, seconds: float = 0.2) -> dict:
    """Sustained n x n GEMM GFLOP/s of numpy (OpenBLAS) and torch (MKL), alternating samples."""
    import numpy as np
    import torch

    from train_step import gemm_sample

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n)).astype(dtype), rng.standard_normal((n, n)).astype(dtype)
    ta, tb = torch.from_numpy(a.copy()), torch.from_numpy(b.copy())
    a @ b
    ta @ tb
    np_rates, t_rates = [], []
    for _ in range(samples):
        np_rates.append(gemm_sample(a, b, seconds))
        t_rates.append(gemm_sample(ta, tb, seconds))
    return {"n": n, "numpy_gflops": statistics.median(np_rates), "torch_gflops": statistics.median(t_rates)}


def torch_gemm_share(tstep, tokens) -> dict:
    """torch.profiler on one torch step: self CPU time of the GEMM ops / all self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        tstep.step(tokens)
    gemm_ops = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::_grouped_mm")
    total = gemm = 0.0
    for ev in prof.key_averages():
        total += ev.self_cpu_time_total
        if ev.key in gemm_ops:
            gemm += ev.self_cpu_time_total
    return {"gemm_ops": list(gemm_ops), "gemm_self_share": gemm / total if total else None}


def refmtp_schedule(n: int, batch: int, mode: str) -> dict:
    """How refmtp uses ``n`` cores: mode "threads" (n > 1, n dividing the batch): n microbatches side
    by side on n worker threads, OpenBLAS at 1 thread each (train_step(..., workers=n), bit-identical
    to grad_accum=n one after another); else ("blas") one batch with OpenBLAS at n threads."""
    if mode == "threads" and n > 1 and batch % n == 0:
        return {"mode": "threads", "workers": n, "grad_accum": n, "blas_threads": 1}
    return {"mode": "blas", "workers": 1, "grad_accum": 1, "blas_threads": n}


def run_case(cfg, name, dtype, thread_counts, batch, seq, repeats, workdir, workers_mode="threads"):
    import torch

    from refmtp.backends import get_backend
    from refmtp.checkpoint import save_checkpoint
    from refmtp.model import init_params
    from refmtp.verification.flops import train_step_flops, useful_train_step_flops
    from train_step import StepRunner, make_batch

    params = init_params(cfg, seed=0, dtype=dtype)
    ckpt = Path(workdir) / f"{name}-{dtype}"
    save_checkpoint(ckpt, cfg, params)
    tokens = make_batch(cfg, batch, seq)
    res = {"preset": name, "dtype": dtype, "batch": batch, "seq": seq, "tokens": batch * seq}
    with hf_in_model_dtype(False):
        model, slots = build_torch_model(ckpt, cfg, dtype)
        res["stock_hf_check"] = compare(cfg, params, slots, TorchStep(model, cfg), tokens)
    with hf_in_model_dtype(True):
        model, slots = build_torch_model(ckpt, cfg, dtype)
        tstep = TorchStep(model, cfg)
        res["check"] = compare(cfg, params, slots, tstep, tokens)
        res["hf"] = {"attn_implementation": model.trunk.config._attn_implementation,
                     "experts_implementation": getattr(model.trunk.config, "_experts_implementation", None)}
        timings = []
        bk = get_backend("numpy")
        for n in thread_counts:
            sched = refmtp_schedule(n, batch, workers_mode)
            blas_threads(sched["blas_threads"])
            numba_threads = kernel_threads(n)
            torch.set_num_threads(n)
            runner = StepRunner(cfg, init_params(cfg, seed=0, dtype=dtype), grad_accum=sched["grad_accum"],
                                workers=sched["workers"])
            tt = torch.from_numpy(tokens)
            xt = bk.asarray(tokens)
            runner.step(xt)
            tstep.step(tt)  # warm-ups
            rr, tr, beside = [], [], []
            paired = PairedPeak(dtype, sched["blas_threads"], n)
            for _ in range(repeats):  # alternate, so both see the same load
                rr.append(runner.step(xt))
                tr.append(tstep.step(tt))
                beside.append(paired.sample(rr[-1]["step"]))  # the GEMM peak under this alternation's load
            med = lambda recs, k: statistics.median(r[k] for r in recs)  # noqa: E731
            pair = [t["step"] / r["step"] for r, t in zip(rr, tr)]  # refmtp/torch tokens/s, per alternation
            row = {"threads": n, "refmtp_schedule": sched, "blas_threads": blas_threads(),
                   "numba_threads": numba_threads,
                   "torch_threads": torch.get_num_threads(),
                   "ratio_per_alternation": {"median": statistics.median(pair), "min": min(pair), "max": max(pair),
                                             "values": pair},
                   "peak_rss": {"refmtp": step_peak_rss(runner.step, xt), "torch": step_peak_rss(tstep.step, tt)}}
            for tag, recs in (("refmtp", rr), ("torch", tr)):
                row[tag] = {f"{k}_ms": med(recs, k) * 1e3 for k in ("forward", "backward", "optimizer", "step")}
                row[tag]["tokens_per_s"] = batch * seq / med(recs, "step")
            row["ratio_refmtp_over_torch"] = row["refmtp"]["tokens_per_s"] / row["torch"]["tokens_per_s"]
            blas_threads(n)  # the GEMM rates at n BLAS threads, whatever the schedule
            row["gemm_512"] = gemm_pair(dtype)
            row["numpy_gemm_peak"] = numpy_gemm_peak(dtype)
            # % of peak on the FLOPs a causal step needs (the attention products on the causal half:
            # the attention kernel skips most of the masked half); the full-square count beside it
            step_s = row["refmtp"]["step_ms"] / 1e3
            peak = row["numpy_gemm_peak"]["peak_gflops"]
            row["refmtp"]["gflops"] = useful_train_step_flops(cfg, batch, seq) / step_s / 1e9
            row["refmtp"]["pct_of_gemm_peak"] = 100.0 * row["refmtp"]["gflops"] / peak
            row["refmtp"]["gflops_full_square"] = train_step_flops(cfg, batch, seq) / step_s / 1e9
            # the same per alternation, against the peak sampled right after that alternation's steps
            useful = useful_train_step_flops(cfg, batch, seq)
            pct = [100.0 * useful / r["step"] / 1e9 / g for r, g in zip(rr, beside)]
            row["gemm_peak_beside_steps"] = {"gflops": beside, "median_gflops": statistics.median(beside),
                                             "sizes": list(PairedPeak.SIZES), "threads": n}
            row["refmtp"]["pct_of_peak_beside_steps"] = {"median": statistics.median(pct), "min": min(pct),
                                                         "max": max(pct), "values": pct}
            row["refmtp"]["pct_of_gemm_peak_full_square"] = 100.0 * row["refmtp"]["gflops_full_square"] / peak
            row["torch_profile"] = torch_gemm_share(tstep, tt)
            row["load_average_1m"] = run_context(n)["load_average_1_5_15m"]
            timings.append(row)
        res["timings"] = timings
    return res


def parse_overrides(items, ap) -> dict:
    """``["hidden_size=256", ...]`` -> {field: int}; a bad item is one line and exit 2."""
    from refmtp.config import ModelConfig

    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields or not value.lstrip("-").isdigit():
            ap.error(f"--set {item!r}: expected FIELD=INT with FIELD a ModelConfig field")
        out[key] = int(value)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["small"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--set", nargs="+", default=[], metavar="FIELD=INT",
                    help="override integer config fields of every preset, e.g. --set hidden_size=256 "
                         "(the issue-17 config: small with d = 256)")
    ap.add_argument("--refmtp-cores", choices=("threads", "blas"), default="threads",
                    help="how refmtp uses n > 1 cores: 'threads' = n microbatches side by side on n threads "
                         "(OpenBLAS at 1 thread each; the default), 'blas' = OpenBLAS at n threads")
    ap.add_argument("--out", default=str(HERE / "results" / "vs_torch.json"))
    args = ap.parse_args(argv)
    overrides = parse_overrides(args.set, ap)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from _machine import machine_info

    why = torch_missing()
    if why:
        print(f"vs_torch skipped: {why} (pip install torch transformers, or run it with a "
              "Python that has them: run_all.py --torch-python PATH)")
        result = {"benchmark": "vs_torch", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "skipped": why, "machine": machine_info()}
        out.write_text(json.dumps(result, indent=2) + "\n")
        return result
    import torch
    import transformers

    from refmtp.config import preset

    repeats = args.repeats or (3 if args.quick else 7)
    ctx_start = run_context(args.threads[0])
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name in args.presets:
            for dtype in args.dtypes:
                cfg = dataclasses.replace(preset(name), **overrides).validate()
                label = name + "".join(f",{k}={v}" for k, v in overrides.items())
                rows.append(run_case(cfg, label, dtype, args.threads, args.batch, args.seq, repeats, work,
                                     args.refmtp_cores))
    print(f"refmtp vs PyTorch eager (HF DeepseekV3 + MTP), training step, B*T = {args.batch}*{args.seq}, "
          f"median of {repeats}, OpenBLAS {blas_kernel()} kernels, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    head = (f"{'preset':6} {'dtype':8} {'thr':>3} {'refmtp tok/s':>12} {'torch tok/s':>11} {'ratio':>6} "
            f"{'|dloss|':>9} {'grad rel':>9} {'stock HF rel':>12} {'routing':>7} {'GEMM np/torch':>13} "
            f"{'torch GEMM%':>11} {'alt. ratio min-max':>18} {'% peak':>6} {'beside':>6} {'RSS MiB r/t':>11}")
    print(head)
    print("-" * len(head))
    for r in rows:
        for t in r["timings"]:
            print(f"{r['preset']:6} {r['dtype']:8} {t['threads']:3d} {t['refmtp']['tokens_per_s']:12.0f} "
                  f"{t['torch']['tokens_per_s']:11.0f} {t['ratio_refmtp_over_torch']:5.2f}x "
                  f"{r['check']['max_loss_abs_diff']:9.1e} {r['check']['grad_max_rel_diff']:9.1e} "
                  f"{r['stock_hf_check']['grad_max_rel_diff']:12.1e} {r['check']['routing_agreement']:7.3f} "
                  f"{t['gemm_512']['numpy_gflops']:6.1f}/{t['gemm_512']['torch_gflops']:<6.1f} "
                  f"{100 * t['torch_profile']['gemm_self_share']:10.1f}% "
                  f"{t['ratio_per_alternation']['min']:8.2f}-{t['ratio_per_alternation']['max']:<9.2f} "
                  f"{t['refmtp']['pct_of_gemm_peak']:6.1f} "
                  f"{t['refmtp']['pct_of_peak_beside_steps']['median']:6.1f} "
                  f"{t['peak_rss']['refmtp']['step_mib']:5.0f}/{t['peak_rss']['torch']['step_mib']:<5.0f}")
    result = {
        "benchmark": "vs_torch",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "timing": ("training step = forward + backward + clip + AdamW + bias update; refmtp and torch "
                   "steps alternate; median over repeats after one warm-up each"),
        "check": ("first batch, identical weights: |loss_refmtp - loss_torch| per term; grad_max_rel_diff = "
                  "max over tensors of max|g_refmtp - g_torch| / max|g_refmtp|; 'check' uses HF with the "
                  "float32 islands patched to the model dtype, 'stock_hf_check' the unpatched classes"),
        "refmtp_cores": args.refmtp_cores,
        "config_overrides": overrides, "batch": args.batch, "seq": args.seq, "repeats": repeats,
        "rss": "peak resident memory of one untimed step per side, minus the memory before it (step_mib)",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "context_start": ctx_start, "context_end": run_context(args.threads[-1]),
        "machine": machine_info(),
        "results": rows,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
