"""The audit's input: the model (preset, config or checkpoint, with its size checked up front),
the reference weights, one small batch and the model's forward on it (:class:`AuditContext`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open

from refmtp.backends import get_backend
from refmtp.checkpoint import load_checkpoint
from refmtp.config import ModelConfig
from refmtp.config import preset as get_preset
from refmtp.model import init_params
from refmtp.memory import check_memory, forward_bytes
from refmtp.params import param_count

AUDIT_B = 2  # sequences in the audit batch
AUDIT_T = 8  # main positions (the window has T+1 tokens)
AUDIT_STD = 0.3  # weight std of preset/config runs: attention and routing far from uniform
AUDIT_BIAS_STD = 0.1  # non-zero e_score_correction_bias that changes some selections
MAX_PARAMS = 50_000_000  # the audit runs the whole model in float64 on one small batch


@dataclass
class AuditContext:
    """Everything an auditor reads: config, parameters, reference weights, one input, the forward."""

    cfg: ModelConfig
    params: dict  # what the library runs on
    ref: dict  # host float64 reference weights (checkpoint file or pre-hook snapshot)
    bk: object
    tokens: object  # (B, T+1) int64 on the backend
    tok: np.ndarray  # the same on the host
    B: int
    T: int
    i: int  # chosen position
    b: int  # chosen batch row
    seed: int
    out: object = None  # ModelOutput
    cache: object = None  # ModelCache

    def h(self, a) -> np.ndarray:
        """Device array -> host float64 copy."""
        return np.array(self.bk.to_numpy(a), dtype=np.float64)

    def R(self, name) -> np.ndarray:
        """Reference weight ``name`` (host float64)."""
        return self.ref[name]

    @property
    def positions(self):
        """Positions 0..T-1 on the backend."""
        return self.bk.xp.arange(self.T, dtype=self.bk.xp.int64)


def _read_reference(ckpt: Path) -> dict:
    """Every tensor of the checkpoint's safetensors files, read directly (host float64)."""
    files = sorted(Path(ckpt).glob("*.safetensors"))
    if not files:
        raise ValueError(f"checkpoint {ckpt} has no .safetensors file")
    ref = {}
    for f in files:
        with safe_open(str(f), framework="numpy") as st:
            for name in st.keys():
                ref[name] = np.array(st.get_tensor(name), dtype=np.float64)
    return ref


def _n_params(cfg) -> int:
    """Parameter count of ``cfg`` (from the dimensions, nothing allocated or listed)."""
    return param_count(cfg)


def load_audit_model(*, preset=None, ckpt=None, config=None, seed=0, backend="numpy"):
    """-> (cfg, params, ref, source). Exactly one of preset / ckpt / config (default preset tiny).

    preset/config: ``init_params(cfg, seed, std=AUDIT_STD, bias_std=AUDIT_BIAS_STD)`` in float64 and a host
    snapshot as the reference; ckpt: ``load_checkpoint(dtype="float64")`` and the file itself.
    """
    given = [x for x in (preset, ckpt, config) if x is not None]
    if len(given) > 1:
        raise ValueError("give one of --preset, --ckpt or --config, not several")
    bk = get_backend(backend) if isinstance(backend, (str, type(None))) else backend
    if ckpt is not None:
        cfg, params = load_checkpoint(ckpt, backend=bk, dtype="float64")
        _check_size(cfg)
        return cfg, params, _read_reference(Path(ckpt)), f"checkpoint {ckpt}"
    if config is not None:
        cfg = ModelConfig.load(config)
        source = f"config {config}"
    else:
        name = preset or "tiny"
        cfg = get_preset(name)
        source = f"preset {name}"
    _check_size(cfg)
    params = init_params(cfg, seed=seed, backend=bk, dtype="float64", std=AUDIT_STD,
                         bias_std=AUDIT_BIAS_STD)
    ref = {k: np.array(bk.to_numpy(v), dtype=np.float64) for k, v in params.items()}
    return cfg, params, ref, source


def _check_size(cfg):
    """Refuse, up front, a model too large to run in float64 on the host."""
    n = _n_params(cfg)
    if n > MAX_PARAMS:
        raise ValueError(
            f"this config has {n:,} parameters; the audit runs the whole model in float64 on the "
            f"host (limit {MAX_PARAMS:,}): use --preset tiny or a smaller config"
        )
    check_memory(forward_bytes(cfg, AUDIT_B, AUDIT_T, "float64", gradients=True),
                 "auditing this model in float64", "use --preset tiny or a smaller config")


def moe_layers(cfg) -> list:
    """Indices of the MoE layers, main blocks then MTP blocks."""
    return [layer for layer in range(cfg.num_hidden_layers + cfg.D) if cfg.is_moe_layer(layer)]


def block_cache(ctx, layer):
    """The forward cache of block ``layer`` (an MTP module's block for layer >= L)."""
    L = ctx.cfg.num_hidden_layers
    if layer < L:
        return ctx.cache.blocks[layer]
    c = ctx.cache.mtp[layer - L]
    return c.block if ctx.cfg.refmtp.mtp_kind == "causal" else c
