"""Checkpoints: bit-exact round trip, HF layout, and one-line errors for every kind of damage."""
from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from refmtp.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from refmtp.params import copy_names
from refmtp.config import preset
from refmtp.model import init_params
from refmtp.params import param_shapes
from refmtp.model import forward


@pytest.fixture
def tiny():
    return preset("tiny")


def _save(tmp_path, cfg, dtype="float64", **kw):
    """init_params(cfg, seed=1, ...) (on kw["backend"], numpy by default) saved to tmp_path/ck."""
    params = init_params(cfg, seed=1, dtype=dtype, bias_std=0.1, **kw)
    save_checkpoint(tmp_path / "ck", cfg, params)
    return tmp_path / "ck", params


def _tamper(path, fn):
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_round_trip_bit_exact(tmp_path, tiny, backend, dtype):
    path, params = _save(tmp_path, tiny, dtype, backend=backend.name)
    cfg2, p2 = load_checkpoint(path, backend=backend.name)
    assert cfg2.replace(extra={}).to_dict() == tiny.to_dict()  # plus the HF fields in extra
    assert set(p2) == set(params)
    h = backend.to_numpy
    for k, v in params.items():
        assert p2[k].dtype == v.dtype and p2[k].shape == v.shape, k
        assert h(p2[k]).tobytes() == h(v).tobytes(), k  # bit-exact
    bias = [k for k in p2 if k.endswith("e_score_correction_bias")]
    assert bias and all(h(p2[k]).dtype == np.float32 for k in bias)
    assert any(np.any(h(p2[k]) != 0) for k in bias)
    # a second save of the loaded checkpoint writes identical bytes
    save_checkpoint(tmp_path / "ck2", cfg2, p2)
    assert (tmp_path / "ck2" / "model.safetensors").read_bytes() == (path / "model.safetensors").read_bytes()
    assert not [p.name for p in path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_round_trip_same_outputs(tmp_path, tiny, backend):
    path, params = _save(tmp_path, tiny, backend=backend.name)
    cfg2, p2 = load_checkpoint(path, backend=backend.name)
    tok = backend.asarray(np.random.default_rng(0).integers(0, tiny.vocab_size, size=(2, 6)), dtype="int64")
    a, _ = forward(params, tiny, tok, need_cache=False)
    b, _ = forward(p2, cfg2, tok, need_cache=False)
    assert float(a.losses["total"]) == float(b.losses["total"])


def test_layout_and_config(tmp_path, tiny):
    path, params = _save(tmp_path, tiny)
    on_disk = load_file(str(path / "model.safetensors"))
    L = tiny.num_hidden_layers
    # MTP module k at model.layers.{L+k-1} with its copies of embed_tokens and lm_head
    for k in (1, 2):
        pre = f"model.layers.{L + k - 1}."
        for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                     "self_attn.kv_b_proj.weight", "mlp.gate.e_score_correction_bias"):
            assert pre + name in on_disk
        np.testing.assert_array_equal(on_disk[pre + "embed_tokens.weight"], on_disk["model.embed_tokens.weight"])
        np.testing.assert_array_equal(on_disk[pre + "shared_head.head.weight"], on_disk["lm_head.weight"])
    assert on_disk[f"model.layers.{L}.eh_proj.weight"].shape == (tiny.hidden_size, 2 * tiny.hidden_size)
    assert set(on_disk) == set(param_shapes(tiny)) | set(copy_names(tiny))
    assert on_disk["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == np.float32
    assert on_disk["lm_head.weight"].dtype == np.float64
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"] and cfg["model_type"] == "deepseek_v3"
    assert cfg["num_key_value_heads"] == tiny.num_attention_heads
    assert cfg["torch_dtype"] == "float64" and cfg["tie_word_embeddings"] is False
    assert cfg["num_nextn_predict_layers"] == 2 and cfg["refmtp"]["mtp_chain"] == "post_norm"
    assert "architectures" not in tiny.extra  # the caller's config is not modified


def test_parallel_heads_store_only_blocks(tmp_path, tiny, backend):
    cfg = tiny.replace(refmtp={"mtp_kind": "parallel"})
    path, params = _save(tmp_path, cfg, backend=backend.name)
    on_disk = load_file(str(path / "model.safetensors"))
    pre = f"model.layers.{cfg.num_hidden_layers}."
    assert pre + "self_attn.o_proj.weight" in on_disk
    assert not any(pre + n in on_disk for n in ("enorm.weight", "eh_proj.weight", "embed_tokens.weight",
                                                "shared_head.head.weight"))
    _, p2 = load_checkpoint(path, backend=backend.name)
    h = backend.to_numpy
    assert all(h(p2[k]).tobytes() == h(v).tobytes() for k, v in params.items())


def test_load_converts_dtype_but_keeps_bias_float32(tmp_path, tiny, backend):
    path, params = _save(tmp_path, tiny)  # saved from numpy, loaded onto each backend
    _, p32 = load_checkpoint(path, backend=backend.name, dtype="float32")
    h = backend.to_numpy
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert h(p32["lm_head.weight"]).dtype == np.float32
    assert h(p32[bias]).dtype == np.float32
    np.testing.assert_array_equal(h(p32["lm_head.weight"]), params["lm_head.weight"].astype(np.float32))
    np.testing.assert_array_equal(h(p32[bias]), params[bias])  # the float32 bias is not re-rounded
    _, p64 = load_checkpoint(path, backend=backend.name)  # dtype None: the stored float64
    assert h(p64["lm_head.weight"]).dtype == np.float64 and h(p64[bias]).dtype == np.float32


def _one_line(exc):
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_missing_extra_shape_dtype_are_named(tmp_path, tiny):
    path, _ = _save(tmp_path, tiny)

    def damage(t):
        del t["model.layers.0.self_attn.o_proj.weight"]
        t["model.layers.9.mlp.gate.weight"] = np.zeros((8, 16))
        t["model.norm.weight"] = np.ones((15,))
        t["model.layers.1.mlp.gate.e_score_correction_bias"] = t[
            "model.layers.1.mlp.gate.e_score_correction_bias"].astype(np.float64)
        t["lm_head.weight"] = t["lm_head.weight"].astype(np.float32)

    _tamper(path, damage)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    msg = _one_line(exc)
    assert "missing 1: model.layers.0.self_attn.o_proj.weight" in msg
    assert "unexpected 1: model.layers.9.mlp.gate.weight" in msg
    assert "model.norm.weight [15] expected [16]" in msg
    assert "model.layers.1.mlp.gate.e_score_correction_bias F64 expected F32" in msg
    assert "lm_head.weight F32 expected F64" in msg
    assert isinstance(exc.value, ValueError)


def test_tampered_copy_is_refused(tmp_path, tiny):
    path, _ = _save(tmp_path, tiny)

    def damage(t):
        t["model.layers.3.shared_head.head.weight"][0, 0] += 1e-3

    _tamper(path, damage)
    with pytest.raises(CheckpointError, match=r"model.layers.3.shared_head.head.weight must be an "
                                              r"exact copy of lm_head.weight \(max abs diff 0.001\)"):
        load_checkpoint(path)


def test_missing_copy_is_named(tmp_path, tiny):
    path, _ = _save(tmp_path, tiny)
    _tamper(path, lambda t: t.pop("model.layers.2.embed_tokens.weight"))
    with pytest.raises(CheckpointError, match="missing 1: model.layers.2.embed_tokens.weight"):
        load_checkpoint(path)


def test_config_mismatch_is_named(tmp_path, tiny):
    path, _ = _save(tmp_path, tiny)
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1  # the file still holds module 2
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unexpected \d+: model.layers.3."):
        load_checkpoint(path)


def test_refuses_pickles_and_garbage(tmp_path, tiny):
    d = tmp_path / "pickled"
    d.mkdir()
    tiny.save(d / "config.json")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_checkpoint(d)
    with pytest.raises(CheckpointError, match="pickle-format file"):
        load_checkpoint(d / "pytorch_model.bin")
    (d / "model.safetensors").write_bytes(b"\x80\x04garbage that is no safetensors header")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(d)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    tiny.save(empty / "config.json")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_checkpoint(empty)


def test_sharded_checkpoint_loads(tmp_path, tiny, backend):
    path, params = _save(tmp_path, tiny)
    tensors = load_file(str(path / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half],
              "model-00002-of-00002.safetensors": names[half:]}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(path / fname), metadata={"format": "pt"})
    (path / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    _, p2 = load_checkpoint(path, backend=backend.name)
    assert all(backend.to_numpy(p2[k]).tobytes() == v.tobytes() for k, v in params.items())


def test_save_refuses_wrong_bias_dtype_and_mixed_dtypes(tmp_path, tiny, backend):
    params = init_params(tiny, seed=0, backend=backend.name)
    xp = backend.xp
    bad = dict(params)
    bad["model.layers.1.mlp.gate.e_score_correction_bias"] = xp.astype(
        bad["model.layers.1.mlp.gate.e_score_correction_bias"], xp.float64)
    with pytest.raises(CheckpointError, match="must stay float32"):
        save_checkpoint(tmp_path / "a", tiny, bad)
    bad = dict(params)
    bad["lm_head.weight"] = xp.astype(bad["lm_head.weight"], xp.float32)
    with pytest.raises(CheckpointError, match="one dtype"):
        save_checkpoint(tmp_path / "b", tiny, bad)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing written


def test_init_is_seeded_sorted_and_documented(tiny, backend):
    """The same host draws on every backend: the values are bit-identical across backends."""
    def init(**kw):
        return {k: backend.to_numpy(v) for k, v in init_params(tiny, backend=backend.name, **kw).items()}

    a = init(seed=5)
    b = init(seed=5)
    c = init(seed=6)
    assert list(a) == sorted(a)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert any(a[k].tobytes() != c[k].tobytes() for k in a if a[k].ndim == 2)
    # the matrices are the draws of one host PCG64 stream in sorted-name order
    rng = np.random.Generator(np.random.PCG64(5))
    for name in sorted(a):
        if a[name].ndim == 2:
            np.testing.assert_array_equal(a[name], rng.standard_normal(a[name].shape) * 0.02)
        elif name.endswith("e_score_correction_bias"):
            assert a[name].dtype == np.float32 and not a[name].any()
        else:
            np.testing.assert_array_equal(a[name], np.ones(a[name].shape))
    # a non-zero bias is drawn after every matrix: the matrices do not change
    d = init(seed=5, bias_std=0.1)
    assert all(d[k].tobytes() == a[k].tobytes() for k in a if a[k].ndim == 2)
    biases = [k for k in d if k.endswith("e_score_correction_bias")]
    assert all(d[k].dtype == np.float32 and np.abs(d[k]).max() > 0 for k in biases)
    f32 = init(seed=5, dtype="float32")
    np.testing.assert_array_equal(f32["lm_head.weight"], a["lm_head.weight"].astype(np.float32))
    with pytest.raises(ValueError, match="float32 or float64"):
        init_params(tiny, backend=backend.name, dtype="float16")
