"""An independent draft model for speculative decoding (the "independent" school: Leviathan et
al. 2023, Chen et al. 2023; docs/speculative-decoding.md §1): a separate small model on the same
tokens drafts K tokens autoregressively from its own latent cache, the target verifies them in
one call with the same acceptance rule, and both caches roll back to the committed tokens.

    drafter = DraftModelDrafter(draft_dec, mode="absorbed", capacity=cap)   # draft_dec: a Decoder
    # used by refmtp.inference.speculative.speculative_generate(dec, ..., draft=draft_dec)

State between steps (``seq`` = committed tokens x_0..x_{n-1}, n = len(seq)): the draft cache holds
rows of committed tokens only, at most n-1 of them (x_{n-1}, and after a fully accepted step also
d_K, were never fed to it).

One step with K drafts:

1. draft: one draft-model call on the committed tokens the cache lacks (``seq[len:n]``, at least
   x_{n-1}) gives the logits of d_1; then one call per draft on ``[d_{s-1}]`` gives d_s,
   s = 2..K. q_s is the draft model's softmax at the decoding temperature
   (:func:`refmtp.inference.sampling.processed_probs`) for sampled drafts, one-hot for argmax
   drafts (docs/speculative-decoding.md §1.4). After drafting the cache holds n+K-1 rows.
2. verify and accept: the target's call and rule, unchanged (refmtp/inference/speculative.py).
3. commit A accepted drafts: the draft rows of d_1..d_A are rows of committed tokens now, the
   rows of the rejected d_{A+1}..d_{K-1} are dropped: truncate to min(n+A, n+K-1).

A draft model and its target must share the tokens: :func:`check_pair` compares
``vocab_size``, the special-token ids and the tokenizer files
(:func:`refmtp.checkpoint.tokenizer_metadata`) and names the first difference in one line.
"""
from __future__ import annotations

from refmtp.checkpoint import tokenizer_metadata
from refmtp.inference.decode import Decoder

__all__ = ["DraftModelDrafter", "check_pair", "check_draft_k"]


def check_pair(target_meta: dict, draft_meta: dict) -> None:
    """One-line ValueError unless the draft model's tokenizer metadata equals the target's."""
    for key in sorted(set(target_meta) | set(draft_meta)):
        t, d = target_meta.get(key), draft_meta.get(key)
        if t != d:
            raise ValueError(
                f"the draft model does not share the target's tokens: {key} is {d!r} in the draft "
                f"model and {t!r} in the target; train the draft model on the target's tokenizer "
                "(refmtp train --preset draft)"
            )


def check_draft_k(k) -> int:
    """Drafts per step from a draft model: any integer >= 0 (it drafts autoregressively)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"K={k!r} drafts per step must be an integer >= 0")
    return k


class DraftModelDrafter:
    """Autoregressive drafts from a separate model with its own cache (module docstring)."""

    def __init__(self, draft: Decoder, target: Decoder, mode: str, capacity: int):
        if draft.bk.name != target.bk.name:
            raise ValueError(f"the draft model is on {draft.bk.name} and the target on {target.bk.name}: "
                             "load both on one backend")
        check_pair(tokenizer_metadata(target.cfg), tokenizer_metadata(draft.cfg))
        self.dec = draft
        self.cache = draft.new_cache("main", mode=mode, capacity=capacity)

    def observe(self, main_out, row: int) -> None:  # the draft model never reads the target
        return None

    def draft(self, seq, h0, K: int, choose):
        """K drafts after seq[-1]; returns (drafts, q rows or None, the drafts' logits rows)."""
        if K == 0:
            return [], None, []
        xp = self.dec.bk.xp
        feed = list(seq[self.cache.length:])  # committed tokens the cache lacks, x_{n-1} at least
        drafts, qs, rows = [], [], []
        for _ in range(K):
            out = self.dec.main(xp.asarray([feed], dtype=xp.int64), self.cache)  # (1, len(feed), V)
            rows.append(out.logits[0, -1])  # (V,) draft logits of the next token
            d, q = choose(rows[-1])
            drafts.append(d)
            qs.append(q)
            feed = [d]
        return drafts, (None if qs[0] is None else qs), rows

    def commit(self, main_out, A: int, n: int) -> None:
        """Keep the rows of x_0..x_{n-1}, d_1..d_A (those written): roll back the rejected drafts."""
        self.cache.truncate(min(self.cache.length, n + A))

    def cache_lengths(self) -> dict:
        return {"draft": self.cache.length}
