"""HF-compatible checkpoints: a directory with ``config.json`` and ``model.safetensors``.

    save_checkpoint("ckpt/", cfg, params)
    cfg, params = load_checkpoint("ckpt/", backend="numpy", dtype=None)   # None: the stored dtype

Layout (docs/deepseek-v3.md §4.7 and §5.2), every name a DeepSeek-V3 hub name:

* ``config.json``: ``cfg.to_dict()`` (refmtp's own settings under ``"refmtp"``) plus the fields
  HF ``DeepseekV3ForCausalLM.from_pretrained`` needs, added when absent (:data:`HF_DEFAULTS`:
  ``architectures``, ``model_type``, ``num_key_value_heads``, ...); ``torch_dtype`` always names
  the dtype actually stored. They live in ``cfg.extra``, which ``load_checkpoint`` returns.
* ``model.safetensors``: every parameter once, plus for each causal MTP module k (1-based) at
  ``model.layers.{L+k-1}.`` the copies ``embed_tokens.weight`` (= ``model.embed_tokens.weight``)
  and ``shared_head.head.weight`` (= ``lm_head.weight``) that the released checkpoint carries.
  Parallel heads (mtp_kind "parallel") store only their block there, no copies.
* Every matrix and norm has one float dtype (float32 or float64); every
  ``mlp.gate.e_score_correction_bias`` is float32 on disk and in memory.

Writes go to a temporary name in the same directory, then ``os.replace`` (atomic on POSIX), so
a crash never leaves a half-written checkpoint under the real name.

Loading checks config, names, shapes and dtypes against the config and raises one-line
:class:`CheckpointError` listing exactly what is missing, unexpected or wrong; it checks that
the copies equal the shared tensors bit for bit and drops them. Only safetensors are read:
pickled files (``*.bin``, ``*.pt``, ...) are refused, never unpickled. Sharded checkpoints
(``model.safetensors.index.json``) are read too. Host-side file I/O: numpy is used here only on
host copies (``bk.to_numpy``).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from refmtp.backends import get_backend
from refmtp.config import ModelConfig
from refmtp.params import check_params, copy_names, is_bias, param_shapes

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npz", ".npy")
ST_DTYPES = {"float32": "F32", "float64": "F64"}  # numpy name -> safetensors header name

# Fields a HF from_pretrained needs or reads, added to cfg.extra when absent.
HF_DEFAULTS = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "rope_interleave": True,
    "initializer_range": 0.02,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "use_cache": True,
}


# What fixes the meaning of the token ids besides vocab_size: the special-token ids of config.json
# and, for checkpoints that carry one, the tokenizer's files (refmtp's own tokens are bytes).
SPECIAL_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit its config (one-line message)."""


def _short(names, limit=5) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" ... (+{len(names) - limit} more)" if len(names) > limit else "")


def hf_config(cfg: ModelConfig, dtype: str) -> ModelConfig:
    """A copy of ``cfg`` whose ``extra`` has every HF field of :data:`HF_DEFAULTS` (when absent),
    ``num_key_value_heads`` and ``torch_dtype`` = the stored dtype."""
    extra = dict(cfg.extra)
    for key, value in HF_DEFAULTS.items():
        extra.setdefault(key, value)
    extra.setdefault("num_key_value_heads", cfg.num_attention_heads)
    extra["torch_dtype"] = dtype
    if "dtype" in extra:
        extra["dtype"] = dtype
    return cfg.replace(extra=extra)


def _param_dtype(params: dict) -> str:
    dtypes = {}
    for name, a in params.items():
        dt = np.dtype(str(a.dtype)).name
        if is_bias(name):
            if dt != "float32":
                raise CheckpointError(
                    f"{name} is {dt}; e_score_correction_bias must stay float32 (docs/deepseek-v3.md §3.4)"
                )
            continue
        dtypes.setdefault(dt, []).append(name)
    if len(dtypes) != 1 or next(iter(dtypes)) not in ST_DTYPES:
        found = {dt: _short(names, 2) for dt, names in dtypes.items()}
        raise CheckpointError(
            f"parameters must share one dtype, float32 or float64; found {found}"
        )
    return next(iter(dtypes))


def _atomic_write(target: Path, write) -> None:
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(path, cfg: ModelConfig, params: dict) -> None:
    """Write ``config.json`` and ``model.safetensors`` (hub names, MTP copies) into ``path``."""
    from safetensors.numpy import save_file

    dtype = _param_dtype(params)  # CheckpointError for a float64 bias or mixed dtypes
    check_params(params, cfg)
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} is a file: save_checkpoint writes a directory")
    path.mkdir(parents=True, exist_ok=True)
    if (path / INDEX_FILE).exists():
        raise CheckpointError(
            f"{path} holds a sharded checkpoint ({INDEX_FILE}); save into an empty directory"
        )
    host_bk = get_backend("numpy")  # its asarray copies cupy arrays to the host (.get())
    tensors = {name: np.ascontiguousarray(host_bk.asarray(a)) for name, a in params.items()}
    for copy, shared in copy_names(cfg).items():
        tensors[copy] = tensors[shared].copy()  # the released layout duplicates these
    out_cfg = hf_config(cfg, dtype)
    _atomic_write(path / WEIGHTS_FILE,
                  lambda p: save_file(dict(sorted(tensors.items())), str(p), metadata={"format": "pt"}))
    text = json.dumps(out_cfg.to_dict(), indent=2) + "\n"
    _atomic_write(path / CONFIG_FILE, lambda p: p.write_text(text))


def tokenizer_metadata(cfg: ModelConfig, path=None) -> dict:
    """The tokenizer facts two models must share to exchange token ids (a draft model and its
    target): ``vocab_size``, the special-token ids of config.json (None when absent) and
    ``tokenizer``: the sha256 of each tokenizer file in the checkpoint directory ``path``, or
    "bytes" when there is none (refmtp's byte-level tokens; docs/inference.md)."""
    meta = {"vocab_size": cfg.vocab_size}
    for name in SPECIAL_TOKEN_FIELDS:
        meta[name] = cfg.extra.get(name)
    files = {}
    for name in TOKENIZER_FILES if path is not None else ():
        f = Path(path) / name
        if f.is_file():
            files[name] = hashlib.sha256(f.read_bytes()).hexdigest()
    meta["tokenizer"] = files or "bytes"
    return meta


# -------------------------------------------------------------------------------------------
# loading
# -------------------------------------------------------------------------------------------
def _weight_files(path: Path) -> dict[str, Path]:
    """{tensor name: safetensors file} of a checkpoint directory (single file or sharded)."""
    single, index = path / WEIGHTS_FILE, path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from None
        files = {}
        for name, fname in weight_map.items():
            f = path / fname
            if not str(fname).endswith(".safetensors") or f.parent != path:
                raise CheckpointError(
                    f"{index} maps {name} to {fname!r}: only .safetensors files in {path} are read"
                )
            files[name] = f
        return files
    if single.exists():
        return {None: single}
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{path} has only {_short(pickles, 3)}: refmtp reads safetensors only and never "
            "unpickles; convert the weights to model.safetensors"
        )
    raise CheckpointError(f"{path} has no {WEIGHTS_FILE}: not a refmtp/HF checkpoint directory")


def _read_header(files: dict) -> dict[str, tuple]:
    """{name: (shape, safetensors dtype, file)} without loading any tensor."""
    from safetensors import safe_open

    header = {}
    for f in sorted(set(files.values())):
        try:
            with safe_open(str(f), framework="numpy") as st:
                for name in st.keys():
                    sl = st.get_slice(name)
                    header[name] = (tuple(sl.get_shape()), sl.get_dtype(), f)
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise CheckpointError(
                f"{f} is not a readable safetensors file ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})"
            ) from None
    if None not in files:
        unmapped = sorted(n for n in header if n not in files)
        missing_in_files = sorted(n for n in files if n not in header)
        if unmapped or missing_in_files:
            raise CheckpointError(
                f"index and shards disagree: in shards but not in the index: {_short(unmapped)}; "
                f"in the index but not in the shards: {_short(missing_in_files)}"
            )
    return header


def _validate(cfg: ModelConfig, header: dict, where: Path) -> str:
    """Check names, shapes and dtypes; returns the stored float dtype ("float32"/"float64")."""
    expected = dict(param_shapes(cfg))
    copies = copy_names(cfg)
    for copy, shared in copies.items():
        expected[copy] = expected[shared]
    missing = sorted(set(expected) - set(header))
    extra = sorted(set(header) - set(expected))
    bad_shape = [f"{n} {list(header[n][0])} expected {list(expected[n])}"
                 for n in sorted(set(expected) & set(header)) if header[n][0] != tuple(expected[n])]
    # one float dtype for every matrix and norm (the most common one is taken as intended)
    counts = {}
    for n in sorted(set(expected) & set(header)):
        if not is_bias(n):
            counts[header[n][1]] = counts.get(header[n][1], 0) + 1
    stored = max(sorted(counts), key=lambda dt: counts[dt]) if counts else "F32"
    want = stored if stored in ST_DTYPES.values() else "F32 or F64"
    bad_dtype = []
    for n in sorted(set(expected) & set(header)):
        dt = header[n][1]
        need = "F32" if is_bias(n) else want
        if dt != need:
            bad_dtype.append(f"{n} {dt} expected {need}")
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {_short(missing)}")
    if extra:
        problems.append(f"unexpected {len(extra)}: {_short(extra)}")
    if bad_shape:
        problems.append(f"wrong shape: {_short(bad_shape, 3)}")
    if bad_dtype:
        problems.append(f"wrong dtype: {_short(bad_dtype, 3)}")
    if problems:
        raise CheckpointError(
            f"checkpoint {where} does not match its config.json: " + "; ".join(problems)
        )
    return {v: k for k, v in ST_DTYPES.items()}[stored]


def load_checkpoint(path, backend="numpy", dtype: str | None = None, only=None):
    """Read a checkpoint directory -> (cfg, params) on ``backend``.

    ``dtype`` None keeps the stored float dtype (bit-exact round trip); "float32"/"float64"
    converts every tensor except the biases, which stay float32. ``only(name)`` (None: every
    tensor) picks the parameters to read; the file is checked whole, the others are never
    loaded (an expert-parallel rank reads its own experts: refmtp.training.expert_parallel).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        if path.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(
                f"{path} is a pickle-format file: refmtp reads safetensors only and never unpickles"
            )
        raise CheckpointError(f"{path} is a file: pass the checkpoint directory (config.json + "
                              f"{WEIGHTS_FILE})")
    bk = get_backend(backend) if isinstance(backend, (str, type(None))) else backend
    if dtype is not None:
        bk.check_float_dtype(dtype)
    if not (path / CONFIG_FILE).exists():
        raise CheckpointError(f"{path} has no {CONFIG_FILE}")
    cfg = ModelConfig.load(path / CONFIG_FILE)
    files = _weight_files(path)
    header = _read_header(files)
    stored = _validate(cfg, header, path)
    target = stored if dtype is None else dtype

    host = {}
    copies = copy_names(cfg)
    for f in sorted(set(files.values())):
        with safe_open(str(f), framework="numpy") as st:
            for name in st.keys():
                if only is None or only(copies.get(name, name)):
                    host[name] = st.get_tensor(name)
    for copy, shared in copies.items():
        if copy not in host:
            continue
        a, b = host.pop(copy), host[shared]
        if a.tobytes() != b.tobytes():
            diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
            raise CheckpointError(
                f"checkpoint {path}: {copy} must be an exact copy of {shared} (max abs diff "
                f"{diff:.3g}); MTP modules share the embedding and lm_head"
            )
    params = {}
    for name in sorted(host):
        params[name] = bk.asarray(host[name], dtype="float32" if is_bias(name) else target)
    return cfg, params
