"""Cached decoding (refmtp/inference/decode.py, docs/deepseek-v3.md §2.7): absorbed latent-cache decoding, naive full-K/V
decoding and the full-sequence forward give the same logits (float64, 1e-10) through prefill,
single-token steps, K+1-token appends, rollback and buffer growth; MTP modules and parallel heads
over their caches match the training forward; cache sizes match (Rkv + Dr) * L * itemsize and
the naive H * (Dn + Dr + Dv) * L * itemsize; plain cached generation equals a no-cache loop."""
from __future__ import annotations

import numpy as np
import pytest

from refmtp.config import preset
from refmtp.inference.cache import KVCache, RowStore, cache_bytes_per_token, per_layer_entries
from refmtp.inference.decode import Decoder, generate
from refmtp.model import forward, init_params

TOL = 1e-10


def _cfg(variant):
    cfg = preset("tiny")
    if variant == "tiny":
        return cfg
    if variant == "no_q_lora_yarn":  # q_proj path, YaRN frequencies and a softmax mscale != 1
        return cfg.replace(q_lora_rank=None, qk_rope_head_dim=8, rope_scaling={
            "type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8})
    if variant == "parallel":
        return cfg.replace(refmtp={"mtp_kind": "parallel"})
    if variant == "pre_norm_chain":
        return cfg.replace(refmtp={"mtp_chain": "pre_norm"})
    raise AssertionError(variant)


def _params(cfg, backend="numpy", seed=0):
    # std 0.3 (not 0.02) so attention is far from uniform and routing is decisive; non-zero bias
    return init_params(cfg, seed=seed, backend=backend, dtype="float64", std=0.3, bias_std=0.1)


def _tokens(cfg, B, T, seed=1):
    """Host (B, T) int64 token ids; move them with ``backend.asarray(..., dtype="int64")``."""
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(B, T), dtype=np.int64)


def _dev_tokens(backend, cfg, B, T, seed=1):
    return backend.asarray(_tokens(cfg, B, T, seed), dtype="int64")


def _cat(backend, outs, field):
    """The ``field`` of each decode output, concatenated over T, on the host."""
    return np.concatenate([backend.to_numpy(getattr(o, field)) for o in outs], axis=1)


# chunk schedule: prefill 3, one token, a K+1 = 4 verification block, rollback 2, re-append 3
# DIFFERENT tokens, then 2 singles; capacity 2 forces the buffers to grow several times
def _run_schedule(dec, cache, tokens, alt):
    outs, pos = [], 0
    for n in (3, 1, 4):
        outs.append(dec.main(tokens[:, pos:pos + n], cache))
        pos += n
    dec.main(alt[:, :3], cache)  # rejected "drafts": appended, then rolled back
    cache.truncate(pos)
    for n in (3, 1, 1):
        outs.append(dec.main(tokens[:, pos:pos + n], cache))
        pos += n
    return outs, pos


@pytest.mark.parametrize("variant", ["tiny", "no_q_lora_yarn"])
@pytest.mark.parametrize("mode", ["absorbed", "naive"])
def test_main_decode_matches_full_forward(backend, variant, mode):
    cfg = _cfg(variant)
    params = _params(cfg, backend.name)
    dec = Decoder(params, cfg)
    tokens, alt = _dev_tokens(backend, cfg, 2, 14), _dev_tokens(backend, cfg, 2, 14, seed=9)
    cache = dec.new_cache("main", batch=2, mode=mode, capacity=2)
    outs, pos = _run_schedule(dec, cache, tokens, alt)
    assert cache.length == pos == 13 and cache.capacity >= 13
    ref, _ = forward(params, cfg, tokens[:, :pos + 1], need_cache=False)
    np.testing.assert_allclose(_cat(backend, outs, "logits"), backend.to_numpy(ref.logits), rtol=0, atol=TOL)
    np.testing.assert_allclose(_cat(backend, outs, "hidden"), backend.to_numpy(ref.hidden), rtol=0, atol=TOL)


def test_absorbed_equals_naive_step_by_step(backend):
    cfg = _cfg("tiny")
    dec = Decoder(_params(cfg, backend.name, seed=3), cfg)
    tokens = _dev_tokens(backend, cfg, 1, 9, seed=4)
    ca, cn = dec.new_cache(mode="absorbed"), dec.new_cache(mode="naive")
    h = backend.to_numpy
    for t in range(9):
        a = dec.main(tokens[:, t:t + 1], ca)
        b = dec.main(tokens[:, t:t + 1], cn)
        np.testing.assert_allclose(h(a.logits), h(b.logits), rtol=0, atol=TOL)
        np.testing.assert_allclose(h(a.trunk), h(b.trunk), rtol=0, atol=TOL)
    # the caches really differ in what they hold: latent (B,S,Rkv+Dr) vs per-head K and V
    (lat,) = ca.buffers[0]
    k, v = cn.buffers[0]
    assert lat.shape[-1] == cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert k.shape[1:2] == (cfg.num_attention_heads,) and v.shape[-1] == cfg.v_head_dim


@pytest.mark.parametrize("variant", ["tiny", "pre_norm_chain"])
@pytest.mark.parametrize("mode", ["absorbed", "naive"])
def test_mtp_decode_matches_forward(backend, variant, mode):
    """Module k row i reads Emb(t_{i+k}) and h^{k-1}_i (chained state); decoded in chunks."""
    cfg = _cfg(variant)
    params = _params(cfg, backend.name, seed=5)
    dec = Decoder(params, cfg)
    T = 11
    tokens = _dev_tokens(backend, cfg, 2, T + 1, seed=6)
    ref, _ = forward(params, cfg, tokens, need_cache=False)
    h_prev = ref.hidden  # h^0 (B, T, d)
    for k in range(1, cfg.D + 1):
        Tk = T - k
        cache = dec.new_cache(("mtp", k), batch=2, mode=mode, capacity=3)
        outs, lo = [], 0
        for n in (4, 1, Tk - 5):
            outs.append(dec.mtp(k, tokens[:, k + lo:k + lo + n], h_prev[:, lo:lo + n], cache))
            lo += n
        np.testing.assert_allclose(_cat(backend, outs, "logits"), backend.to_numpy(ref.mtp_logits[k - 1]),
                                   rtol=0, atol=TOL)
        np.testing.assert_allclose(_cat(backend, outs, "carry"), backend.to_numpy(ref.mtp_hidden[k - 1]),
                                   rtol=0, atol=TOL)
        h_prev = backend.xp.concat([o.carry for o in outs], axis=1)  # (B, Tk, d) on the backend


@pytest.mark.parametrize("mode", ["absorbed", "naive"])
def test_parallel_heads_decode_matches_forward(backend, mode):
    cfg = _cfg("parallel")
    params = _params(cfg, backend.name, seed=7)
    dec = Decoder(params, cfg)
    T = 9
    tokens = _dev_tokens(backend, cfg, 1, T + 1, seed=8)
    ref, _ = forward(params, cfg, tokens, need_cache=False)
    cache = dec.new_cache(mode=mode)
    main = [dec.main(tokens[:, :5], cache), dec.main(tokens[:, 5:T], cache)]
    z = backend.xp.concat([o.trunk for o in main], axis=1)  # (1, T, d) on the backend
    for k in range(1, cfg.D + 1):
        ck = dec.new_cache(("mtp", k), mode=mode)
        heads = [dec.head(k, z[:, :2], ck), dec.head(k, z[:, 2:T - k], ck)]
        np.testing.assert_allclose(_cat(backend, heads, "logits"), backend.to_numpy(ref.mtp_logits[k - 1]),
                                   rtol=0, atol=TOL)
    with pytest.raises(ValueError, match="mtp_kind='causal'"):
        dec.mtp(1, tokens[:, 1:3], z[:, :2], dec.new_cache(("mtp", 1)))


# -------------------------------------------------------------------------------------------
# cache size
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cache_bytes_per_token(backend, dtype):
    cfg = preset("tiny")
    params = init_params(cfg, seed=0, backend=backend.name, dtype=dtype)
    dec = Decoder(params, cfg)
    item = np.dtype(dtype).itemsize
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    Dn, Dr, Dv, Rkv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    want = {"absorbed": (Rkv + Dr) * L * item, "naive": (H * (Dn + Dr) + H * Dv) * L * item}
    for mode, expect in want.items():
        cache = dec.new_cache(mode=mode, batch=2, capacity=5)
        dec.main(_dev_tokens(backend, cfg, 2, 7), cache)  # grows past the initial capacity
        assert cache.bytes_per_token == expect == cache_bytes_per_token(cfg, mode, item)
        assert cache.nbytes == 7 * 2 * expect
        total = sum(b.nbytes for bufs in cache.buffers.values() for b in bufs)
        assert total == cache.capacity * 2 * expect


def test_cache_size_formulas_for_presets():
    """The published V3 numbers (docs/deepseek-v3.md §2.7): 576 cached values per layer and token vs 128 heads
    * (192 + 128) for the MHA equivalent; 61 layers, bf16."""
    v3 = preset("deepseek-v3")
    assert per_layer_entries(v3, "absorbed") == 512 + 64
    assert per_layer_entries(v3, "naive") == 128 * 192 + 128 * 128
    assert cache_bytes_per_token(v3, "absorbed", 2) == 576 * 61 * 2
    assert cache_bytes_per_token(v3, "naive", 2) == 40960 * 61 * 2
    small = preset("small")
    ratio = cache_bytes_per_token(small, "naive") / cache_bytes_per_token(small, "absorbed")
    assert ratio == (4 * (32 + 16) + 4 * 32) / (64 + 16)
    with pytest.raises(ValueError, match="absorbed or naive"):
        per_layer_entries(v3, "mha")


# -------------------------------------------------------------------------------------------
# validation and helpers
# -------------------------------------------------------------------------------------------
def test_cache_rollback_and_errors(backend):
    cfg = preset("tiny")
    dec = Decoder(_params(cfg, backend.name), cfg)
    cache = dec.new_cache()
    tok = _dev_tokens(backend, cfg, 1, 4)
    first = backend.to_numpy(dec.main(tok, cache).logits)
    cache.truncate(2)  # roll back two rows; re-appending them gives the same logits
    np.testing.assert_allclose(backend.to_numpy(dec.main(tok[:, 2:], cache).logits), first[:, 2:],
                               rtol=0, atol=TOL)
    assert cache.length == 4
    with pytest.raises(ValueError, match="can only roll back"):
        cache.truncate(5)
    with pytest.raises(ValueError, match="can only roll back"):
        cache.truncate(-1)
    cache.truncate(0)
    assert cache.length == 0 and cache.nbytes == 0
    with pytest.raises(ValueError, match="batch 2 does not match"):
        dec.main(_dev_tokens(backend, cfg, 2, 1), cache)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        dec.main(backend.zeros((1, cfg.max_position_embeddings + 1), dtype="int64"), cache)
    with pytest.raises(ValueError, match="absorbed or naive"):
        dec.new_cache(mode="mha")
    with pytest.raises(ValueError, match=r"1\.\.D=2"):
        dec.new_cache(("mtp", 3))
    with pytest.raises(ValueError, match="batch"):
        KVCache(cfg, [0], like=dec.params["lm_head.weight"], batch=0)
    with pytest.raises(ValueError, match="integer array"):
        dec.main(backend.zeros((1, 2), dtype="float64"), cache)


def test_row_store_grows_and_truncates(backend):
    like = backend.zeros((1,), dtype="float64")
    rs = RowStore(3, like=like, capacity=1)
    a = np.arange(12.0).reshape(1, 4, 3)
    d = backend.asarray(a, dtype="float64")
    rs.append(d[:, :1])
    rs.append(d[:, 1:])
    np.testing.assert_array_equal(backend.to_numpy(rs.view(0, 4)), a)
    rs.truncate(2)
    rs.append(d[:, 3:] + 100)
    np.testing.assert_array_equal(backend.to_numpy(rs.view(1, 3)),
                                  np.concatenate([a[:, 1:2], a[:, 3:] + 100], axis=1))
    with pytest.raises(ValueError, match="outside"):
        rs.view(0, 4)


def test_generate_greedy_equals_uncached_loop(backend):
    cfg = preset("tiny")
    params = _params(cfg, backend.name, seed=11)
    prompt = [3, 1, 4, 1, 5]
    got = generate(Decoder(params, cfg), prompt, 8)
    seq = list(prompt)
    for _ in range(8):  # no cache: the full forward over the whole sequence every token
        out, _ = forward(params, cfg, backend.asarray(np.asarray([seq + [0]]), dtype="int64"),
                         need_cache=False)
        seq.append(int(np.argmax(backend.to_numpy(out.logits[0, -1]))))
    assert got == seq[len(prompt):]
    assert generate(Decoder(params, cfg), prompt, 8, mode="naive") == got


def test_generate_sampling_seeded_and_validated(backend):
    cfg = preset("tiny")
    dec = Decoder(_params(cfg, backend.name, seed=12), cfg)
    a = generate(dec, [1, 2], 12, temperature=1.0, seed=5)
    assert a == generate(dec, [1, 2], 12, temperature=1.0, seed=5)
    assert a != generate(dec, [1, 2], 12, temperature=1.0, seed=6)
    stop = a[4]
    cut = generate(dec, [1, 2], 12, temperature=1.0, seed=5, stop_token=stop)
    assert cut == a[: a.index(stop) + 1]
    assert generate(dec, [1, 2], 0) == []
    with pytest.raises(ValueError, match="empty"):
        generate(dec, [], 3)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(dec, [cfg.vocab_size], 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(dec, [1], -1)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(dec, [1], cfg.max_position_embeddings)
    with pytest.raises(ValueError, match="temperature"):
        generate(dec, [1], 2, temperature=-1.0)


def test_decode_on_each_backend(backend):
    """The same decoding on every backend (cupy under the gpu marker) vs the numpy forward."""
    cfg = preset("tiny")
    params = _params(cfg, backend=backend.name)
    dec = Decoder(params, cfg)
    tokens = _tokens(cfg, 1, 6)
    ref, _ = forward(_params(cfg), cfg, tokens, need_cache=False)
    for mode in ("absorbed", "naive"):
        cache = dec.new_cache(mode=mode)
        outs = [dec.main(backend.asarray(tokens[:, :4]), cache),
                dec.main(backend.asarray(tokens[:, 4:5]), cache)]
        got = np.concatenate([backend.to_numpy(o.logits) for o in outs], axis=1)
        np.testing.assert_allclose(got, ref.logits[:, :5], rtol=0, atol=1e-9)
    ref_dec = Decoder(_params(cfg), cfg)
    assert generate(dec, [1, 2, 3], 5) == generate(ref_dec, [1, 2, 3], 5)
    # sampling draws its coins on the host (RNG v1): the same seed gives the same tokens
    assert (generate(dec, [1, 2, 3], 8, temperature=1.0, seed=5)
            == generate(ref_dec, [1, 2, 3], 8, temperature=1.0, seed=5))


# -------------------------------------------------------------------------------------------
# one wiring: decoding runs the model's own block, MTP module and heads
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["tiny", "parallel"])
def test_decoding_runs_the_training_block(monkeypatch, variant):
    """Break the one block function the training forward uses and decoding breaks too: the
    decoder composes no block, MTP module, main path or head of its own."""
    import refmtp.model.model as wiring
    import refmtp.model.mtp as mtp_module

    cfg = _cfg(variant)
    params = _params(cfg)
    dec = Decoder(params, cfg)
    ids = np.asarray(_tokens(cfg, 1, 3))
    seen = []
    real = wiring.block_forward

    modes = []

    def spy(x, p, c, layer, positions, attend=None, *, train=True):
        seen.append(layer)
        modes.append(train)
        return real(x, p, c, layer, positions, attend, train=train)

    monkeypatch.setattr(wiring, "block_forward", spy)
    monkeypatch.setattr(mtp_module, "block_forward", spy)
    out = dec.main(ids, dec.new_cache("main"))
    assert seen == list(range(cfg.num_hidden_layers))
    k_cache = dec.new_cache(("mtp", 1))
    if variant == "parallel":
        dec.head(1, out.trunk, k_cache)
    else:
        dec.mtp(1, ids, out.hidden, k_cache)
    assert seen[-1] == cfg.num_hidden_layers  # module / head 1 ran the same block function
    assert not any(modes)  # in inference mode: no balance loss, no backward caches

    def broken(*a, **k):
        raise RuntimeError("the training block is broken")

    monkeypatch.setattr(wiring, "block_forward", broken)
    monkeypatch.setattr(mtp_module, "block_forward", broken)
    with pytest.raises(RuntimeError, match="training block is broken"):
        dec.main(ids, dec.new_cache("main"))
    with pytest.raises(RuntimeError, match="training block is broken"):
        if variant == "parallel":
            dec.head(1, out.trunk, dec.new_cache(("mtp", 1)))
        else:
            dec.mtp(1, ids, out.hidden, dec.new_cache(("mtp", 1)))


def test_inference_composes_no_wiring_of_its_own():
    """refmtp/inference/ never calls the block-level pieces: norms, FFNs, embeddings, blocks,
    MTP modules or the lm_head come only through refmtp.model.model's trunk/depth/head."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "refmtp" / "inference"
    forbidden = re.compile(r"\b(rmsnorm_forward|swiglu_forward|moe_forward|embedding_forward|"
                           r"block_forward|mtp_forward|xent_forward)\(")  # a call
    for path in sorted(root.glob("*.py")):
        hits = [line for line in path.read_text().splitlines()
                if forbidden.search(line) and not line.lstrip().startswith("#")]
        assert not hits, f"{path.name} composes model wiring itself: {hits[:3]}"


# -------------------------------------------------------------------------------------------
# decoding without training work (issue 20 req. 1; docs/inference.md "Decoding cost")
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["tiny", "parallel"])
def test_inference_mode_is_the_same_forward_without_training_work(variant):
    """train=False through the one wiring gives bit-identical outputs and skips the balance
    loss, the load statistics and every backward cache."""
    from refmtp.model.model import depth_forward, head_forward, trunk_forward

    cfg = _cfg(variant)
    params = _params(cfg)
    ids = np.asarray(_tokens(cfg, 2, 6))
    pos = np.arange(6, dtype=np.int64)
    tr, ti = (trunk_forward(params, cfg, ids, pos, train=t) for t in (True, False))
    for name in ("logits", "h0", "z"):
        np.testing.assert_array_equal(getattr(tr, name), getattr(ti, name))
    assert len(tr.blocks) == cfg.num_hidden_layers and ti.blocks == []
    if variant == "parallel":
        dr, di = (head_forward(params, cfg, 1, tr.z, pos, train=t) for t in (True, False))
    else:
        dr, di = (depth_forward(params, cfg, 1, ids, tr.h0, pos, train=t) for t in (True, False))
    for name in ("logits", "n", "y"):
        np.testing.assert_array_equal(getattr(dr, name), getattr(di, name))
    assert dr.aux is not None and dr.block is not None  # layer L is MoE in tiny: a balance loss
    assert di.aux is None and di.block is None and di.mtp is None


def test_moe_inference_mode_skips_balance_and_load():
    from refmtp.model.moe import moe_forward
    from refmtp.params import layer_prefix, sub_params

    cfg = preset("tiny")
    params = _params(cfg)
    p = sub_params(params, layer_prefix(1) + "mlp.")
    x = np.random.default_rng(3).standard_normal((2, 5, cfg.hidden_size))
    out, aux, cache = moe_forward(x, p, cfg)
    out_i, aux_i, cache_i = moe_forward(x, p, cfg, train=False)
    np.testing.assert_array_equal(out, out_i)
    assert aux is not None and cache.load is not None and aux_i is None and cache_i is None


def test_decoder_rope_tables_once_per_length_bucket():
    """The decoder's RoPE tables are built for a power-of-two bucket and reused; every row
    equals the table built for that position alone (YaRN included), bit for bit."""
    from refmtp.model.ops.rope import rope_tables

    cfg = _cfg("no_q_lora_yarn")
    dec = Decoder(_params(cfg), cfg)
    cos, sin = dec.rope_tables(10)
    assert cos.shape[0] == Decoder.ROPE_BUCKET_MIN and dec.rope_tables(64)[0] is cos  # reused
    cos2, _ = dec.rope_tables(65)
    assert cos2.shape[0] == 128
    want_c, want_s = rope_tables(cfg, np.asarray([0, 37, 127]), dec.params["lm_head.weight"])
    np.testing.assert_array_equal(cos2[[0, 37, 127]], want_c)
    np.testing.assert_array_equal(dec.rope_tables(100)[1][[0, 37, 127]], want_s)
    assert dec.rope_tables(cfg.max_position_embeddings)[0].shape[0] == cfg.max_position_embeddings


def test_decoder_params_are_frozen_views():
    """The decoder keeps its parameters read-only, with the per-layer views made once."""
    from refmtp.params import FrozenParams, sub_params

    cfg = preset("tiny")
    params = _params(cfg)
    dec = Decoder(params, cfg)
    assert isinstance(dec.params, FrozenParams)
    view = sub_params(dec.params, "model.layers.1.")
    assert view is sub_params(dec.params, "model.layers.1.")  # remembered
    plain = sub_params(params, "model.layers.1.")
    assert view.keys() == plain.keys() and all(view[k] is plain[k] for k in plain)
    with pytest.raises(TypeError, match="read-only"):
        dec.params["lm_head.weight"] = params["lm_head.weight"]
    with pytest.raises(TypeError, match="read-only"):
        view.update({})


def test_membound_preset_outgrows_the_caches():
    """decode-membound exists to be memory-bound: its weights are > 1 GB in float32 and a
    decoded token reads > 300 MB of FFN weights alone (benchmarks/decode.py counts ~525 MB)."""
    from refmtp.params import param_count

    cfg = preset("decode-membound")
    assert param_count(cfg) * 4 > 1e9
    d, moe_i = cfg.hidden_size, cfg.moe_intermediate_size
    per_moe_layer = 3 * d * moe_i * (cfg.num_experts_per_tok + cfg.n_shared_experts)
    dense = 3 * d * cfg.intermediate_size
    assert 4 * (dense + (cfg.num_hidden_layers - 1) * per_moe_layer) > 3e8
