"""Cached (incremental) decoding with MLA's latent KV cache, and plain cached generation.

Forward only, and with the model's one wiring: :meth:`Decoder.main`, :meth:`Decoder.mtp` and
:meth:`Decoder.head` call :func:`refmtp.model.model.trunk_forward`, ``depth_forward`` and
``head_forward`` (the functions training's ``forward`` calls), passing :class:`CachedMLA` as the
blocks' attention. This module adds only the attention over the cache, in two forms
(docs/deepseek-v3.md §2.7; docs/inference.md):

absorbed (default, "MLA")
    per layer and token the cache holds ONLY ``[c_KV | k_pe]`` (Rkv + Dr numbers): ``c_KV`` after
    kv_a_layernorm, ``k_pe`` after RoPE at the token's position. With ``Wkv_b`` viewed as
    ``(H, Dn+Dv, Rkv)``, ``W_UK = [:, :Dn]`` and ``W_UV = [:, Dn:]``:

        q~_{t,h}  = W_UK[h]^T q_nope_{t,h}                               (Rkv)   W_UK into the query
        s_{t,j,h} = (q~_{t,h} . c_KV_j + q_pe_{t,h} . k_pe_j) * scale            scale unchanged (docs/deepseek-v3.md §2.5)
        x_{t,h}   = sum_j softmax_j(s) c_KV_j                            (Rkv)
        o_{t,h}   = W_UV[h] x_{t,h}                                      (Dv)    W_UV after attention
        out       = o_proj(concat_h o)

    i.e. multi-query attention over ``k = [c_KV | k_pe]`` (one key shared by all heads) and
    ``v = c_KV``, done by :func:`refmtp.model.ops.attention.attention_forward`.

naive ("MHA equivalent", HF / DeepSeek ``attn_impl="naive"``)
    the cache holds every head's full key ``[k_nope | k_pe]`` (H*(Dn+Dr)) and value (H*Dv).

Both are algebraically the full-sequence ``mla_forward``; tests/test_decode.py checks all three
agree to 1e-10 in float64. Cache size per token: absorbed ``(Rkv + Dr) * L * itemsize``, naive
``H * (Dn + Dr + Dv) * L * itemsize`` (:func:`cache_bytes_per_token`).

A decode call appends ``T >= 1`` new tokens at positions ``cache.length .. cache.length+T-1``
(prefill of a prompt, one token, or the ``K+1`` tokens of a speculative verification) with the
causal mask of docs/deepseek-v3.md §2.6 (``start = cache.length``); ``cache.truncate(n)`` rolls back.

    dec   = Decoder(params, cfg)                       # validates params once
    cache = dec.new_cache("main")                      # layers 0..L-1
    out   = dec.main(tokens (B,T), cache)              # logits (B,T,V), hidden h^0, trunk z
    c1    = dec.new_cache(("mtp", 1))                  # MTP module 1's block (layer L)
    o1    = dec.mtp(1, token_ids (B,T), h_prev (B,T,d), c1)   # logits, carry (docs/deepseek-v3.md §4.3, §4.4)
    oh    = dec.head(k, z (B,T,d), ck)                 # parallel head k (mtp_kind "parallel")
    cache.truncate(n)

    ids = generate(dec, prompt_ids, max_new_tokens, temperature=0.0, seed=0)   # plain cached decoding
"""
from __future__ import annotations

from typing import Any, NamedTuple

from refmtp.backends import backend_of
from refmtp.inference.cache import KVCache, RowStore
from refmtp.inference.sampling import icdf, processed_probs, rng_v1_draws
from refmtp.model import EMBED, check_params
from refmtp.model.mla import mla_kv_b_heads, mla_kv_up, mla_latent_kv, mla_query
from refmtp.model.model import chained_state, depth_forward, head_forward, trunk_forward
from refmtp.model.ops.attention import attention_forward
from refmtp.model.ops.linear import linear_forward
from refmtp.model.ops.rope import rope_tables, softmax_scale
from refmtp.mutation import on
from refmtp.params import FrozenParams, mtp_layer

__all__ = ["CachedMLA", "Decoder", "KVCache", "RowStore", "MainOut", "MTPOut", "mla_decode",
           "generate", "next_token", "check_prompt", "check_budget"]


# -------------------------------------------------------------------------------------------
# one MLA layer over the cache
# -------------------------------------------------------------------------------------------
def mla_decode(x, p, cfg, cache: KVCache, layer: int, start: int, tables=None):
    """MLA for ``T`` new tokens at positions ``start..start+T-1`` attending to the cached
    ``start`` tokens and themselves (causal).  x (B,T,d) post-input_layernorm -> (B,T,d).

    ``tables``: RoPE ``(cos, sin)`` of positions ``0..n-1`` with ``n >= start+T``
    (:meth:`Decoder.rope_tables`, built once per length bucket), sliced here; None builds
    them for the T positions. Appends the new tokens' entries to ``cache`` (layer ``layer``);
    does not move ``cache.length``.
    """
    xp = backend_of(x).xp
    B, T, _ = x.shape
    H, Dr, Dv = cfg.num_attention_heads, cfg.qk_rope_head_dim, cfg.v_head_dim
    Rkv = cfg.kv_lora_rank
    S = start + T
    first = 0 if on("decode.positions_restart") else start  # RoPE positions first..first+T-1
    positions = xp.arange(first, first + T, dtype=xp.int64)  # (T,) RoPE positions of the new tokens
    if tables is not None:
        tables = (tables[0][first:first + T, :], tables[1][first:first + T, :])  # (T, Dr/2) each
    scale = softmax_scale(cfg)  # qk_head_dim^-1/2 * mscale^2 in BOTH modes (docs/deepseek-v3.md §2.5, §2.7)
    q_nope, q_pe = mla_query(x, p, cfg, positions, tables)  # (B,H,T,Dn), (B,H,T,Dr), q_pe rotated
    c_kv, k_pe = mla_latent_kv(x, p, cfg, positions, tables)  # (B,T,Rkv) post-norm, (B,T,Dr) post-RoPE
    if on("decode.cache_latent_before_norm") or on("decode.cache_k_pe_unrotated"):
        raw = x @ p["kv_a_proj_with_mqa.weight"].T  # (B,T,Rkv+Dr) before the norm and RoPE
        if on("decode.cache_latent_before_norm"):
            c_kv = raw[..., :Rkv]
        if on("decode.cache_k_pe_unrotated"):
            k_pe = raw[..., Rkv:]
    if cache.mode == "absorbed":
        (lat,) = cache.write(layer, start, xp.concat([c_kv, k_pe], axis=-1))  # (B,S,Rkv+Dr)
        W_UK, W_UV = mla_kv_b_heads(p, cfg)  # (H,Dn,Rkv), (H,Dv,Rkv)
        if on("decode.absorbed_scale_latent_dim"):
            scale = (Rkv + Dr) ** -0.5
        if on("decode.values_from_w_uk"):
            W_UV = W_UK
        q_lat = q_nope @ W_UK[None, ...]  # (B,H,T,Dn) @ (1,H,Dn,Rkv) -> (B,H,T,Rkv)  q~ = W_UK^T q_nope
        q = xp.concat([q_lat, q_pe], axis=-1)  # (B,H,T,Rkv+Dr)
        k = xp.broadcast_to(lat[:, None, :, :], (B, H, S, Rkv + Dr))  # (B,H,S,Rkv+Dr) one key for all heads
        v = xp.broadcast_to(lat[:, None, :, :Rkv], (B, H, S, Rkv))  # (B,H,S,Rkv) values = c_KV
        if on("decode.cache_not_read"):
            k, v, start = k[:, :, start:], v[:, :, start:], 0
        x_lat, _ = attention_forward(q, k, v, scale, start=start)  # (B,H,T,Rkv)  sum_j p_j c_KV_j
        o = x_lat @ xp.matrix_transpose(W_UV)[None, ...]  # (B,H,T,Rkv) @ (1,H,Rkv,Dv) -> (B,H,T,Dv)  o = W_UV x
    else:
        k_nope, v_new = mla_kv_up(c_kv, p, cfg)  # (B,H,T,Dn), (B,H,T,Dv)  eqs. 2, 5
        k_new = xp.concat([k_nope, xp.broadcast_to(k_pe[:, None, :, :], (B, H, T, Dr))], axis=-1)  # (B,H,T,Dn+Dr)
        k, v = cache.write(layer, start, k_new, v_new)  # (B,H,S,Dn+Dr), (B,H,S,Dv)
        q = xp.concat([q_nope, q_pe], axis=-1)  # (B,H,T,Dn+Dr)  eq. 9
        if on("decode.cache_not_read"):
            k, v, start = k[:, :, start:], v[:, :, start:], 0
        o, _ = attention_forward(q, k, v, scale, start=start)  # (B,H,T,Dv)  eq. 10
    o = xp.reshape(xp.permute_dims(o, (0, 2, 1, 3)), (B, T, H * Dv))  # (B,T,H*Dv)
    out, _ = linear_forward(o, p["o_proj.weight"])  # (B,T,d)  eq. 11
    return out


class CachedMLA:
    """The blocks' attention during decoding: MLA of the new tokens over ``cache`` from ``start``.

    ``attend(a, p_attn, layer)`` is what :func:`refmtp.model.block.block_forward` calls instead
    of the full-sequence ``mla_forward``; it writes the new tokens' cache rows of ``layer``.
    """

    def __init__(self, cfg, cache: KVCache, start: int, tables=None):
        self.cfg, self.cache, self.start, self.tables = cfg, cache, start, tables

    def attend(self, a, p_attn: dict, layer: int):
        return mla_decode(a, p_attn, self.cfg, self.cache, layer, self.start, self.tables)


# -------------------------------------------------------------------------------------------
# the model over caches
# -------------------------------------------------------------------------------------------
class MainOut(NamedTuple):
    logits: Any  # (B,T,V) next-token logits of the new tokens
    hidden: Any  # (B,T,d) h^0 = model.norm(z), what MTP module 1 reads (docs/deepseek-v3.md §4.4)
    trunk: Any  # (B,T,d) z, the pre-norm trunk output (what parallel heads read)


class MTPOut(NamedTuple):
    logits: Any  # (B,T,V) logits of module k / parallel head k (predicts t_{i+k+1} from row i)
    carry: Any  # (B,T,d) state passed on: n (post_norm chain) or y (pre_norm chain)


class Decoder:
    """A model prepared for cached decoding: ``params`` validated once, then every call runs the
    model's own wiring (trunk_forward / depth_forward / head_forward) with :class:`CachedMLA`
    in inference mode (``train=False``: no balance loss, load statistics or backward caches).

    Prepared once (docs/inference.md, "Decoding cost"): the parameter views of every layer
    (:class:`refmtp.params.FrozenParams`) and the RoPE tables of positions ``0..n-1``, ``n``
    the length bucket (a power of two >= 64) of the longest sequence seen so far."""

    ROPE_BUCKET_MIN = 64

    def __init__(self, params: dict, cfg):
        cfg.validate()
        check_params(params, cfg)  # once: the per-token calls do not re-validate
        self.params, self.cfg = FrozenParams(params), cfg
        self.bk = backend_of(params[EMBED])
        self.kind = cfg.refmtp.mtp_kind
        self._rope = None  # (cos, sin) of positions 0..n-1, n a length bucket (rope_tables)

    def rope_tables(self, length: int):
        """RoPE ``(cos, sin)`` (n, Dr/2) of positions ``0..n-1``, ``n >= length``: built for the
        smallest power of two >= max(length, 64) (capped at max_position_embeddings) the
        first time a sequence gets that long, then reused. Row m equals
        ``rope_tables(cfg, [m], like)``: the same float64 angle and rounding."""
        if self._rope is None or self._rope[0].shape[0] < length:
            n = self.ROPE_BUCKET_MIN
            while n < length:
                n *= 2
            n = max(min(n, self.cfg.max_position_embeddings), length)
            xp = self.bk.xp
            self._rope = rope_tables(self.cfg, xp.arange(n, dtype=xp.int64), self.params[EMBED])
        return self._rope

    @property
    def dtype(self):
        return self.params[EMBED].dtype

    def new_cache(self, stack="main", *, batch: int = 1, mode: str = "absorbed",
                  capacity: int = 64) -> KVCache:
        """An empty cache for ``"main"`` (layers 0..L-1) or ``("mtp", k)`` (module/head k, layer L+k-1)."""
        if stack == "main":
            layers = range(self.cfg.num_hidden_layers)
        else:
            layers = (self._module_layer(stack[1]),)
        return KVCache(self.cfg, layers, like=self.params[EMBED], batch=batch, mode=mode,
                       capacity=capacity)

    def _module_layer(self, k):
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.cfg.D:
            raise ValueError(f"MTP module index k={k!r} must be in 1..D={self.cfg.D}")
        return mtp_layer(self.cfg, k)

    def _ids(self, tokens):
        xp = self.bk.xp
        if getattr(tokens, "ndim", None) != 2 or not xp.isdtype(tokens.dtype, "integral"):
            raise ValueError(
                f"decode: tokens must be a (B, T) integer array, got {getattr(tokens, 'shape', None)}"
            )
        return tokens

    def _positions(self, cache, B, T):
        """RoPE positions of T new rows of ``cache``: cache.length .. cache.length+T-1."""
        cfg = self.cfg
        if B != cache.batch:
            raise ValueError(f"decode: batch {B} does not match the cache's batch {cache.batch}")
        if T < 1:
            raise ValueError("decode: need at least one new token")
        if cache.length + T > cfg.max_position_embeddings:
            raise ValueError(
                f"decode: {cache.length + T} tokens exceed max_position_embeddings="
                f"{cfg.max_position_embeddings}; shorten the prompt or max_new_tokens"
            )
        xp = self.bk.xp
        return xp.arange(cache.length, cache.length + T, dtype=xp.int64)

    def _attention(self, cache, T):
        return CachedMLA(self.cfg, cache, cache.length, self.rope_tables(cache.length + T)).attend

    def main(self, tokens, cache: KVCache) -> MainOut:
        """Append ``tokens`` (B,T) to the main model's cache; logits/states of those T tokens."""
        tokens = self._ids(tokens)
        B, T = tokens.shape
        positions = self._positions(cache, B, T)
        tr = trunk_forward(self.params, self.cfg, tokens, positions, self._attention(cache, T),
                           train=False)
        cache.length += T
        return MainOut(logits=tr.logits, hidden=tr.h0, trunk=tr.z)

    def mtp(self, k: int, token_ids, h_prev, cache: KVCache) -> MTPOut:
        """Causal MTP module k on new rows (V3 eqs. 21-23; docs/deepseek-v3.md §4.3): row i reads
        ``Emb(token_ids[:, i])`` (= t_{i+k}) and ``h_prev[:, i]`` (= h^{k-1}_i); RoPE position
        of row i = its cache row (the main-model position of h^{k-1}_i)."""
        if self.kind != "causal":
            raise ValueError("Decoder.mtp needs mtp_kind='causal'; use Decoder.head for parallel heads")
        self._module_layer(k)
        token_ids = self._ids(token_ids)
        B, T = token_ids.shape
        if tuple(h_prev.shape) != (B, T, self.cfg.hidden_size):
            raise ValueError(
                f"decode: h_prev {tuple(h_prev.shape)} must be (B, T, d) = {(B, T, self.cfg.hidden_size)}"
            )
        positions = self._positions(cache, B, T)
        d = depth_forward(self.params, self.cfg, k, token_ids, h_prev, positions,
                          self._attention(cache, T), train=False)
        cache.length += T
        return MTPOut(logits=d.logits, carry=chained_state(self.cfg, d))

    def head(self, k: int, z, cache: KVCache) -> MTPOut:
        """Parallel head k (Gloeckle et al.; docs/deepseek-v3.md §6) on new rows of the trunk output z (B,T,d):
        ``logits = lm_head(model.norm(Block_{L+k-1}(z)))``; head k predicts t_{i+k+1} from row i."""
        if self.kind != "parallel":
            raise ValueError("Decoder.head needs mtp_kind='parallel'; use Decoder.mtp for causal MTP")
        self._module_layer(k)
        B, T, _ = z.shape
        positions = self._positions(cache, B, T)
        d = head_forward(self.params, self.cfg, k, z, positions, self._attention(cache, T),
                         train=False)
        cache.length += T
        return MTPOut(logits=d.logits, carry=d.n)


# -------------------------------------------------------------------------------------------
# plain cached generation (the non-speculative baseline)
# -------------------------------------------------------------------------------------------
def check_prompt(prompt, cfg) -> list[int]:
    """A non-empty list of token ids in ``[0, vocab_size)`` (one-line ValueError otherwise)."""
    ids = [int(t) for t in prompt]
    if not ids:
        raise ValueError("the prompt is empty: give at least one token")
    bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
    if bad:
        raise ValueError(f"prompt token {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})")
    return ids


def check_budget(max_new_tokens, n_prompt: int, cfg, extra: int = 0) -> int:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
    if n_prompt + max_new_tokens + extra > cfg.max_position_embeddings:
        raise ValueError(
            f"prompt ({n_prompt}) + max_new_tokens ({max_new_tokens})"
            f"{f' + {extra} draft slots' if extra else ''} exceed max_position_embeddings="
            f"{cfg.max_position_embeddings}; shorten one of them"
        )
    return max_new_tokens


def next_token(logits_row, temperature: float, gen) -> int:
    """One token from a (V,) logits row: argmax (lowest index on ties) at temperature 0, else
    ``ICDF(softmax(logits/T), u)`` with ``u`` the RNG-v1 sample coin of ``gen`` (docs/speculative-decoding.md §2.2 R5, R9
    with K = 0, so plain sampling consumes the same stream as speculative decoding with no drafts)."""
    xp = backend_of(logits_row).xp
    if temperature == 0:
        return int(xp.argmax(logits_row))
    _, u = rng_v1_draws(gen, 0)
    return icdf(processed_probs(logits_row, temperature), u)


def generate(dec: Decoder, prompt, max_new_tokens: int, *, temperature: float = 0.0, seed: int = 0,
             stop_token: int | None = None, mode: str = "absorbed", on_tokens=None) -> list[int]:
    """Plain cached decoding: prefill the prompt, then one main-model call per new token.

    Returns the generated tokens (the prompt excluded), at most ``max_new_tokens``, ending at
    ``stop_token`` when it is produced. ``on_tokens(list)`` is called with each new token.
    """
    cfg = dec.cfg
    seq = check_prompt(prompt, cfg)
    check_budget(max_new_tokens, len(seq), cfg)
    if not (isinstance(temperature, (int, float)) and temperature >= 0):
        raise ValueError(f"temperature={temperature!r} must be a number >= 0")
    xp = dec.bk.xp
    gen = dec.bk.rng(seed)
    cache = dec.new_cache("main", mode=mode, capacity=len(seq) + max_new_tokens)
    out: list[int] = []
    feed = seq  # the first call prefills the whole prompt
    while len(out) < max_new_tokens:
        res = dec.main(xp.asarray([feed], dtype=xp.int64), cache)  # (1, T, V)
        y = next_token(res.logits[0, -1], temperature, gen)
        out.append(y)
        if on_tokens is not None:
            on_tokens([y])
        if stop_token is not None and y == stop_token:
            break
        feed = [y]
    return out
