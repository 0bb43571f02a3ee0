"""Cached (incremental) decoding with MLA's latent KV cache, and plain cached generation.

Forward only. The model's own forward pieces do the math (``refmtp.model.mla`` helpers, RMSNorm,
SwiGLU, ``moe_forward``, ``attention_forward``); this module adds the cache and the two ways of
attending over it (spec 2.7; docs/inference.md):

absorbed (default, "MLA")
    per layer and token the cache holds ONLY ``[c_KV | k_pe]`` (Rkv + Dr numbers): ``c_KV`` after
    kv_a_layernorm, ``k_pe`` after RoPE at the token's position. With ``Wkv_b`` viewed as
    ``(H, Dn+Dv, Rkv)``, ``W_UK = [:, :Dn]`` and ``W_UV = [:, Dn:]``:

        q~_{t,h}  = W_UK[h]^T q_nope_{t,h}                               (Rkv)   W_UK into the query
        s_{t,j,h} = (q~_{t,h} . c_KV_j + q_pe_{t,h} . k_pe_j) * scale            scale unchanged (spec 2.5)
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
causal mask of spec 2.6 (``start = cache.length``); ``cache.truncate(n)`` rolls back.

    dec   = Decoder(params, cfg)                       # validates and splits params once
    cache = dec.new_cache("main")                      # layers 0..L-1
    out   = dec.main(tokens (B,T), cache)              # logits (B,T,V), hidden h^0, trunk z
    c1    = dec.new_cache(("mtp", 1))                  # MTP module 1's block (layer L)
    o1    = dec.mtp(1, token_ids (B,T), h_prev (B,T,d), c1)   # logits, carry (spec 4.3, 4.4)
    oh    = dec.head(k, z (B,T,d), ck)                 # parallel head k (mtp_kind "parallel")
    cache.truncate(n)

    ids = generate(dec, prompt_ids, max_new_tokens, temperature=0.0, seed=0)   # plain cached decoding
"""
from __future__ import annotations

from typing import Any, NamedTuple

from refmtp.backends import backend_of
from refmtp.model.block import sub_params
from refmtp.params import layer_prefix, mtp_layer
from refmtp.model.mla import mla_kv_b_heads, mla_kv_up, mla_latent_kv, mla_query
from refmtp.model import EMBED, LM_HEAD, NORM, check_params
from refmtp.mutation import on
from refmtp.model.moe import moe_forward
from refmtp.model.ops.attention import attention_forward
from refmtp.model.ops.embedding import embedding_forward
from refmtp.model.ops.linear import linear_forward
from refmtp.model.ops.rmsnorm import rmsnorm_forward
from refmtp.model.ops.rope import softmax_scale
from refmtp.model.ops.swiglu import swiglu_forward

MODES = ("absorbed", "naive")


# -------------------------------------------------------------------------------------------
# sizes
# -------------------------------------------------------------------------------------------
def per_layer_entries(cfg, mode: str = "absorbed") -> int:
    """Numbers cached per layer and token: absorbed ``Rkv + Dr``; naive ``H*(Dn+Dr) + H*Dv``."""
    _check_mode(mode)
    if mode == "absorbed":
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim  # c_KV and the shared k_pe (spec 2.7)
    H = cfg.num_attention_heads
    return H * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) + H * cfg.v_head_dim  # k and v per head


def cache_bytes_per_token(cfg, mode: str = "absorbed", itemsize: int = 2, layers: int | None = None) -> int:
    """Cache bytes per token over ``layers`` MLA layers (default: the L main layers).

    V3 in bf16 (itemsize 2): absorbed 576 * 61 * 2 = 70,272; naive 40,960 * 61 * 2 = 4,997,120.
    """
    n = cfg.num_hidden_layers if layers is None else int(layers)
    return per_layer_entries(cfg, mode) * n * int(itemsize)


def _check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"decode mode {mode!r} is not known: choose absorbed or naive")


# -------------------------------------------------------------------------------------------
# the cache
# -------------------------------------------------------------------------------------------
class KVCache:
    """Decoding cache of one stack of MLA layers (the main model, one MTP module's block, or
    one parallel head), for a batch of ``B`` sequences that all have ``length`` tokens.

    Buffers are preallocated and doubled when full; rows ``[0, length)`` are valid.
    absorbed: ``latent[layer]`` (B, capacity, Rkv+Dr) = ``[c_KV | k_pe]``;
    naive: ``k[layer]`` (B, H, capacity, Dn+Dr) and ``v[layer]`` (B, H, capacity, Dv).
    """

    def __init__(self, cfg, layers, *, like, batch: int = 1, mode: str = "absorbed", capacity: int = 64):
        _check_mode(mode)
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"KVCache: batch={batch!r} must be an integer >= 1")
        self.cfg, self.layers, self.mode, self.batch = cfg, tuple(layers), mode, batch
        self.bk = backend_of(like)
        self.dtype = like.dtype
        self.length = 0
        self.capacity = 0
        self.buffers: dict[int, tuple] = {}
        self._grow(max(int(capacity), 1))

    def _alloc(self, capacity):
        xp, cfg, B = self.bk.xp, self.cfg, self.batch
        H, Dn, Dr, Dv = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                         cfg.v_head_dim)
        if self.mode == "absorbed":
            return (xp.zeros((B, capacity, cfg.kv_lora_rank + Dr), dtype=self.dtype),)  # [c_KV | k_pe]
        return (xp.zeros((B, H, capacity, Dn + Dr), dtype=self.dtype),  # k = [k_nope | k_pe]
                xp.zeros((B, H, capacity, Dv), dtype=self.dtype))  # v

    def _grow(self, need):
        if need <= self.capacity:
            return
        cap = max(need, 2 * self.capacity)
        for layer in self.layers:
            new = self._alloc(cap)
            for old, buf in zip(self.buffers.get(layer, ()), new):
                seq_axis = buf.ndim - 2
                idx = (slice(None),) * seq_axis + (slice(0, self.length), ...)
                buf[idx] = old[idx]
            self.buffers[layer] = new
        self.capacity = cap

    def write(self, layer: int, start: int, *rows):
        """Store the new rows of ``layer`` at ``[start, start+T)``; return the valid prefix views
        ``[0, start+T)`` of every buffer of the layer."""
        T = rows[0].shape[-2]
        self._grow(start + T)
        out = []
        for buf, r in zip(self.buffers[layer], rows):
            pre = (slice(None),) * (buf.ndim - 2)
            buf[pre + (slice(start, start + T), ...)] = r
            out.append(buf[pre + (slice(0, start + T), ...)])
        return out

    def truncate(self, length: int) -> None:
        """Roll back to the first ``length`` tokens (rows past it are ignored and overwritten)."""
        if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= self.length:
            raise ValueError(
                f"KVCache.truncate: length={length!r} must be an integer in [0, {self.length}] "
                "(the cache can only roll back)"
            )
        self.length = length

    @property
    def itemsize(self) -> int:
        return self.bk.xp.empty((0,), dtype=self.dtype).itemsize

    @property
    def bytes_per_token(self) -> int:
        """Bytes the buffers hold per token and sequence: ``per_layer_entries * layers * itemsize``."""
        total = sum(int(b.nbytes) for bufs in self.buffers.values() for b in bufs)
        return total // (self.capacity * self.batch)

    @property
    def nbytes(self) -> int:
        """Bytes of the valid rows: ``length * batch * bytes_per_token``."""
        return self.length * self.batch * self.bytes_per_token


# -------------------------------------------------------------------------------------------
# one MLA layer over the cache
# -------------------------------------------------------------------------------------------
def mla_decode(x, p, cfg, cache: KVCache, layer: int, start: int):
    """MLA for ``T`` new tokens at positions ``start..start+T-1`` attending to the cached
    ``start`` tokens and themselves (causal).  x (B,T,d) post-input_layernorm -> (B,T,d).

    Appends the new tokens' entries to ``cache`` (layer ``layer``); does not move ``cache.length``.
    """
    xp = backend_of(x).xp
    B, T, _ = x.shape
    H, Dr, Dv = cfg.num_attention_heads, cfg.qk_rope_head_dim, cfg.v_head_dim
    Rkv = cfg.kv_lora_rank
    S = start + T
    positions = xp.arange(start, S, dtype=xp.int64)  # (T,) RoPE positions of the new tokens
    if on("decode.positions_restart"):
        positions = xp.arange(0, T, dtype=xp.int64)
    scale = softmax_scale(cfg)  # qk_head_dim^-1/2 * mscale^2 in BOTH modes (spec 2.5, 2.7)
    q_nope, q_pe = mla_query(x, p, cfg, positions)  # (B,H,T,Dn), (B,H,T,Dr), q_pe rotated
    c_kv, k_pe = mla_latent_kv(x, p, cfg, positions)  # (B,T,Rkv) post-norm, (B,T,Dr) post-RoPE
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


def block_decode(x, p, cfg, layer: int, cache: KVCache, start: int):
    """One decoder block (pre-norm, two residuals; the same math as ``refmtp.model.block.block_forward``)
    with the attention over the cache.  x (B,T,d) -> (B,T,d)."""
    eps = cfg.rms_norm_eps
    a, _ = rmsnorm_forward(x, p["input_layernorm.weight"], eps)  # (B,T,d)
    h = x + mla_decode(a, p["self_attn"], cfg, cache, layer, start)  # (B,T,d) first residual
    m, _ = rmsnorm_forward(h, p["post_attention_layernorm.weight"], eps)  # (B,T,d)
    if cfg.is_moe_layer(layer):
        f, _, _ = moe_forward(m, p["mlp"], cfg)  # (B,T,d) DeepSeekMoE (eqs. 12-16)
    else:
        f, _ = swiglu_forward(m, p["mlp"]["gate_proj.weight"], p["mlp"]["up_proj.weight"],
                              p["mlp"]["down_proj.weight"])  # (B,T,d) dense MLP
    return h + f  # second residual


# -------------------------------------------------------------------------------------------
# the model over caches
# -------------------------------------------------------------------------------------------
class MainOut(NamedTuple):
    logits: Any  # (B,T,V) next-token logits of the new tokens
    hidden: Any  # (B,T,d) h^0 = model.norm(z), what MTP module 1 reads (spec 4.4)
    trunk: Any  # (B,T,d) z, the pre-norm trunk output (what parallel heads read)


class MTPOut(NamedTuple):
    logits: Any  # (B,T,V) logits of module k / parallel head k (predicts t_{i+k+1} from row i)
    carry: Any  # (B,T,d) state passed on: n (post_norm chain) or y (pre_norm chain)


def _split_block(params, layer):
    """Local names of one block; "self_attn" and "mlp" hold the sub-dicts their layers take."""
    p = sub_params(params, layer_prefix(layer))
    out = {k: v for k, v in p.items() if not k.startswith(("self_attn.", "mlp."))}
    out["self_attn"] = sub_params(p, "self_attn.")
    out["mlp"] = sub_params(p, "mlp.")
    return out


class Decoder:
    """A model prepared for cached decoding: ``params`` validated and split per layer once."""

    def __init__(self, params: dict, cfg):
        check_params(params, cfg)
        self.params, self.cfg = params, cfg
        self.bk = backend_of(params[EMBED])
        self.kind = cfg.refmtp.mtp_kind
        L = cfg.num_hidden_layers
        self.blocks = {layer: _split_block(params, layer) for layer in range(L + cfg.D)}

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

    @staticmethod
    def _start(cache, B, T, cfg):
        if B != cache.batch:
            raise ValueError(f"decode: batch {B} does not match the cache's batch {cache.batch}")
        if T < 1:
            raise ValueError("decode: need at least one new token")
        if cache.length + T > cfg.max_position_embeddings:
            raise ValueError(
                f"decode: {cache.length + T} tokens exceed max_position_embeddings="
                f"{cfg.max_position_embeddings}; shorten the prompt or max_new_tokens"
            )
        return cache.length

    def main(self, tokens, cache: KVCache) -> MainOut:
        """Append ``tokens`` (B,T) to the main model's cache; logits/states of those T tokens."""
        cfg, P = self.cfg, self.params
        tokens = self._ids(tokens)
        start = self._start(cache, tokens.shape[0], tokens.shape[1], cfg)
        x, _ = embedding_forward(tokens, P[EMBED])  # (B,T,d)
        for layer in range(cfg.num_hidden_layers):
            x = block_decode(x, self.blocks[layer], cfg, layer, cache, start)  # (B,T,d)
        cache.length = start + tokens.shape[1]
        h0, _ = rmsnorm_forward(x, P[NORM], cfg.rms_norm_eps)  # (B,T,d) h^0
        logits, _ = linear_forward(h0, P[LM_HEAD])  # (B,T,V)
        return MainOut(logits=logits, hidden=h0, trunk=x)

    def mtp(self, k: int, token_ids, h_prev, cache: KVCache) -> MTPOut:
        """Causal MTP module k on new rows (V3 eqs. 21-23; spec 4.3): row i reads
        ``Emb(token_ids[:, i])`` (= t_{i+k}) and ``h_prev[:, i]`` (= h^{k-1}_i); RoPE position
        of row i = its cache row (the main-model position of h^{k-1}_i)."""
        if self.kind != "causal":
            raise ValueError("Decoder.mtp needs mtp_kind='causal'; use Decoder.head for parallel heads")
        cfg, P = self.cfg, self.params
        layer = self._module_layer(k)
        p = self.blocks[layer]
        token_ids = self._ids(token_ids)
        B, T = token_ids.shape
        if tuple(h_prev.shape) != (B, T, cfg.hidden_size):
            raise ValueError(
                f"decode: h_prev {tuple(h_prev.shape)} must be (B, T, d) = {(B, T, cfg.hidden_size)}"
            )
        start = self._start(cache, B, T, cfg)
        xp, eps = self.bk.xp, cfg.rms_norm_eps
        emb, _ = embedding_forward(token_ids, P[EMBED])  # (B,T,d) shared embedding
        e, _ = rmsnorm_forward(emb, p["enorm.weight"], eps)  # (B,T,d)
        hh, _ = rmsnorm_forward(h_prev, p["hnorm.weight"], eps)  # (B,T,d)
        x, _ = linear_forward(xp.concat([e, hh], axis=-1), p["eh_proj.weight"])  # (B,T,d) embedding first
        y = block_decode(x, p, cfg, layer, cache, start)  # (B,T,d)
        cache.length = start + T
        n, _ = rmsnorm_forward(y, p["shared_head.norm.weight"], eps)  # (B,T,d)
        logits, _ = linear_forward(n, P[LM_HEAD])  # (B,T,V) shared lm_head
        return MTPOut(logits=logits, carry=n if cfg.refmtp.mtp_chain == "post_norm" else y)

    def head(self, k: int, z, cache: KVCache) -> MTPOut:
        """Parallel head k (Gloeckle et al.; spec 6) on new rows of the trunk output z (B,T,d):
        ``logits = lm_head(model.norm(Block_{L+k-1}(z)))``; head k predicts t_{i+k+1} from row i."""
        if self.kind != "parallel":
            raise ValueError("Decoder.head needs mtp_kind='parallel'; use Decoder.mtp for causal MTP")
        cfg, P = self.cfg, self.params
        layer = self._module_layer(k)
        B, T, _ = z.shape
        start = self._start(cache, B, T, cfg)
        y = block_decode(z, self.blocks[layer], cfg, layer, cache, start)  # (B,T,d)
        cache.length = start + T
        n, _ = rmsnorm_forward(y, P[NORM], cfg.rms_norm_eps)  # shared model.norm
        logits, _ = linear_forward(n, P[LM_HEAD])  # (B,T,V) shared lm_head
        return MTPOut(logits=logits, carry=n)


# -------------------------------------------------------------------------------------------
# per-row states kept next to a cache
# -------------------------------------------------------------------------------------------
class RowStore:
    """Per-token states ``(B, length, d)`` kept in step with a :class:`KVCache` (the main
    model's ``h^0``, an MTP module's chained state). Preallocated, doubled when full."""

    def __init__(self, width: int, *, like, batch: int = 1, capacity: int = 64):
        self.bk, self.batch, self.width = backend_of(like), batch, int(width)
        self.dtype = like.dtype
        self.buf = self.bk.xp.zeros((batch, max(int(capacity), 1), self.width), dtype=self.dtype)
        self.length = 0

    def append(self, rows) -> None:
        """rows (B, T, width) become rows ``[length, length+T)``."""
        T = rows.shape[1]
        if self.length + T > self.buf.shape[1]:
            new = self.bk.xp.zeros((self.batch, max(self.length + T, 2 * self.buf.shape[1]), self.width),
                                   dtype=self.dtype)
            new[:, : self.length] = self.buf[:, : self.length]
            self.buf = new
        self.buf[:, self.length: self.length + T] = rows
        self.length += T

    def view(self, lo: int, hi: int):
        """Rows ``[lo, hi)`` (B, hi-lo, width); ``hi <= length``."""
        if not 0 <= lo <= hi <= self.length:
            raise ValueError(f"RowStore.view: [{lo}, {hi}) is outside the {self.length} stored rows")
        return self.buf[:, lo:hi]

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"RowStore.truncate: length={length} must be in [0, {self.length}]")
        self.length = length


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
    ``ICDF(softmax(logits/T), u)`` with ``u`` the RNG-v1 sample coin of ``gen`` (spec 2.2 R5, R9
    with K = 0, so plain sampling consumes the same stream as speculative decoding with no drafts)."""
    from refmtp.inference.sampling import icdf, processed_probs, rng_v1_draws

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
