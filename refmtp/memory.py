"""Memory estimates of a config, checked against the memory the machine has, before any work.

    need = training_bytes(cfg, batch=16, seq_len=128, dtype="float32")
    check_memory(need, "training the small preset", "lower --batch-size or --seq-len")

Every command that allocates from user-given sizes (``train``, ``golden export``, ``audit``)
asks here first, so a config with a vocabulary of 1e12, a hidden size of 1e7 or 1e9 layers is
refused in milliseconds with the estimate, instead of ending in a MemoryError minutes later.
The estimates are deliberately on the low side (the larger terms only): a refusal means the job
certainly does not fit; passing the check does not promise it fits.

Available memory is ``MemAvailable`` of ``/proc/meminfo`` (Linux), else
``os.sysconf("SC_AVPHYS_PAGES") * SC_PAGE_SIZE``; where neither exists nothing is refused.
``REFMTP_MEMORY_LIMIT`` (bytes) replaces it (tests, or a share of a larger machine).
"""
from __future__ import annotations

import os

from refmtp.config import ModelConfig
from refmtp.params import param_count

ITEMSIZE = {"float32": 4, "float64": 8}


def available_bytes() -> int | None:
    """Memory this process may still use: MemAvailable, else free physical pages, else None."""
    limit = os.environ.get("REFMTP_MEMORY_LIMIT")
    if limit:
        try:
            return int(float(limit))
        except ValueError:
            raise ValueError(f"REFMTP_MEMORY_LIMIT={limit!r} must be a number of bytes") from None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def activation_bytes(cfg: ModelConfig, batch: int, seq_len: int, dtype: str,
                     backward: bool = True) -> int:
    """The largest activations of one forward (and backward) on ``batch`` x ``seq_len`` tokens:
    per block the attention scores and probabilities (B, H, T, T), the hidden states and the
    expert inputs; the logits and their softmax (B, T, V) of the main head and each MTP depth."""
    size = ITEMSIZE.get(dtype, 8)
    B, T, H = batch, seq_len, cfg.num_attention_heads
    blocks = cfg.num_hidden_layers + cfg.D
    per_block = 2 * B * H * T * T + 4 * B * T * cfg.hidden_size
    per_block += B * T * H * (cfg.qk_head_dim + cfg.v_head_dim)
    heads = 2 * B * T * cfg.vocab_size * (cfg.D + 1)
    n = per_block * (blocks if backward else 1) + heads
    return n * size


def training_bytes(cfg: ModelConfig, batch: int, seq_len: int, dtype: str) -> int:
    """Parameters, their gradients, AdamW's two moments and the new values of an update (5 x the
    parameters), plus the activations of one step (kept for the backward)."""
    return 5 * param_count(cfg) * ITEMSIZE.get(dtype, 8) + activation_bytes(cfg, batch, seq_len, dtype)


def forward_bytes(cfg: ModelConfig, batch: int, seq_len: int, dtype: str,
                  gradients: bool = False) -> int:
    """Parameters (and with ``gradients`` their gradients) plus the activations of one forward."""
    weights = (2 if gradients else 1) * param_count(cfg) * ITEMSIZE.get(dtype, 8)
    return weights + activation_bytes(cfg, batch, seq_len, dtype, backward=gradients)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def check_memory(need: int, what: str, fix: str) -> None:
    """Raise a one-line ValueError when ``need`` bytes exceed the available memory."""
    have = available_bytes()
    if have is not None and need > have:
        raise ValueError(
            f"{what} needs at least {fmt_bytes(need)} of memory (estimated from the config "
            f"before allocating anything), {fmt_bytes(have)} is available: {fix}"
        )


__all__ = ["available_bytes", "activation_bytes", "training_bytes", "forward_bytes",
           "check_memory", "fmt_bytes"]
