"""Speculative cases (kind ``"speculative"``): one complete seeded self-speculative generation
with the MTP modules as drafters, recorded step by step (docs/golden-format.md §1.5).

The generation is :func:`refmtp.inference.speculative.speculative_generate` with ``trace=True``
(the loop itself, not a copy). Per verification step s the case holds

    inputs     spec.{s}.u_accept (K,), spec.{s}.u_sample (), spec.{s}.u_draft (K,)   the coins
    expected   spec.{s}.drafts (K,), .draft_logits (K, V), .q (K, V), .logits (K+1, V),
               .p (K+1, V), .num_accepted (), .tokens (A+1,), .cache_length.main (),
               .cache_length.mtp.{k} ()
               spec.final_tokens (N,)

and :func:`first_divergence` walks the steps of another implementation's outputs in order and
names the first one that differs, and why (draft, accept decision, residual sample, bonus,
distribution, rollback).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np  # host-side only: the recorded arrays and their comparison

from refmtp.backends import backend_of
from refmtp.inference.decode import Decoder
from refmtp.inference.speculative import RULES, check_k, speculative_generate
from refmtp.model import EMBED
from refmtp.verification.golden.cases import (DEFAULT_BIAS_STD, DEFAULT_INIT_STD, _write_case,
                                              golden_params)
from refmtp.verification.golden.compare import compare_tensor, tolerance_for
from refmtp.verification.golden.files import GoldenError, check_out_dir

SETTINGS = ("k", "temperature", "max_new_tokens", "prompt_len", "rule", "reuse_last_module",
            "sample_drafts")
COINS = ("u_draft", "u_accept", "u_sample")
STEP = re.compile(r"spec\.(\d+)\.(.+)")


def check_settings(spec, where: str) -> dict:
    """The manifest's / recipe's ``speculative`` object: every key of SETTINGS, sensible values."""
    if not isinstance(spec, dict):
        raise GoldenError(f"{where}: a speculative case needs the 'speculative' settings object")
    missing = [k for k in SETTINGS if k not in spec]
    if missing:
        raise GoldenError(f"{where}: the speculative settings lack {', '.join(missing)}")
    for key in ("k", "max_new_tokens", "prompt_len"):
        v = spec[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if key == "k" else 1):
            raise GoldenError(f"{where}: speculative {key}={v!r} must be an integer >= {0 if key == 'k' else 1}")
    t = spec["temperature"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or t < 0:
        raise GoldenError(f"{where}: speculative temperature={t!r} must be a number >= 0")
    if spec["rule"] not in RULES:
        raise GoldenError(f"{where}: speculative rule {spec['rule']!r} is not one of {', '.join(RULES)}")
    for key in ("reuse_last_module", "sample_drafts"):
        if not isinstance(spec[key], bool):
            raise GoldenError(f"{where}: speculative {key} must be true or false")
    return {k: spec[k] for k in SETTINGS}


def spec_params(cfg, seed, dtype, init_std, bias_std, lm_head_rank1: float = 0.0) -> dict:
    """:func:`golden_params`, plus (``lm_head_rank1`` > 0) a rank-1 direction added to
    ``lm_head.weight``: ``lm_head_rank1 * outer(u, v) / sqrt(d)`` with u (V,), v (d,) standard
    normal from ``PCG64(SeedSequence([seed, 4]))``. It makes the random main model and the random
    MTP modules often agree on the next token, so drafts get accepted as well as rejected."""
    params = golden_params(cfg, seed, dtype, init_std, bias_std)
    if lm_head_rank1:
        gen = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), 4])))
        w = params["lm_head.weight"]
        V, d = w.shape
        u, v = gen.standard_normal(V), gen.standard_normal(d)
        params["lm_head.weight"] = (w + float(lm_head_rank1) * np.outer(u, v) / np.sqrt(d)).astype(w.dtype)
    return params


def spec_prompt(seed: int, n: int, vocab_size: int):
    """The prompt: ``PCG64(SeedSequence([seed, 5])).integers(0, V, n)`` int64 (n,)."""
    gen = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), 5])))
    return gen.integers(0, vocab_size, size=(int(n),), dtype=np.int64)


def _one_hot(ids, V) -> np.ndarray:
    out = np.zeros((len(ids), V), dtype=np.float64)
    out[np.arange(len(ids)), np.asarray(ids, dtype=np.int64)] = 1.0
    return out


def compute_speculative(cfg, params: dict, prompt, spec: dict, seed: int) -> tuple[dict, dict]:
    """Run the generation and return ``(expected, coins)``: the per-step records and the coins
    the loop drew (``spec.{s}.u_*``, the case's inputs besides the prompt)."""
    bk = backend_of(params[EMBED])
    h = bk.to_numpy
    check_k(cfg, spec["k"], spec["reuse_last_module"])
    dec = Decoder(params, cfg)
    res = speculative_generate(dec, [int(t) for t in prompt], spec["max_new_tokens"], k=spec["k"],
                               temperature=float(spec["temperature"]), seed=int(seed), rule=spec["rule"],
                               sample_drafts=spec["sample_drafts"],
                               reuse_last_module=spec["reuse_last_module"], trace=True)
    V = cfg.vocab_size
    dt = h(params[EMBED]).dtype
    exp, coins = {}, {}
    for s, t in enumerate(res.trace):
        key = f"spec.{s}."
        drafts = np.asarray(t["drafts"], dtype=np.int64)  # (K,)
        logits = h(t["logits"])  # (K+1, V)
        exp[key + "drafts"] = drafts
        exp[key + "draft_logits"] = (np.stack([h(r) for r in t["draft_logits"]]) if len(drafts)
                                     else np.zeros((0, V), dtype=dt))
        # q and p as the rule sees them: one-hot for argmax drafts / at T = 0 (lowest index on ties)
        exp[key + "q"] = (np.stack([h(r) for r in t["q"]]).astype(np.float64) if t["q"] is not None
                          else _one_hot(drafts, V))
        exp[key + "logits"] = logits
        exp[key + "p"] = (h(t["p"]).astype(np.float64) if t["p"] is not None
                          else _one_hot(np.argmax(logits, axis=-1), V))
        exp[key + "num_accepted"] = np.asarray(t["num_accepted"], dtype=np.int64).reshape(())
        exp[key + "tokens"] = np.asarray(t["tokens"], dtype=np.int64)
        for cache, length in t["cache_lengths"].items():
            exp[key + f"cache_length.{cache}"] = np.asarray(length, dtype=np.int64).reshape(())
        if t["u_draft"] is not None:
            coins[key + "u_draft"] = np.asarray(t["u_draft"], dtype=np.float64)
        if t["u_accept"] is not None:
            coins[key + "u_accept"] = np.asarray(t["u_accept"], dtype=np.float64).reshape(-1)
        if t["u_sample"] is not None:
            coins[key + "u_sample"] = np.asarray(t["u_sample"], dtype=np.float64).reshape(())
    exp["spec.final_tokens"] = np.asarray(res.tokens, dtype=np.int64)
    bad = [n for n, a in exp.items() if not np.all(np.isfinite(a))]
    if bad:
        raise ValueError(f"the speculative case produces non-finite values in {', '.join(bad[:4])}")
    return exp, coins


def export_speculative_case(out_dir, cfg, *, seed: int, spec: dict, dtype: str = "float64",
                            name: str | None = None, description: str = "", command: str = "",
                            init_std: float = DEFAULT_INIT_STD, bias_std: float = DEFAULT_BIAS_STD,
                            lm_head_rank1: float = 0.0, extra: dict | None = None) -> dict:
    """Write a speculative case: weights (:func:`spec_params`), the prompt (:func:`spec_prompt`),
    the coins and every step's record (:func:`compute_speculative`)."""
    spec = check_settings(spec, "speculative case")
    if dtype not in ("float64", "float32"):
        raise ValueError(f"dtype={dtype!r}: choose float64 or float32")
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    name = name or out_dir.name
    params = spec_params(cfg, seed, dtype, init_std, bias_std, lm_head_rank1)
    prompt = spec_prompt(seed, spec["prompt_len"], cfg.vocab_size)
    expected, coins = compute_speculative(cfg, params, prompt, spec, seed)
    steps = sum(1 for n in expected if n.endswith(".num_accepted"))
    fields = {"kind": "speculative", "speculative": {**spec, "steps": steps},
              **({"lm_head_rank1": float(lm_head_rank1)} if lm_head_rank1 else {})}
    return _write_case(out_dir, cfg, params, {"prompt": prompt, **coins}, expected, name=name,
                       description=description, command=command, dtype=dtype, seed=seed, batch=1,
                       seq_len=spec["prompt_len"] + spec["max_new_tokens"], init_std=init_std,
                       bias_std=bias_std, fields={**fields, **(extra or {})})


def recompute_speculative(case_dir: Path, m: dict, cfg, params, inputs: dict) -> dict:
    """Regenerate with refmtp from the prompt and the seed. The coins are not read back: refmtp
    draws them itself (RNG-v1), and a generation that takes another path (a bug, a mutant) draws
    other ones; tests/test_golden_speculative.py checks the stored ones against the seed."""
    spec = check_settings(m.get("speculative"), str(case_dir / "manifest.json"))
    prompt = inputs.get("prompt")
    if prompt is None or prompt.dtype != np.int64 or prompt.ndim != 1 or prompt.shape[0] != spec["prompt_len"]:
        raise GoldenError(f"{case_dir / 'inputs.safetensors'}: prompt must be int64 ({spec['prompt_len']},)")
    try:
        return compute_speculative(cfg, params, prompt, spec, m["seed"])[0]
    except ValueError as exc:
        raise GoldenError(f"{case_dir}: refmtp refuses the case: {str(exc).splitlines()[0]}") from None


# -------------------------------------------------------------------------------------------
# the first diverging step
# -------------------------------------------------------------------------------------------
DISTRIBUTIONS = ("draft_logits", "q", "logits", "p")


def _ints(x) -> list:
    return [int(v) for v in np.asarray(x).reshape(-1)]


def _step_divergence(s: int, expected: dict, actual: dict, table: list) -> tuple[str, str] | None:
    """(why, detail) of the first difference at step s, or None (names the outputs lack are
    skipped: they are listed as missing in the table)."""
    def pair(field):
        n = f"spec.{s}.{field}"
        return expected.get(n), actual.get(n)

    off = []  # distributions outside tolerance at this step (context for a decision, or the cause)
    for field in DISTRIBUTIONS:
        e, a = pair(field)
        if e is not None and a is not None:
            name = f"spec.{s}.{field}"
            row = compare_tensor(name, e, a, *tolerance_for(name, table))
            if row.failed:
                off.append(f"{name} " + (row.note if row.status == "shape" else f"max abs err {row.max_abs:.2e}"))
    also = f"; {', '.join(off)} differs too" if off else ""
    e, a = pair("drafts")
    if e is not None and a is not None and _ints(e) != _ints(a):
        ed, ad = _ints(e), _ints(a)
        i = next((i for i, (x, y) in enumerate(zip(ed, ad)) if x != y), None)
        if i is None:
            return "draft", f"{len(ad)} drafts {ad}, expected {len(ed)} {ed}{also}"
        return "draft", f"draft {i + 1} is {ad[i]}, expected {ed[i]} (drafts {ad}, expected {ed}){also}"
    K = len(_ints(e)) if e is not None else None
    e, a = pair("num_accepted")
    if e is not None and a is not None and _ints(e) != _ints(a):
        return "accept decision", (f"{_ints(a)[0]} of {K} drafts accepted, expected {_ints(e)[0]}{also}")
    A = _ints(e)[0] if e is not None else None
    e, a = pair("tokens")
    if e is not None and a is not None and _ints(e) != _ints(a):
        et, at = _ints(e), _ints(a)
        if A is not None and at[:A] != et[:A]:
            return "emitted tokens", f"tokens {at}, expected {et}: the accepted drafts differ{also}"
        why = "bonus" if A is not None and A == K else "residual sample"
        got = at[A] if A is not None and len(at) > A else None
        return why, (f"token {got} after {A} accepted drafts, expected {et[A] if A is not None else et} "
                     f"(tokens {at}, expected {et}){also}")
    if off:
        return "distribution", ", ".join(off)
    for name in sorted(n for n in expected if n.startswith(f"spec.{s}.cache_length.")):
        if name in actual and _ints(actual[name]) != _ints(expected[name]):
            return "rollback", f"{name} is {_ints(actual[name])[0]}, expected {_ints(expected[name])[0]}"
    return None


def first_divergence(expected: dict, actual: dict, table: list) -> str | None:
    """One line naming the first step (in generation order) at which ``actual`` leaves the
    golden generation and why; None when every step (and the final sequence) agrees."""
    steps = sorted({int(m.group(1)) for n in expected if (m := STEP.fullmatch(n))})
    for s in steps:
        if not any(STEP.fullmatch(n) and int(STEP.fullmatch(n).group(1)) == s for n in actual):
            return f"first divergence: step {s}: the outputs have no spec.{s}.* tensors (they stop earlier)"
        found = _step_divergence(s, expected, actual, table)
        if found:
            return f"first divergence: step {s} ({found[0]}): {found[1]}"
    e, a = expected.get("spec.final_tokens"), actual.get("spec.final_tokens")
    if e is not None and a is not None and _ints(e) != _ints(a):
        return f"first divergence: the final sequence: {_ints(a)}, expected {_ints(e)}"
    return None
