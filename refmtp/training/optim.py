"""AdamW with decoupled weight decay, warmup + cosine learning rate, global gradient clipping.

Everything is written by hand in the backend's array namespace (``bk.xp``); nothing here
imports numpy or cupy for computation. Derivation and a worked two-step example:
``docs/derivations/adamw.md``.

One update at step t (1-based; Loshchilov & Hutter, "Decoupled Weight Decay Regularization",
Algorithm 2, with the learning rate multiplying the decay as in PyTorch's ``AdamW``)::

    m_t = beta1 m_{t-1} + (1 - beta1) g_t
    v_t = beta2 v_{t-1} + (1 - beta2) g_t^2
    m^_t = m_t / (1 - beta1^t),   v^_t = v_t / (1 - beta2^t)
    p_t = p_{t-1} (1 - lr_t wd) - lr_t m^_t / (sqrt(v^_t) + eps)

``wd`` is 0 for every RMSNorm weight (any name containing ``norm``) and every bias (names ending
in ``bias``), see :func:`decays`. ``gate.e_score_correction_bias`` has no gradient: the optimizer
never sees it; it moves only by the auxiliary-loss-free rule (``update_expert_bias``).

Optimizer state (``m``, ``v`` per tensor and the step count) round-trips through safetensors
(:func:`save_optimizer` / :func:`load_optimizer`), bit for bit.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

from refmtp.backends import backend_of, get_backend
from refmtp.mutation import on
from refmtp.params import decays

FORMAT = "refmtp-adamw"
FORMAT_VERSION = 1


# -------------------------------------------------------------------------------------------
# Learning-rate schedule
# -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CosineSchedule:
    """Linear warmup, then cosine decay from ``lr`` to ``min_lr_ratio * lr``.

    ``step`` is the 0-based index of the update being taken (the first update is step 0)::

        lr(s) = lr * (s + 1) / warmup_steps                        s < warmup_steps
        lr(s) = lr * (r + (1 - r) * (1 + cos(pi * q)) / 2)         warmup_steps <= s < decay_steps,
                q = (s - warmup_steps) / (decay_steps - warmup_steps)
        lr(s) = lr * r                                             s >= decay_steps

    with ``r = min_lr_ratio``. ``decay_steps`` is fixed when a run starts, so a run that is
    stopped and resumed (even with a larger ``--steps``) follows the same curve.
    """

    lr: float
    warmup_steps: int
    decay_steps: int
    min_lr_ratio: float = 0.1

    def __post_init__(self):
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"learning rate {self.lr!r} must be a finite number > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.warmup_steps < 0 or self.decay_steps < 1:
            raise ValueError(
                f"warmup_steps={self.warmup_steps} must be >= 0 and decay_steps="
                f"{self.decay_steps} >= 1"
            )
        if self.warmup_steps > self.decay_steps:
            raise ValueError(
                f"warmup_steps={self.warmup_steps} must be <= decay_steps={self.decay_steps}: "
                "lower --warmup-steps or raise --decay-steps"
            )

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + (0 if on("optim.warmup_from_zero") else 1)) / self.warmup_steps
        if step >= self.decay_steps:
            return self.lr * self.min_lr_ratio
        q = (step - self.warmup_steps) / (self.decay_steps - self.warmup_steps)
        r = self.min_lr_ratio
        return self.lr * (r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * q)))


# -------------------------------------------------------------------------------------------
# Gradient clipping
# -------------------------------------------------------------------------------------------
def sum_squares_ref(g):
    """``sum g^2`` of one tensor in float64 (a 0-d array): float32 squares are exact in float64.

    Kernel: ``sum_squares`` (backends/numba_adamw.py), one pass without the float64 copy.
    """
    xp = backend_of(g).xp
    g64 = xp.astype(g, xp.float64)
    return xp.sum(g64 * g64)


def global_grad_norm(grads: dict) -> float:
    """``||g|| = sqrt(sum over tensors of sum g^2)``, accumulated in float64 (a host float)."""
    total = None  # a device scalar: one host sync at the end, not one per tensor
    for name in sorted(grads):
        part = sum_squares(grads[name])
        total = part if total is None else total + part
    return math.sqrt(float(total)) if total is not None else 0.0


def sum_squares(g):
    """``sum g^2`` of one gradient in float64 (a 0-d array), the term of :func:`global_grad_norm`:
    the ``sum_squares`` kernel, else :func:`sum_squares_ref` (expert parallelism adds every
    rank's terms in the same sorted order)."""
    return (backend_of(g).kernel("sum_squares") or sum_squares_ref)(g)


def clip_scales(grads: dict, max_norm: float, norm: float | None = None) -> tuple[dict, float]:
    """The factor each gradient is multiplied by in global-norm clipping:
    ``min(1, max_norm / (||g|| + 1e-6))``, one Python float per name (all the same).

    Returns ``(scales, norm)`` with ``norm`` the norm BEFORE clipping. ``max_norm <= 0`` turns
    clipping off (every factor 1.0). AdamW applies the factors as it reads the gradients
    (``AdamW.step(..., grad_scales=)``), which is :func:`clip_grads` without the scaled copies.
    """
    if norm is None:
        norm = global_grad_norm(grads)
    if max_norm <= 0 or not norm > max_norm:
        return {name: 1.0 for name in grads}, norm
    if on("optim.clip_per_tensor"):
        return {name: min(1.0, max_norm / (global_grad_norm({name: g}) + 1e-6))
                for name, g in grads.items()}, norm
    scale = max_norm / (norm + 1e-6)  # Python float: float32 grads stay float32 (NEP 50)
    return {name: scale for name in grads}, norm


def clip_grads(grads: dict, max_norm: float, norm: float | None = None) -> tuple[dict, float]:
    """Every gradient times its :func:`clip_scales` factor (global-norm clipping).

    Returns ``(grads, norm)`` with ``norm`` the norm BEFORE clipping. The input dict and its
    arrays are not modified; without clipping the arrays are returned as they are.
    """
    scales, norm = clip_scales(grads, max_norm, norm)
    if max_norm <= 0 or not norm > max_norm:
        return dict(grads), norm
    return {name: g * scales[name] for name, g in grads.items()}, norm


def first_nonfinite(grads: dict) -> str | None:
    """Name of the first gradient (sorted order) holding a NaN or infinity, or None."""
    for name in sorted(grads):
        g = grads[name]
        xp = backend_of(g).xp
        if not bool(xp.all(xp.isfinite(g))):
            return name
    return None


# -------------------------------------------------------------------------------------------
# AdamW
# -------------------------------------------------------------------------------------------
def adamw_update_ref(p, g, m, v, lr: float, wd: float, beta1: float, beta2: float, eps: float,
                     bc1: float, bc2: float, gscale: float = 1.0):
    """One AdamW update of one tensor -> (new p, new m, new v); the inputs are not modified.

    The host floats act in the array dtype (NEP 50), bias corrections ``bc1 = 1 - beta1^t``,
    ``bc2 = 1 - beta2^t``; ``gscale`` is the clipping factor of :func:`clip_scales` (the
    gradient used is ``g * gscale``, the array :func:`clip_grads` would return):

        m' = beta1 m + (1 - beta1) g,   v' = beta2 v + (1 - beta2) g^2
        p' = p (1 - lr wd) - lr (m'/bc1) / (sqrt(v'/bc2) + eps)

    Kernel: ``adamw_update`` (backends/numba_adamw.py).
    """
    xp = backend_of(p, g, m, v).xp
    if gscale != 1.0:
        g = g * gscale  # clipped gradient
    m = beta1 * m + (1.0 - beta1) * g  # first moment
    v = beta2 * v + (1.0 - beta2) * (g * g)  # second moment
    m_hat = m / bc1
    v_hat = v / bc2
    return p * (1.0 - lr * wd) - lr * (m_hat / (xp.sqrt(v_hat) + eps)), m, v



@dataclass(frozen=True)
class AdamWSettings:
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1

    def __post_init__(self):
        for name in ("beta1", "beta2"):
            b = getattr(self, name)
            if not 0 <= b < 1:
                raise ValueError(f"AdamW {name}={b} must be in [0, 1)")
        if not self.eps > 0:
            raise ValueError(f"AdamW eps={self.eps} must be > 0")
        if not self.weight_decay >= 0:
            raise ValueError(f"AdamW weight_decay={self.weight_decay} must be >= 0")


class AdamW:
    """AdamW over a flat parameter dict. State: ``m[name]``, ``v[name]`` (param dtype), ``step``.

    ``opt.step(params, grads, lr)`` replaces ``params[name]`` by the updated array for every
    ``name`` in ``grads`` (parameters without a gradient, such as the expert bias, are left
    alone). All new arrays are computed before any entry of ``params`` is replaced.
    """

    def __init__(self, settings: AdamWSettings | None = None):
        self.settings = settings or AdamWSettings()
        self.m: dict = {}
        self.v: dict = {}
        self.step_count = 0  # number of updates taken so far (t of the last update)

    def step(self, params: dict, grads: dict, lr: float, grad_scales: dict | None = None) -> None:
        """One update with ``grads[name] * grad_scales[name]`` (the clipping factors of
        :func:`clip_scales`; all 1.0 when None)."""
        s = self.settings
        t = self.step_count + 1
        bc1 = 1.0 - s.beta1 ** t  # bias corrections, host floats
        bc2 = 1.0 - s.beta2 ** t
        if on("optim.no_bias_correction"):
            bc1 = bc2 = 1.0
        new_p, new_m, new_v = {}, {}, {}
        for name in sorted(grads):
            if name not in params:
                raise ValueError(f"AdamW: gradient {name!r} has no parameter of that name")
            p, g = params[name], grads[name]
            if g.shape != p.shape or g.dtype != p.dtype:
                raise ValueError(
                    f"AdamW: gradient {name!r} is {tuple(g.shape)} {g.dtype}, parameter is "
                    f"{tuple(p.shape)} {p.dtype}"
                )
            xp = backend_of(p, g).xp
            m = self.m.get(name)
            v = self.v.get(name)
            if m is None:
                m, v = xp.zeros_like(p), xp.zeros_like(p)
            wd = s.weight_decay if decays(name) else 0.0
            gscale = 1.0 if grad_scales is None else grad_scales[name]
            if on("optim.coupled_decay"):
                g, wd, gscale = (g * gscale if gscale != 1.0 else g) + wd * p, 0.0, 1.0
            update = backend_of(p).kernel("adamw_update") or adamw_update_ref
            new_p[name], new_m[name], new_v[name] = update(p, g, m, v, lr, wd, s.beta1, s.beta2, s.eps,
                                                           bc1, bc2, gscale)
        # commit: nothing above touched params or the state
        params.update(new_p)
        self.m.update(new_m)
        self.v.update(new_v)
        self.step_count = t

    # -- serialisation ------------------------------------------------------------------------
    def state_tensors(self) -> dict:
        """``{"m.<name>": host array, "v.<name>": host array}`` for safetensors."""
        import numpy as np  # host bookkeeping: safetensors wants contiguous numpy arrays

        out = {}
        for name in sorted(self.m):
            bk = backend_of(self.m[name])
            out[f"m.{name}"] = np.ascontiguousarray(bk.to_numpy(self.m[name]))
            out[f"v.{name}"] = np.ascontiguousarray(bk.to_numpy(self.v[name]))
        return out

    def metadata(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "step": str(self.step_count),
            "settings": json.dumps(asdict(self.settings), sort_keys=True),
        }


def save_optimizer(path, opt: AdamW) -> None:
    """Write ``m``, ``v`` and the step count of ``opt`` to one safetensors file (no pickle).

    The same state gives the same bytes: safetensors writes the metadata entries in a
    per-process hash order, so they are put in sorted order afterwards (:func:`_sort_metadata`)."""
    from safetensors.numpy import save_file

    save_file(opt.state_tensors(), str(path), metadata=opt.metadata())
    _sort_metadata(path)


def _sort_metadata(path) -> None:
    """Rewrite the ``__metadata__`` object of a safetensors header in sorted key order.

    The header (8-byte little-endian length, then compact JSON) keeps its length: only the order
    of the entries changes, every other byte of the file stays."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        text = raw.rstrip(b" ").decode("utf-8")
        header = json.loads(text, object_pairs_hook=dict)
        meta = header.get("__metadata__")
        if not meta:
            return
        header["__metadata__"] = dict(sorted(meta.items()))
        new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(new) != len(text.encode("utf-8")):  # never expected: leave the file as written
            return
        f.seek(8)
        f.write(new)


def load_optimizer(path, params: dict, backend=None, only=None) -> AdamW:
    """Read an optimizer written by :func:`save_optimizer`; its tensors must match ``params``.

    Each moment is moved to ``backend`` (default: the parameters' backend) with the dtype of
    its parameter. Raises ValueError naming the first missing, extra or mismatched entry.
    ``only(name)`` (None: all) picks the parameters whose moments are read (an expert-parallel
    rank's own, refmtp.training.expert_parallel); the others are never loaded.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()
                       if only is None or not k.startswith(("m.", "v.")) or only(k[2:])}
    except Exception as exc:  # OSError, or safetensors' own SafetensorError on a bad header
        raise ValueError(f"cannot read optimizer state {path}: {exc}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a refmtp AdamW state (format {meta.get('format')!r})")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise ValueError(
            f"{path} has optimizer format version {meta.get('format_version')}, this refmtp "
            f"reads {FORMAT_VERSION}"
        )
    bk = backend if backend is not None else backend_of(*params.values())
    if isinstance(bk, str):
        bk = get_backend(bk)
    opt = AdamW(AdamWSettings(**json.loads(meta["settings"])))
    opt.step_count = int(meta["step"])
    names = {k[2:] for k in tensors if k.startswith("m.")}
    for key in tensors:
        if not key.startswith(("m.", "v.")) or key[2:] not in names:
            raise ValueError(f"{path}: unexpected optimizer tensor {key!r}")
    for name in sorted(names):
        if name not in params:
            raise ValueError(f"{path}: optimizer state for {name!r}, which the model does not have")
        p = params[name]
        for kind in ("m", "v"):
            a = tensors.get(f"{kind}.{name}")
            if a is None:
                raise ValueError(f"{path}: missing optimizer tensor '{kind}.{name}'")
            if tuple(a.shape) != tuple(p.shape):
                raise ValueError(
                    f"{path}: '{kind}.{name}' has shape {tuple(a.shape)}, parameter has "
                    f"{tuple(p.shape)}"
                )
        dtype = str(p.dtype)
        opt.m[name] = bk.asarray(tensors[f"m.{name}"], dtype=dtype)
        opt.v[name] = bk.asarray(tensors[f"v.{name}"], dtype=dtype)
    if opt.step_count > 0 and not names:
        raise ValueError(f"{path}: step {opt.step_count} but no moment tensors")
    return opt
