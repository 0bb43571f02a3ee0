"""The decoding caches: MLA's latent KV cache (or the naive per-head one) and per-row states.

absorbed (default, "MLA")
    per layer and token the cache holds ONLY ``[c_KV | k_pe]`` (kv_lora_rank + qk_rope_head_dim
    numbers): ``c_KV`` after kv_a_layernorm, ``k_pe`` after RoPE at the token's position
    (docs/inference.md).
naive ("MHA equivalent", HF / DeepSeek ``attn_impl="naive"``)
    every head's full key ``[k_nope | k_pe]`` (H*(Dn+Dr)) and value (H*Dv).

Cache size per token: absorbed ``(Rkv + Dr) * L * itemsize``, naive ``H * (Dn + Dr + Dv) * L *
itemsize`` (:func:`cache_bytes_per_token`). ``cache.truncate(n)`` rolls back.
"""
from __future__ import annotations

from refmtp.backends import backend_of

MODES = ("absorbed", "naive")


# -------------------------------------------------------------------------------------------
# sizes
# -------------------------------------------------------------------------------------------
def per_layer_entries(cfg, mode: str = "absorbed") -> int:
    """Numbers cached per layer and token: absorbed ``Rkv + Dr``; naive ``H*(Dn+Dr) + H*Dv``."""
    check_mode(mode)
    if mode == "absorbed":
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim  # c_KV and the shared k_pe (docs/deepseek-v3.md §2.7)
    H = cfg.num_attention_heads
    return H * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) + H * cfg.v_head_dim  # k and v per head


def cache_bytes_per_token(cfg, mode: str = "absorbed", itemsize: int = 2, layers: int | None = None) -> int:
    """Cache bytes per token over ``layers`` MLA layers (default: the L main layers).

    V3 in bf16 (itemsize 2): absorbed 576 * 61 * 2 = 70,272; naive 40,960 * 61 * 2 = 4,997,120.
    """
    n = cfg.num_hidden_layers if layers is None else int(layers)
    return per_layer_entries(cfg, mode) * n * int(itemsize)


def check_mode(mode):
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
        check_mode(mode)
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
            new[:, : self.length, :] = self.buf[:, : self.length, :]
            self.buf = new
        self.buf[:, self.length: self.length + T, :] = rows
        self.length += T

    def view(self, lo: int, hi: int):
        """Rows ``[lo, hi)`` (B, hi-lo, width); ``hi <= length``."""
        if not 0 <= lo <= hi <= self.length:
            raise ValueError(f"RowStore.view: [{lo}, {hi}) is outside the {self.length} stored rows")
        return self.buf[:, lo:hi, :]

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"RowStore.truncate: length={length} must be in [0, {self.length}]")
        self.length = length
