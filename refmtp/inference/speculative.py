"""Self-speculative decoding: the model's own MTP modules (or parallel heads) draft, the main
model verifies all drafts in one cached forward, an acceptance rule decides, caches roll back.

See docs/speculative-decoding.md §1-5 (rules, RNG-v1, MTP drafting, metrics) and
docs/deepseek-v3.md §4.6. Full description and measured numbers: docs/inference.md.

State between steps (0-based; ``seq`` = committed tokens x_0..x_{n-1}, n = len(seq)):

* main cache: positions 0..n-2 (every committed token but the newest), ``h0`` rows 0..n-2
  (h^0 = model.norm output, what MTP module 1 reads; docs/deepseek-v3.md §4.4);
* MTP module k: cache + chained states of rows 0..n-1-k, the rows whose inputs are committed
  (row j reads h^{k-1}_j and token x_{j+k}; V3 eq. 21).

One step with K drafts (K capped so the step cannot overshoot ``max_new_tokens``):

1. draft (causal MTP, paper order: module s drafts d_s, s = 1..min(K, D)): over the extended
   sequence ``z = seq + [d_1..d_{s-1}]`` module s catches up rows ``[len_s, n-1)`` with tokens
   ``z[j+s]`` and states ``h^{s-1}_j``, and its row n-2 gives the logits of d_s (it predicts
   z[n-2+s+1] = the token after d_{s-1}). This is exactly what the training forward computes
   for module s on ``z`` (tested against :func:`refmtp.model.forward`). Drafts s > D
   (``reuse_last_module=True``, vLLM/SGLang chaining, docs/speculative-decoding.md §3.3) reuse module D one row further
   on, reading ``Emb(d_{s-1})`` and the carried state of the previous draft. Rows that read a
   draft are dropped again after drafting (truncate to n-k), so the next step recomputes
   them from committed inputs: the MTP caches always hold committed rows only.
   Parallel heads (mtp_kind "parallel", Stern et al. / Gloeckle et al.): head k's output at the
   last verified row predicts x_{n-1+k}; the heads run on the trunk rows of every verify call.
   An independent draft model (``draft=``, refmtp/inference/draft_model.py) drafts K tokens
   autoregressively from its own cache instead; everything below is the same for it.
2. verify: ONE main-model call on ``[x_{n-1}, d_1..d_K]`` (positions n-1..n-1+K) gives the K+1
   target rows ``p_1..p_{K+1}``.
3. accept (``rule``): "lossless" = :func:`refmtp.inference.acceptance.verify_drafts` (RNG-v1; greedy R1
   at temperature 0, else the lossless rule with temperature applied to p and, for sampled
   drafts, to q); "blockwise" = greedy exact match (Stern et al.); "typical" = Medusa typical
   acceptance (lossy).
4. commit ``d_1..d_A, y``; roll the main cache back to n+A tokens (x_{n-1}, d_1..d_A are the
   only verified inputs that stay) and keep their h^0 rows.

Randomness (temperature > 0): the accept/sample coins come from ``Generator(PCG64(seed))`` in
the RNG-v1 order (K accept coins, then one sample coin, per step; docs/speculative-decoding.md §2.2 R9); sampled drafts
draw from an independent child stream (``spawn``), as precondition (ii) of docs/speculative-decoding.md §1.2 requires.
Plain sampling (:func:`refmtp.inference.decode.generate`) consumes the same stream as K = 0.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from refmtp.backends import backend_of
from refmtp.inference.cache import RowStore
from refmtp.inference.decode import Decoder, check_budget, check_prompt
from refmtp.inference.draft_model import DraftModelDrafter, check_draft_k
from refmtp.inference.acceptance import verify_drafts, verify_greedy
from refmtp.inference.sampling import icdf, processed_probs, rng_v1_draws
from refmtp.inference.other_rules import verify_typical

RULES = ("lossless", "blockwise", "typical")


@dataclass(frozen=True)
class StepRecord:
    """One verification step (docs/speculative-decoding.md §5)."""

    K: int  # drafts proposed
    A: int  # drafts accepted by the rule (before stop truncation)
    emitted: int  # tokens committed by the step after stop-token truncation (A+1 unless cut)
    fallback: bool = False  # RNG-v1 residual fallback happened (R3)


@dataclass
class SpecResult:
    tokens: list  # generated tokens (prompt excluded)
    steps: list  # StepRecord per verification step
    seconds: float = 0.0  # wall-clock of the whole generation (prefill included)
    trace: list = field(default_factory=list)  # per step record if trace (speculative_generate)


# -------------------------------------------------------------------------------------------
# metrics (docs/speculative-decoding.md §5)
# -------------------------------------------------------------------------------------------
def spec_metrics(steps, K: int | None = None) -> dict:
    """Metrics from the per-step records, counting only committed tokens.

    Committed accepted drafts of a step: ``a = min(A, emitted)`` (a stop token inside the
    accepted drafts cuts them). Then

    * ``acceptance_per_position[i-1] = P(A >= i)`` = #steps with a >= i / #steps that drafted
      >= i tokens (the unconditional rate of draft position i; vLLM ``per_pos / num_drafts``);
    * ``conditional_acceptance[i-1] = P(A >= i) / P(A >= i-1)``;
    * ``tau`` = mean tokens committed per verification step, bonus / residual token INCLUDED;
    * ``draft_acceptance_rate`` = sum a / sum K.
    """
    K = max((s.K for s in steps), default=0) if K is None else int(K)
    acc = [min(s.A, s.emitted) for s in steps]
    per_pos, cond = [], []
    for i in range(1, K + 1):
        drafted = sum(1 for s in steps if s.K >= i)
        r = (sum(1 for s, a in zip(steps, acc) if s.K >= i and a >= i) / drafted) if drafted else None
        per_pos.append(r)
        prev = 1.0 if i == 1 else per_pos[i - 2]
        cond.append(None if r is None or not prev else r / prev)
    drafted = sum(s.K for s in steps)
    n = len(steps)
    return {
        "steps": n,
        "tokens": sum(s.emitted for s in steps),
        "drafted": drafted,
        "accepted": sum(acc),
        "acceptance_per_position": per_pos,
        "conditional_acceptance": cond,
        "tau": (sum(s.emitted for s in steps) / n) if n else None,
        "draft_acceptance_rate": (sum(acc) / drafted) if drafted else None,
        "residual_fallbacks": sum(1 for s in steps if s.fallback),
    }


# -------------------------------------------------------------------------------------------
# drafters
# -------------------------------------------------------------------------------------------
class _Choice:
    """Turns a draft logits row into (token, q row or None): argmax (one-hot q) or a sample."""

    def __init__(self, temperature, sample, gen):
        self.temperature, self.sample, self.gen = temperature, sample, gen
        self.coins = []  # the uniforms drawn for sampled drafts (read by the trace)

    def __call__(self, row):
        xp = self.xp_of(row)
        if not self.sample or self.temperature == 0:
            return int(xp.argmax(row)), None  # lowest index on ties; q = one-hot (docs/speculative-decoding.md §1.4)
        q = processed_probs(row, self.temperature)  # (V,) float64, the distribution drawn from
        self.coins.append(float(self.gen.random()))
        return icdf(q, self.coins[-1]), q

    @staticmethod
    def xp_of(row):
        return backend_of(row).xp


class MTPDrafter:
    """Causal MTP drafting with per-module caches (module docstring, step 1)."""

    def __init__(self, dec: Decoder, mode: str, capacity: int):
        cfg, like = dec.cfg, dec.params["model.embed_tokens.weight"]
        self.dec, self.D = dec, cfg.D  # reuse past D is validated by check_k
        self.caches = [dec.new_cache(("mtp", k), mode=mode, capacity=capacity) for k in range(1, cfg.D + 1)]
        self.carry = [RowStore(cfg.hidden_size, like=like, capacity=capacity) for _ in range(cfg.D)]

    def observe(self, main_out, row: int) -> None:  # MTP modules read h^0 from the main store
        return None

    def draft(self, seq, h0: RowStore, K: int, choose: _Choice):
        """Up to K drafts for the tokens after seq[-1]; returns (drafts, q rows or None, the
        drafts' logits rows)."""
        n = len(seq)
        if K == 0 or n < 2:  # module 1's row n-2 needs h^0_{n-2}: no draft after a 1-token prompt
            return [], None, []
        xp = self.dec.bk.xp
        z = list(seq)
        drafts, qs, rows = [], [], []
        state = None
        for s in range(1, K + 1):
            if s <= self.D:  # module s, paper order: catch up rows [len_s, n-1)
                cache, store = self.caches[s - 1], self.carry[s - 1]
                lo = cache.length
                ids = xp.asarray([z[lo + s: n - 1 + s]], dtype=xp.int64)  # (1, n-1-lo) tokens z_{j+s}
                h_prev = h0.view(lo, n - 1) if s == 1 else self.carry[s - 2].view(lo, n - 1)  # h^{s-1}_j
                out = self.dec.mtp(s, ids, h_prev, cache)
                store.append(out.carry)  # rows [lo, n-1) of h^s
                state = out.carry[:, -1:]  # (1, 1, d) h^s_{n-2}
            else:  # reuse module D one row further on (vLLM/SGLang chaining, docs/speculative-decoding.md §3.3)
                ids = xp.asarray([[z[-1]]], dtype=xp.int64)  # Emb(d_{s-1})
                out = self.dec.mtp(self.D, ids, state, self.caches[self.D - 1])
                state = out.carry
            rows.append(out.logits[0, -1])  # (V,) draft logits of d_s
            d, q = choose(rows[-1])
            drafts.append(d)
            qs.append(q)
            z.append(d)
        for k in range(1, self.D + 1):  # keep only rows with committed inputs: j <= n-1-k
            keep = min(self.caches[k - 1].length, n - k)
            self.caches[k - 1].truncate(keep)
            self.carry[k - 1].truncate(keep)
        return drafts, (None if qs[0] is None else qs), rows

    def commit(self, main_out, A: int, n: int) -> None:
        return None

    def cache_lengths(self) -> dict:
        return {f"mtp.{k}": c.length for k, c in enumerate(self.caches, 1)}


class HeadsDrafter:
    """Parallel heads (mtp_kind "parallel"): head k at row j predicts x_{j+k+1}; drafts are
    the heads' outputs at the last verified row (Stern et al.'s combined score-and-propose)."""

    def __init__(self, dec: Decoder, mode: str, capacity: int):
        self.dec, self.D = dec, dec.cfg.D
        self.caches = [dec.new_cache(("mtp", k), mode=mode, capacity=capacity) for k in range(1, self.D + 1)]
        self.pending = None  # list of D (V,) logits rows at the last main row

    def observe(self, main_out, row: int) -> None:
        """Run every head on the new trunk rows; keep the heads' logits at ``row``."""
        outs = [self.dec.head(k, main_out.trunk, self.caches[k - 1]) for k in range(1, self.D + 1)]
        self.pending = [o.logits[0, row] for o in outs]

    def draft(self, seq, h0, K: int, choose: _Choice):
        if K == 0 or self.pending is None:
            return [], None, []
        rows = self.pending[:K]  # head k's logits at the last verified row
        picks = [choose(r) for r in rows]
        drafts = [d for d, _ in picks]
        return drafts, (None if picks[0][1] is None else [q for _, q in picks]), rows

    def commit(self, main_out, A: int, n: int) -> None:
        self.observe(main_out, A)  # head rows n-1..n-1+K, drafts for the next step from row A
        for c in self.caches:
            c.truncate(n + A)

    def cache_lengths(self) -> dict:
        return {f"mtp.{k}": c.length for k, c in enumerate(self.caches, 1)}


# -------------------------------------------------------------------------------------------
# the loop
# -------------------------------------------------------------------------------------------
def check_k(cfg, k, reuse_last_module: bool = False) -> int:
    """Validate the number of drafts per step against the model's D modules / heads."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"K={k!r} drafts per step must be an integer >= 0")
    D = cfg.D
    if k > 0 and D == 0:
        raise ValueError("this model has no MTP modules (num_nextn_predict_layers=0): use K=0")
    if k > D:
        if cfg.refmtp.mtp_kind == "parallel":
            raise ValueError(f"K={k} drafts need K <= D={D} parallel heads (head k drafts token k)")
        if not reuse_last_module:
            raise ValueError(
                f"K={k} drafts exceed the D={D} MTP modules: use K <= {D} or reuse the last "
                "module for drafts past D (reuse_last_module=True, CLI --reuse)"
            )
    return k


def speculative_generate(dec: Decoder, prompt, max_new_tokens: int, *, k: int, temperature: float = 0.0,
                         seed: int = 0, rule: str = "lossless", sample_drafts: bool = False,
                         reuse_last_module: bool = False, stop_token: int | None = None,
                         mode: str = "absorbed", typical_eps: float | None = None,
                         typical_delta: float | None = None, on_tokens=None,
                         trace: bool = False, draft: Decoder | None = None) -> SpecResult:
    """Generate up to ``max_new_tokens`` tokens after ``prompt`` with K drafts per step.

    ``rule``: "lossless" (RNG-v1 ``verify_drafts``; output = plain decoding token for token at
    temperature 0, and in distribution at temperature > 0), "blockwise" (greedy exact match),
    "typical" (Medusa; at temperature 0 its test uses p at temperature 1, its replacement is
    greedy). ``sample_drafts``: draw drafts from q = softmax(draft logits / T) and pass q to the
    rule (default: argmax drafts, one-hot q). ``trace`` keeps one dict per step in
    ``res.trace`` (tests, the speculative golden cases): ``n`` (committed tokens before the
    step), ``drafts``, ``q`` (the rule's q rows, None for argmax drafts), ``draft_logits``,
    ``logits`` (K+1 target rows), ``p`` (softmax(logits / T), None at T = 0), the coins
    ``u_draft`` (sampled drafts), ``u_accept``, ``u_sample`` (None where not drawn),
    ``num_accepted``, ``tokens`` (emitted) and ``cache_lengths`` after the rollback
    (``{"main": n + A, "mtp.k": ...}``, or ``"draft"``). See the module docstring for the state and the step.
    ``draft``: a :class:`Decoder` of an independent draft model on the same tokens
    (refmtp/inference/draft_model.py) drafts instead of the MTP modules / heads; any K >= 0.
    """
    cfg = dec.cfg
    seq = check_prompt(prompt, cfg)
    K = check_k(cfg, k, reuse_last_module) if draft is None else check_draft_k(k)
    check_budget(max_new_tokens, len(seq), cfg, extra=K)
    if draft is not None:
        check_budget(max_new_tokens, len(seq), draft.cfg, extra=K)
    if rule not in RULES:
        raise ValueError(f"rule={rule!r} is not known: choose one of {', '.join(RULES)}")
    if not (isinstance(temperature, (int, float)) and temperature >= 0):
        raise ValueError(f"temperature={temperature!r} must be a number >= 0")
    t0 = time.perf_counter()
    xp = dec.bk.xp
    gen = dec.bk.rng(seed)  # RNG-v1 coin stream (R9)
    choose = _Choice(temperature, sample_drafts, gen.gen.spawn(1)[0])  # independent draft stream
    cap = len(seq) + max_new_tokens + K + 1
    cache = dec.new_cache("main", mode=mode, capacity=cap)
    like = dec.params["model.embed_tokens.weight"]
    h0 = RowStore(cfg.hidden_size, like=like, capacity=cap)  # h^0 rows of the main cache
    if draft is not None:
        drafter = DraftModelDrafter(draft, dec, mode, cap)
    elif cfg.refmtp.mtp_kind == "causal":
        drafter = MTPDrafter(dec, mode, cap)
    else:
        drafter = HeadsDrafter(dec, mode, cap)
    if len(seq) > 1:  # prefill every committed token but the newest
        out = dec.main(xp.asarray([seq[:-1]], dtype=xp.int64), cache)
        h0.append(out.hidden)
        drafter.observe(out, -1)
    typical_kw = {}
    if typical_eps is not None:
        typical_kw["eps"] = typical_eps
    if typical_delta is not None:
        typical_kw["delta"] = typical_delta

    res = SpecResult(tokens=[], steps=[])
    while len(res.tokens) < max_new_tokens:
        n = len(seq)
        K_step = min(K, max_new_tokens - len(res.tokens) - 1)  # never draft past the budget
        choose.coins = []
        drafts, q, rows = drafter.draft(seq, h0, K_step, choose)
        out = dec.main(xp.asarray([[seq[-1]] + drafts], dtype=xp.int64), cache)  # verify: (1, K+1, V)
        logits = out.logits[0]  # (K+1, V) target rows p_1..p_{K+1} (before temperature)
        seen = {} if trace else None
        verdict = _decide(rule, logits, q, drafts, temperature, gen, typical_kw, seen)
        A = verdict.num_accepted
        cache.truncate(n + A)  # keep x_{n-1}, d_1..d_A; drop the rejected drafts' rows
        h0.append(out.hidden[:, : A + 1])
        drafter.commit(out, A, n)
        emitted = list(verdict.tokens)
        if stop_token is not None and stop_token in emitted:
            emitted = emitted[: emitted.index(stop_token) + 1]
        if trace:
            lengths = {"main": cache.length, **drafter.cache_lengths()}
            res.trace.append({"n": n, "drafts": list(drafts), "q": q, "draft_logits": rows,
                              "logits": logits, "p": seen.get("p"), "u_draft": list(choose.coins) or None,
                              "u_accept": seen.get("u_accept"), "u_sample": seen.get("u_sample"),
                              "num_accepted": A, "tokens": list(emitted), "cache_lengths": lengths})
        res.steps.append(StepRecord(K=len(drafts), A=A, emitted=len(emitted),
                                    fallback=bool(verdict.residual_fallback)))
        seq.extend(emitted)
        res.tokens.extend(emitted)
        if on_tokens is not None:
            on_tokens(emitted)
        if stop_token is not None and emitted[-1] == stop_token:
            break
    res.seconds = time.perf_counter() - t0
    return res


def _decide(rule, logits, q, drafts, temperature, gen, typical_kw, seen=None):
    """The rule's verdict; ``seen`` (a dict, for the trace) receives p and the coins drawn."""
    K = len(drafts)
    seen = {} if seen is None else seen
    if rule == "blockwise":
        return verify_greedy(logits, drafts)  # Stern et al.: longest prefix equal to the argmax
    if rule == "typical":
        p = processed_probs(logits, temperature if temperature > 0 else 1.0)  # (K+1, V)
        u = rng_v1_draws(gen, K)[1] if temperature > 0 else None  # bonus sampled only when T > 0
        seen.update(p=p, u_sample=u)
        return verify_typical(p, drafts, u_sample=u, **typical_kw)
    if temperature == 0:  # R1: greedy, on the logits, no randomness
        return verify_drafts(None, None, drafts, None, None, greedy=True, logits=logits)
    p = processed_probs(logits, temperature)  # (K+1, V) float64, temperature applied to p
    u_accept, u_sample = rng_v1_draws(gen, K)  # R9: K accept coins, then one sample coin
    seen.update(p=p, u_accept=u_accept, u_sample=u_sample)
    q_rows = None if q is None else _stack(q)
    return verify_drafts(p, q_rows, drafts, u_accept, u_sample)


def _stack(rows):
    xp = _Choice.xp_of(rows[0])
    return xp.stack(rows, axis=0)  # (K, V)
