"""Tensor cases: model (forward, losses, gradients, routing, bias update), trajectory (S
training steps) and decode (the absorbed latent cache), computed and exported.

The model math runs on the chosen backend through ``refmtp.model``, ``refmtp.training`` and
``refmtp.inference`` and comes back through ``bk.to_numpy``; the golden weights and tokens are
drawn here (:func:`golden_params`, :func:`make_tokens`, :func:`decode_inputs`).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np  # host-side only: the golden draws and the finished arrays

from refmtp.backends import backend_of
from refmtp.checkpoint import save_checkpoint
from refmtp.inference.decode import Decoder, RowStore
from refmtp.model import backward, forward, init_params, update_expert_bias
from refmtp.model.model import routing_margins
from refmtp.params import BIAS_NAME, EMBED, is_bias, kind, layer_prefix, mtp_layer
from refmtp.training.optim import AdamW, AdamWSettings, CosineSchedule
from refmtp.training.step import train_step
from refmtp.verification.golden.compare import tolerance_table
from refmtp.verification.golden.files import (FORMAT, FORMAT_VERSION, MANIFEST, MODEL_FILES,
                                              check_out_dir, replace_dir, save_tensors, write_json)
from refmtp.verification.golden.manifest import check_schedule, file_entries, refmtp_version

# Golden weights are drawn larger than the training init (std 0.02) so that attention patterns,
# routing and logits are far from uniform and a wrong scale, sign or order shows up.
DEFAULT_INIT_STD = 0.2
DEFAULT_BIAS_STD = 0.05  # non-zero e_score_correction_bias: it must change some routing

# Smallest routing score gap (K-th vs (K+1)-th selection score, kept vs dropped group) accepted
# when exporting: below it another implementation's rounding could pick other experts.
MIN_ROUTING_MARGIN = {"float64": 1e-6, "float32": 1e-4}


# -------------------------------------------------------------------------------------------
# model cases: forward, losses, every gradient, routing, bias update
# -------------------------------------------------------------------------------------------
def make_tokens(seed: int, batch: int, seq_len: int, vocab_size: int):
    """Random tokens (B, T+1) int64: numpy PCG64 seeded with SeedSequence([seed, 1])."""
    gen = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), 1])))
    return gen.integers(0, vocab_size, size=(batch, seq_len + 1), dtype=np.int64)


def compute_case(cfg, params: dict, tokens, *, gamma: float | None = None, with_margins=False):
    """Everything ``expected.safetensors`` holds, as host arrays keyed by golden names.

    ``params`` and ``tokens`` live on one backend; ``params`` is not modified. Returns the dict
    (and the routing margins, :func:`refmtp.model.model.routing_margins`, when ``with_margins``).
    """
    bk = backend_of(tokens, params[EMBED])
    gamma = cfg.refmtp.bias_update_gamma if gamma is None else float(gamma)
    out, cache = forward(params, cfg, tokens)
    grads = backward(cache)
    h = bk.to_numpy
    exp = {"logits": h(out.logits)}
    for k, lk in enumerate(out.mtp_logits, start=1):
        exp[f"mtp_logits.{k}"] = h(lk)
    for key, val in out.losses.items():
        exp[f"loss.{key}"] = np.asarray(h(val)).reshape(())
    trainable = sorted(n for n in params if not is_bias(n))
    if sorted(grads) != trainable:
        raise AssertionError(f"backward returned gradients for {len(grads)} names, the model has "
                             f"{len(trainable)} trainable parameters")
    for name in trainable:
        exp[f"grad.{name}"] = h(grads[name])
    for layer, (idx, weight) in out.routing.items():
        exp[f"routing.{layer}.topk_idx"] = h(idx).astype(np.int64)
        exp[f"routing.{layer}.topk_weight"] = h(weight)
        exp[f"routing.{layer}.load"] = h(out.load[layer]).astype(np.int64)
    biases = {n: v for n, v in params.items() if is_bias(n)}
    if biases:
        updated = dict(biases)
        update_expert_bias(updated, out.load, gamma)  # in place on the copy of the dict
        for layer in sorted(out.load):
            exp[f"bias_after_update.{layer}"] = h(updated[layer_prefix(layer) + BIAS_NAME])
    bad = [n for n, a in exp.items() if not np.all(np.isfinite(a))]
    if bad:
        raise ValueError(f"the case produces non-finite values in {', '.join(bad[:4])}: "
                         "choose another seed or smaller weights")
    if with_margins:
        return exp, routing_margins(cache)
    return exp


def _check_dims(batch, seq_len, dtype, cfg):
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch={batch!r} must be an integer >= 1")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= cfg.D:
        raise ValueError(f"seq_len={seq_len!r} must be an integer > num_nextn_predict_layers={cfg.D} "
                         "(depth k trains on T-k positions)")
    if dtype not in ("float64", "float32"):
        raise ValueError(f"dtype={dtype!r}: choose float64 or float32")


def _check_margins(name: str, margins: dict, dtype: str) -> float | None:
    floor = MIN_ROUTING_MARGIN[dtype]
    for layer, margin in sorted(margins.items()):
        if not margin >= floor:
            raise ValueError(f"case {name}: layer {layer} routing has a near-tie (score gap "
                             f"{margin:.3g} < {floor:g}), so another implementation's rounding could "
                             "pick other experts: choose another seed")
    return min(margins.values()) if margins else None


def golden_params(cfg, seed, dtype, init_std, bias_std, norm_std=0.0, bias_mean=0.0):
    """init_params(seed, std=init_std, bias_std), then two optional recipe perturbations drawn
    from their own stream PCG64(SeedSequence([seed, 2])) so the default cases are unchanged:
    every RMSNorm weight times (1 + normal(0, norm_std)) (so swapped or shared norms show in
    the forward), and ``bias_mean`` added to every e_score_correction_bias (negative biased
    scores, where masking dropped groups with 0 instead of -inf re-routes tokens)."""
    params = init_params(cfg, seed=int(seed), backend="numpy", dtype=dtype, std=init_std,
                         bias_std=bias_std if cfg.topk_method == "noaux_tc" else 0.0)
    if norm_std or bias_mean:
        gen = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), 2])))
        for name in sorted(params):
            if norm_std and kind(name) == "norm":
                noise = gen.normal(0.0, float(norm_std), size=params[name].shape)
                params[name] = (params[name] * (1.0 + noise)).astype(params[name].dtype)
            elif bias_mean and is_bias(name):
                params[name] = (params[name] + np.float32(bias_mean)).astype(np.float32)
    return params


def export_model_case(out_dir, cfg, *, seed: int, batch: int = 2, seq_len: int = 8,
                      dtype: str = "float64", name: str | None = None, description: str = "",
                      command: str = "", init_std: float = DEFAULT_INIT_STD,
                      bias_std: float = DEFAULT_BIAS_STD, perturb: dict | None = None,
                      extra: dict | None = None) -> dict:
    """Write one model case into ``out_dir`` (created; its previous content replaced).

    Random weights from ``seed`` (every matrix normal(0, init_std), norms ones, a NON-ZERO
    float32 e_score_correction_bias normal(0, bias_std)), random tokens, then everything the
    format lists, computed by refmtp on numpy. Returns the manifest.
    """
    _check_dims(batch, seq_len, dtype, cfg)
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    name = name or out_dir.name
    params = golden_params(cfg, seed, dtype, init_std, bias_std, **(perturb or {}))
    tokens = make_tokens(seed, batch, seq_len, cfg.vocab_size)
    expected, margins = compute_case(cfg, params, tokens, with_margins=True)
    fields = {"kind": "model", "min_routing_margin": _check_margins(name, margins, dtype),
              "bias_update_gamma": float(cfg.refmtp.bias_update_gamma), **(perturb or {})}
    return _write_case(out_dir, cfg, params, {"tokens": tokens}, expected, name=name, description=description,
                       command=command, dtype=dtype, seed=seed, batch=batch, seq_len=seq_len,
                       init_std=init_std, bias_std=bias_std, fields={**fields, **(extra or {})})


def _write_case(out_dir: Path, cfg, params, inputs: dict, expected, *, name, description, command, dtype,
                seed, batch, seq_len, init_std, bias_std, fields) -> dict:
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_checkpoint(tmp, cfg, params)  # config.json + model.safetensors under checkpoint names
    leftover = sorted(p.name for p in tmp.iterdir() if p.name not in ("config.json", "model.safetensors"))
    if leftover:
        raise AssertionError(f"save_checkpoint wrote unexpected files {leftover}")
    save_tensors(tmp / "inputs.safetensors", inputs)
    save_tensors(tmp / "expected.safetensors", expected)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "case": name,
        "description": description,
        "refmtp_version": refmtp_version(),
        "dtype": dtype,
        "command": command,
        "seed": int(seed),
        "batch": int(batch),
        "seq_len": int(seq_len),
        "init_std": float(init_std),
        "bias_std": float(bias_std) if cfg.topk_method == "noaux_tc" else 0.0,
        "tolerances": tolerance_table(expected, dtype),
        "tensors": {n: {"dtype": str(a.dtype), "shape": list(a.shape)} for n, a in sorted(expected.items())},
        "files": file_entries(tmp, MODEL_FILES),
        **fields,
    }
    write_json(tmp / MANIFEST, manifest)
    replace_dir(tmp, out_dir)
    return manifest


# -------------------------------------------------------------------------------------------
# training trajectories: S steps of forward, backward, clip, AdamW, bias update (refmtp/training/trainer.py)
# -------------------------------------------------------------------------------------------
TRAIN_KEYS = ("lr", "warmup_steps", "decay_steps", "min_lr_ratio", "weight_decay", "beta1",
              "beta2", "eps", "grad_clip")


def compute_trajectory(cfg, params: dict, tokens, train: dict, *, with_margins=False):
    """Run ``S = tokens.shape[0]`` training steps through :func:`refmtp.training.step.train_step`
    (the trainer's step: forward, backward, global-norm clip, AdamW at ``schedule(s)``, bias
    update) and return ``trajectory.loss.{term}`` (S,), ``trajectory.grad_norm`` (S,) (before
    clipping), ``trajectory.lr`` (S,) and ``final.{name}`` for every parameter after the last
    step. ``params`` is not modified.
    """
    missing = [k for k in TRAIN_KEYS if k not in train]
    if missing:
        raise ValueError(f"trajectory settings lack {', '.join(missing)}")
    params = dict(params)  # the optimizer replaces entries; the caller's dict stays as it was
    opt = AdamW(AdamWSettings(train["beta1"], train["beta2"], train["eps"], train["weight_decay"]))
    schedule = CosineSchedule(lr=train["lr"], warmup_steps=train["warmup_steps"],
                              decay_steps=train["decay_steps"], min_lr_ratio=train["min_lr_ratio"])
    losses, norms, lrs, margins = {}, [], [], {}

    def record_margins(out, cache):
        for layer, m in routing_margins(cache).items():
            margins[layer] = min(m, margins.get(layer, float("inf")))

    for step in range(int(tokens.shape[0])):
        lr = schedule(step)
        r = train_step(params, cfg, tokens[step], opt, lr, train["grad_clip"],
                       on_forward=record_margins if with_margins else None)
        for key, val in r.losses.items():
            losses.setdefault(key, []).append(val)
        norms.append(r.grad_norm)
        lrs.append(lr)
    h = backend_of(params[EMBED]).to_numpy
    dt = np.float64 if str(params[EMBED].dtype) == "float64" else np.float32
    exp = {f"trajectory.loss.{k}": np.asarray(v, dtype=dt) for k, v in losses.items()}
    exp["trajectory.grad_norm"] = np.asarray(norms, dtype=np.float64).astype(dt)
    exp["trajectory.lr"] = np.asarray(lrs, dtype=np.float64).astype(dt)
    for name, value in params.items():
        exp[f"final.{name}"] = h(value)
    bad = [n for n, a in exp.items() if not np.all(np.isfinite(a))]
    if bad:
        raise ValueError(f"the trajectory produces non-finite values in {', '.join(bad[:4])}")
    return (exp, margins) if with_margins else exp


def export_trajectory_case(out_dir, cfg, *, seed: int, steps: int, train: dict, batch: int = 2,
                           seq_len: int = 8, dtype: str = "float64", name: str | None = None,
                           description: str = "", command: str = "",
                           init_std: float = DEFAULT_INIT_STD, bias_std: float = DEFAULT_BIAS_STD,
                           extra: dict | None = None) -> dict:
    """Write a training-trajectory case: tokens (S, B, T+1), the S loss terms and the final
    parameters (:func:`compute_trajectory`)."""
    _check_dims(batch, seq_len, dtype, cfg)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be an integer >= 1")
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    name = name or out_dir.name
    params = golden_params(cfg, seed, dtype, init_std, bias_std)
    tokens = np.stack([make_tokens(seed * 1000 + s, batch, seq_len, cfg.vocab_size) for s in range(steps)])
    train = {k: train[k] for k in TRAIN_KEYS if k in train}
    expected, margins = compute_trajectory(cfg, params, tokens, train, with_margins=True)
    fields = {"kind": "trajectory", "steps": int(steps), "train": train,
              "bias_update_gamma": float(cfg.refmtp.bias_update_gamma),
              "min_routing_margin": _check_margins(name, margins, dtype)}
    return _write_case(out_dir, cfg, params, {"tokens": tokens}, expected, name=name, description=description,
                       command=command, dtype=dtype, seed=seed, batch=batch, seq_len=seq_len,
                       init_std=init_std, bias_std=bias_std, fields={**fields, **(extra or {})})


# -------------------------------------------------------------------------------------------
# decode cases: a prefill, single-token steps, a multi-token append and a rollback through the
# absorbed latent cache (refmtp.inference.decode)
# -------------------------------------------------------------------------------------------
def compute_decode(cfg, params: dict, schedule: list[dict], inputs: dict) -> dict:
    """Run ``schedule`` through :class:`refmtp.inference.decode.Decoder` with the absorbed latent cache.

    Append step i feeds ``inputs["step.{i}.tokens"]`` (B, n) and records
    ``decode.{i}.logits`` (B, n, V) and, per main layer, ``decode.{i}.latent.{layer}``
    (B, n, kv_lora_rank + qk_rope_head_dim) = the cache rows it wrote, ``[c_KV | k_pe]`` (c_KV
    after kv_a_layernorm, k_pe after RoPE at the token's position). Truncate steps roll back.

    Causal MTP (every module k = 1..D, each with its own cache ``new_cache(("mtp", k))``): the
    committed sequence after the step is t_0..t_{N-1}; module k's row j reads h^{k-1}_j and
    Emb(t_{j+k}) at RoPE position j (docs/deepseek-v3.md §4.3, the speculative loop's MTP
    state), so it can run rows j <= N-1-k. Each step runs the rows ``[len_k, N-k)`` not yet in
    its cache (len_k = its cache length) and records, when there is at least one,
    ``decode.{i}.mtp.{k}.logits`` (B, m, V), ``.token_ids`` (B, m) = t_{j+k}, ``.positions``
    (m,) = j, ``.hidden`` (B, m, d) = the h^{k-1}_j rows read (h^0 = model.norm output) and
    ``.latent`` (B, m, Rkv+Dr) = its cache rows. A truncation to length m keeps main rows < m
    and module k's rows < m-k.
    """
    bk = backend_of(params[EMBED])

    def h(a):  # a host COPY: cache buffers are overwritten after a rollback
        return np.array(bk.to_numpy(a))

    dec = Decoder(params, cfg)
    first = inputs["step.0.tokens"]
    B = int(first.shape[0])
    total = sum(op.get("n", 0) for op in schedule)
    cache = dec.new_cache("main", batch=B, capacity=total)
    D = cfg.D if cfg.refmtp.mtp_kind == "causal" else 0  # parallel heads are not recorded
    like = params[EMBED]
    h0 = RowStore(cfg.hidden_size, like=like, batch=B, capacity=total)  # h^0 of the main rows
    mtp_caches = [dec.new_cache(("mtp", k), batch=B, capacity=total) for k in range(1, D + 1)]
    carry = [RowStore(cfg.hidden_size, like=like, batch=B, capacity=total) for _ in range(D)]  # h^k rows
    seq = np.zeros((B, 0), dtype=np.int64)  # committed tokens t_0..t_{N-1}
    exp = {}
    for i, op in enumerate(schedule):
        if op["op"] == "truncate":
            m = op["length"]
            cache.truncate(m)
            h0.truncate(m)
            seq = seq[:, :m]
            for k in range(1, D + 1):  # module k keeps the rows whose token t_{j+k} stays
                keep = max(0, min(mtp_caches[k - 1].length, m - k))
                mtp_caches[k - 1].truncate(keep)
                carry[k - 1].truncate(keep)
            continue
        tokens = np.asarray(inputs[f"step.{i}.tokens"], dtype=np.int64)
        seq = np.concatenate([seq, tokens], axis=1)
        start = cache.length
        out = dec.main(bk.asarray(tokens, dtype="int64"), cache)
        h0.append(out.hidden)
        exp[f"decode.{i}.logits"] = h(out.logits)
        for layer in range(cfg.num_hidden_layers):
            (buf,) = cache.buffers[layer]
            exp[f"decode.{i}.latent.{layer}"] = h(buf[:, start:cache.length])
        N = cache.length
        for k in range(1, D + 1):
            mc = mtp_caches[k - 1]
            lo, hi = mc.length, N - k  # rows j in [lo, hi): inputs h^{k-1}_j and t_{j+k} known
            if hi <= lo:
                continue
            ids = seq[:, lo + k: hi + k]  # (B, m) t_{j+k}
            h_prev = (h0 if k == 1 else carry[k - 2]).view(lo, hi)  # (B, m, d) h^{k-1}_j
            o = dec.mtp(k, bk.asarray(ids, dtype="int64"), h_prev, mc)
            carry[k - 1].append(o.carry)
            (buf,) = mc.buffers[mtp_layer(cfg, k)]
            pre = f"decode.{i}.mtp.{k}"
            exp[f"{pre}.logits"] = h(o.logits)
            exp[f"{pre}.token_ids"] = ids.copy()
            exp[f"{pre}.positions"] = np.arange(lo, hi, dtype=np.int64)
            exp[f"{pre}.hidden"] = h(h_prev)
            exp[f"{pre}.latent"] = h(buf[:, lo:hi])
    bad = [n for n, a in exp.items() if not np.all(np.isfinite(a))]
    if bad:
        raise ValueError(f"the decode case produces non-finite values in {', '.join(bad[:4])}")
    return exp


def decode_inputs(seed: int, batch: int, schedule: list[dict], vocab_size: int) -> dict:
    """Random tokens for every append step i: PCG64(SeedSequence([seed, 3, i]))."""
    out = {}
    for i, op in enumerate(schedule):
        if op["op"] == "append":
            gen = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), 3, i])))
            out[f"step.{i}.tokens"] = gen.integers(0, vocab_size, size=(batch, op["n"]), dtype=np.int64)
    return out


def export_decode_case(out_dir, cfg, *, seed: int, schedule: list, batch: int = 2,
                       dtype: str = "float64", name: str | None = None, description: str = "",
                       command: str = "", init_std: float = DEFAULT_INIT_STD,
                       bias_std: float = DEFAULT_BIAS_STD, perturb: dict | None = None,
                       extra: dict | None = None) -> dict:
    """Write a decode case (:func:`compute_decode`) with random weights and tokens from ``seed``."""
    schedule = check_schedule(schedule, "decode case")
    total = sum(op.get("n", 0) for op in schedule)
    _check_dims(batch, max(total, cfg.D + 1), dtype, cfg)
    if total > cfg.max_position_embeddings:
        raise ValueError(f"the schedule appends {total} tokens, more than max_position_embeddings="
                         f"{cfg.max_position_embeddings}")
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    name = name or out_dir.name
    params = golden_params(cfg, seed, dtype, init_std, bias_std, **(perturb or {}))
    inputs = decode_inputs(seed, batch, schedule, cfg.vocab_size)
    expected = compute_decode(cfg, params, schedule, inputs)
    fields = {"kind": "decode", "schedule": schedule, "cache_layout": "absorbed", **(perturb or {})}
    return _write_case(out_dir, cfg, params, inputs, expected, name=name, description=description,
                       command=command, dtype=dtype, seed=seed, batch=batch, seq_len=total,
                       init_std=init_std, bias_std=bias_std, fields={**fields, **(extra or {})})
