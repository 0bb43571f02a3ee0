"""Seeded initialisation of the whole model.

    params = init_params(cfg, seed=0, backend="numpy", dtype="float64")

Initialisation (identical on every backend: all draws are host PCG64 through ``bk.rng(seed)``):

1. every 2-D matrix, in ``sorted(names)`` order (plain Python string order, so
   ``model.layers.10`` sorts before ``model.layers.2``), gets ``normal(0, std)`` with
   ``std = initializer_range`` (config ``extra["initializer_range"]``, default 0.02);
2. every RMSNorm weight (the 1-D tensors whose name ends in ``norm.weight``) is ones;
3. every ``mlp.gate.e_score_correction_bias`` is float32 zeros, or, when ``bias_std > 0``, a
   float32 ``normal(0, bias_std)`` drawn from the same generator AFTER all matrices (again in
   sorted order), so switching the bias on never changes a matrix.
"""
from __future__ import annotations

from refmtp.backends import get_backend
from refmtp.config import ModelConfig
from refmtp.params import kind, param_shapes

DEFAULT_INITIALIZER_RANGE = 0.02


def initializer_range(cfg: ModelConfig) -> float:
    return float(cfg.extra.get("initializer_range", DEFAULT_INITIALIZER_RANGE))


def init_params(cfg: ModelConfig, seed: int = 0, backend="numpy", dtype: str = "float64", *,
                std: float | None = None, bias_std: float = 0.0) -> dict:
    """Seeded parameters ``{checkpoint name: array}``; see the module docstring for the order.

    ``std`` overrides the config's initializer_range; ``bias_std > 0`` draws a non-zero float32
    ``e_score_correction_bias`` (golden files and tests need one). Every matrix and norm is
    ``dtype``; the bias is float32 whatever ``dtype`` is.
    """
    bk = get_backend(backend) if isinstance(backend, (str, type(None))) else backend
    bk.check_float_dtype(dtype)
    std = initializer_range(cfg) if std is None else float(std)
    if not std >= 0 or not bias_std >= 0:
        raise ValueError(f"init_params: std={std} and bias_std={bias_std} must be >= 0")
    rng = bk.rng(seed)
    shapes = param_shapes(cfg)
    params = {}
    for name in sorted(shapes):  # 1. matrices, sorted order
        shape = shapes[name]
        if kind(name) == "matrix":
            params[name] = rng.normal(shape, std=std, dtype=dtype)
        elif kind(name) == "norm":  # 2. RMSNorm weights
            params[name] = bk.xp.ones(shape, dtype=bk.dtype(dtype))
    for name in sorted(shapes):  # 3. balancing biases, float32, after every matrix
        if kind(name) == "bias":
            if bias_std > 0:
                params[name] = rng.normal(shapes[name], std=bias_std, dtype="float32")
            else:
                params[name] = bk.zeros(shapes[name], dtype="float32")
    return dict(sorted(params.items()))
