"""The training loop: data -> forward -> backward -> clip -> AdamW -> expert-bias update.

    trainer = Trainer.new(TrainSettings(preset="tiny", steps=20), preset("tiny"), "runs/x")
    result = trainer.run()                       # TrainResult(status, step, checkpoint, ...)
    trainer = Trainer.resume("runs/x", {"steps": 40})
    trainer.run()

One step (``step`` counts completed updates, so the update taken now is number ``step + 1``)::

    tokens = sampler.next(B)                                          # (B, T+1) int64, random windows
    train_step(params, cfg, tokens, opt, schedule(step), grad_clip)   # refmtp.training.step

A run directory holds ``run.json`` (settings, model config, data fingerprint), ``metrics.jsonl``
(one JSON object per logged step), ``latest`` (name of the newest checkpoint) and one
``checkpoint-NNNNNNN/`` directory: ``config.json`` + ``model.safetensors`` (HF layout, written by
:func:`refmtp.checkpoint.save_checkpoint`), ``optimizer.safetensors`` (AdamW m, v, step) and
``trainer_state.json`` (step, data-sampler PCG64 state, tokens seen). No pickle anywhere.

Checkpoints are written into ``ckpt.tmp/`` and renamed with ``os.replace``, so a crash never
leaves a half-written checkpoint under a final name (refmtp.training.rundir: the manifest, the
derived ``latest``, the lock). Ctrl-C (SIGINT) and SIGTERM are deferred to the end of the current
step, then a checkpoint is written and :meth:`Trainer.run` returns with status "interrupted"; a
second signal raises :class:`Aborted` at once. A non-finite loss term or gradient raises
:class:`NonFiniteError` naming the step and the term; nothing is saved, and no checkpoint is
ever written with a non-finite tensor, so the last good checkpoint stays the newest.

Resume is exact: ``--steps N`` in one go and ``k`` steps + resume to ``N`` give bit-identical
parameters on one backend and dtype (the lr schedule's horizon ``decay_steps`` is fixed when the
run starts; the optimizer moments, expert biases and sampler state are restored bit for bit).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
import uuid
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from refmtp import __version__
from refmtp.backends import get_backend, kernels_enabled
from refmtp.checkpoint import load_checkpoint, save_checkpoint
from refmtp.config import PASSTHROUGH_FIELDS, ConfigError, ModelConfig
from refmtp.memory import check_memory, training_bytes
from refmtp.params import param_count, routed_expert
from refmtp.model import forward, init_params
from refmtp.training.data import VOCAB_SIZE, WindowSampler, check_window, heldout_windows, load_corpus
from refmtp.training.optim import (AdamW, AdamWSettings, CosineSchedule, first_nonfinite,
                                   load_optimizer, save_optimizer)
from refmtp.training.rundir import (LOCK_FILE, RUN_FORMAT, RUN_FORMAT_VERSION, STATE_FILE,
                                   CheckpointWriteError, RunError, RunLock, checkpoint_step,
                                   latest_checkpoint, repair_latest, run_checkpoints,
                                   truncate_metrics, write_checkpoint, write_json_atomic)
from refmtp.training.distributed import SINGLE, World
from refmtp.training.expert_parallel import (REPLICATED_ENV, ExpertShard, held_params, serve_forward,
                                            sharded)
from refmtp.training.step import NonFinite, check_microbatches, side_by_side_workers, train_step

HASHED_FILES = ("model.safetensors", "optimizer.safetensors", "config.json")
STOP_SIGNALS = ("SIGINT", "SIGTERM")  # both: finish the step, save, exit 128 + signal number


class NonFiniteError(RuntimeError):
    """A loss term or gradient became NaN/inf; the message names the step and the term."""


class Aborted(KeyboardInterrupt):
    """A second SIGINT/SIGTERM: training stops at once, without saving (the last checkpoint
    stays valid). ``signum`` is the signal."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@dataclass
class TrainSettings:
    """Everything that defines a training run besides the model config."""

    preset: str | None = "small"  # preset name, or None with a --config file
    config_file: str | None = None  # the --config path (informational)
    data: str | None = None  # None: the Python standard library source
    steps: int = 1500  # total number of updates (also with resume)
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to min_lr_ratio * lr
    warmup_steps: int | None = None  # None -> min(100, decay_steps // 10) when the run starts
    decay_steps: int | None = None  # cosine horizon; None -> steps when the run starts
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global gradient-norm clip (<= 0: off)
    seed: int = 0  # init_params(seed); data windows use seed + 1
    backend: str = "numpy"
    dtype: str = "float32"
    eval_every: int = 250  # held-out evaluation every N steps (0: only at the end)
    eval_batches: int = 4  # held-out windows = eval_batches * batch_size
    log_every: int = 10  # one metrics.jsonl line every N steps
    checkpoint_every: int = 250  # checkpoint every N steps (0: only at the end / on Ctrl-C)
    microbatches: int = 1  # slices of each batch = MPI ranks x --grad-accum (docs/distributed.md)
    expert_parallel: int = 1  # ranks the routed experts are sharded over (1: none)

    # settings that may change when a run is resumed; every other one must match
    RESUMABLE = ("steps", "backend", "eval_every", "eval_batches", "log_every",
                 "checkpoint_every")

    def validate(self) -> "TrainSettings":
        for name in ("steps", "batch_size", "seq_len", "eval_batches", "log_every", "microbatches",
                     "expert_parallel"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be an integer >= 1")
        for name in ("eval_every", "checkpoint_every", "warmup_steps", "seed"):
            v = getattr(self, name)
            if v is None and name == "warmup_steps":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}={v!r} must be an integer >= 0")
        if self.decay_steps is not None and (not isinstance(self.decay_steps, int)
                                             or self.decay_steps < 1):
            raise ValueError(f"decay_steps={self.decay_steps!r} must be an integer >= 1")
        if self.data is not None and not isinstance(self.data, str):
            raise ValueError(f"data={self.data!r} must be a path or null")
        if self.backend not in ("numpy", "cupy"):
            raise ValueError(f"backend={self.backend!r}: choose numpy or cupy")
        for name in ("lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "eps", "grad_clip"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{name}={v!r} must be a number")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype {self.dtype!r} is not supported: choose float32 or float64")
        if not (isinstance(self.grad_clip, (int, float)) and math.isfinite(self.grad_clip)):
            raise ValueError(f"grad_clip={self.grad_clip!r} must be a finite number")
        check_microbatches(self.batch_size, self.microbatches, "microbatches (ranks x --grad-accum)")
        self.schedule()  # lr, warmup, decay, min ratio
        AdamWSettings(self.beta1, self.beta2, self.eps, self.weight_decay)
        return self

    def schedule(self) -> CosineSchedule:
        decay = self.decay_steps if self.decay_steps is not None else self.steps
        warmup = self.warmup_steps if self.warmup_steps is not None else min(100, decay // 10)
        return CosineSchedule(lr=self.lr, warmup_steps=warmup, decay_steps=decay,
                              min_lr_ratio=self.min_lr_ratio)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainSettings":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise RunError(f"run.json has unknown training settings {sorted(unknown)}")
        try:
            return cls(**d).validate()
        except (ValueError, TypeError) as exc:
            raise RunError(f"run.json has invalid training settings: {exc}") from None


@dataclass
class TrainResult:
    status: str  # "done" | "interrupted"
    step: int  # completed updates
    checkpoint: Path | None  # newest checkpoint directory
    out_dir: Path
    last: dict = field(default_factory=dict)  # the last metrics record
    last_eval: dict | None = None  # {"loss": {...}, "acc": {...}} of the last evaluation
    tokens_per_s: float = 0.0  # training throughput over this invocation
    elapsed_s: float = 0.0  # wall time of this invocation
    signum: int | None = None  # the signal that interrupted the run (SIGINT, SIGTERM)


def byte_level_config(cfg: ModelConfig) -> tuple[ModelConfig, list[str]]:
    """Training data are bytes: raise vocab_size to 256 when it is smaller (said, not silent)."""
    if cfg.vocab_size >= VOCAB_SIZE:
        return cfg, []
    return (cfg.replace(vocab_size=VOCAB_SIZE),
            [f"vocab_size {cfg.vocab_size} -> {VOCAB_SIZE} (byte-level tokens)"])


def count_params(params: dict) -> int:
    return int(sum(math.prod(a.shape) for a in params.values()))


def _model_fields(cfg: ModelConfig) -> dict:
    """The config fields that define the model (passthrough HF fields do not)."""
    return {k: v for k, v in cfg.to_dict().items() if k not in PASSTHROUGH_FIELDS}


def _first_difference(a: dict, b: dict, prefix="") -> str | None:
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if isinstance(va, dict) and isinstance(vb, dict):
            d = _first_difference(va, vb, f"{prefix}{key}.")
            if d:
                return d
        elif va != vb:
            return f"{prefix}{key}: run has {vb!r}, requested {va!r}"
    return None


@contextmanager
def _deferred_signals(trainer: "Trainer"):
    """While training, Ctrl-C (SIGINT) or SIGTERM (how SLURM and Kubernetes stop a job) asks the
    loop to stop after the current step (then it saves).

    A second signal outside the commit of an update raises :class:`Aborted` at once, also during
    the final save (whose atomic rename leaves the previous checkpoint valid).
    Only the main thread can own signal handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if trainer.stop_requested and not trainer._committing:
            raise Aborted(signum)
        trainer.stop_requested = True
        trainer.stop_signal = signum

    numbers = [getattr(signal, name) for name in STOP_SIGNALS if hasattr(signal, name)]
    previous = {n: signal.signal(n, handler) for n in numbers}
    try:
        yield
    finally:
        for n, h in previous.items():
            signal.signal(n, h)


class Trainer:
    """A training run bound to an output directory. Build with :meth:`new` or :meth:`resume`."""

    def __init__(self, settings: TrainSettings, cfg: ModelConfig, out_dir: Path, corpus,
                 params: dict, opt: AdamW, sampler: WindowSampler, step: int, *,
                 overrides=(), tokens_seen: int = 0, elapsed_s: float = 0.0, resumed_from=None,
                 run_id: str | None = None, lock: RunLock | None = None, world: World = SINGLE):
        self.settings = settings
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.corpus = corpus
        self.params = params
        self.opt = opt
        self.sampler = sampler
        self.step = step
        self.overrides = list(overrides)
        self.tokens_seen = tokens_seen
        self.elapsed_s = elapsed_s  # training wall time summed over all invocations
        self.resumed_from = resumed_from
        self.run_id = run_id
        self.lock = lock if lock is not None else RunLock(self.out_dir)
        self.world = world  # rank 0 writes run.json, metrics, checkpoints; every rank computes
        self.grad_accum, self.shard = parallel_plan(settings, cfg, world)
        self.workers = 1  # microbatches side by side on threads (--workers; never changes a bit)
        self.backend = get_backend(settings.backend)
        self.schedule = settings.schedule()
        self.stop_requested = False
        self.stop_signal: int | None = None
        self._committing = False
        self._pending_data = None  # sampler state before the step in progress
        self._heldout = heldout_windows(corpus.heldout, settings.seq_len,
                                        settings.eval_batches * settings.batch_size)
        self.last_checkpoint: Path | None = None
        self.last_eval: dict | None = None

    # ---------------------------------------------------------------------------------------
    # construction
    # ---------------------------------------------------------------------------------------
    @classmethod
    def new(cls, settings: TrainSettings, cfg: ModelConfig, out_dir, *, corpus=None,
            overrides=(), world: World = SINGLE) -> "Trainer":
        """A fresh run writing into ``out_dir`` (which must not exist or be empty).

        Validates settings, config, memory, backend and data BEFORE creating anything on disk;
        then takes the run directory's lock (RunError naming the holder when another process
        has it).
        """

        settings = dataclasses.replace(settings)
        if settings.decay_steps is None:
            settings.decay_steps = settings.steps
        if settings.warmup_steps is None:
            settings.warmup_steps = min(100, settings.decay_steps // 10)
        settings.validate()
        cfg, more = byte_level_config(cfg.validate())
        overrides = list(overrides) + more
        _check_seq_len(settings, cfg)
        parallel_plan(settings, cfg, world)
        check_training_memory(settings, cfg)
        bk = get_backend(settings.backend)  # BackendUnavailable before any file is written
        out_dir = Path(out_dir)
        _check_empty(out_dir)
        if corpus is None:
            corpus = load_corpus(settings.data)
        check_window(corpus, settings.seq_len)
        params = init_params(cfg, seed=settings.seed, backend=settings.backend,
                             dtype=settings.dtype)
        opt = AdamW(AdamWSettings(settings.beta1, settings.beta2, settings.eps,
                                  settings.weight_decay))
        sampler = WindowSampler(corpus.train, settings.seq_len, settings.seed + 1, bk)
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(out_dir).acquire()
        try:
            _check_empty(out_dir, probe_lock=False)  # another process may have started meanwhile
            run_id = uuid.uuid4().hex
            run = {
                "format": RUN_FORMAT, "format_version": RUN_FORMAT_VERSION, "run_id": run_id,
                "refmtp": __version__, "python": sys.version.split()[0],
                "settings": settings.to_dict(), "model": cfg.to_dict(),
                "data": corpus.summary(), "overrides": overrides,
            }
            write_json_atomic(out_dir / "run.json", run)
        except BaseException:
            lock.release()
            raise
        return cls(settings, cfg, out_dir, corpus, params, opt, sampler, 0, overrides=overrides,
                   run_id=run_id, lock=lock, world=world)

    @classmethod
    def resume(cls, run_dir, requested: dict | None = None, cfg: ModelConfig | None = None,
               world: World = SINGLE) -> "Trainer":
        """Continue the run in ``run_dir`` from its newest checkpoint.

        ``requested`` holds the options the user gave (None = not given). Those in
        ``TrainSettings.RESUMABLE`` replace the stored ones; any other that differs from the
        stored value, or a ``cfg`` that differs from the run's model config, raises RunError
        and nothing is written. The checkpoint must belong to the run (run id, data fingerprint,
        seed, file hashes, a directory inside the run). A run that stopped before its first
        checkpoint starts again from step 0 (the same seeds: the same run).
        """

        run_dir = Path(run_dir)
        run_file = run_dir / "run.json"
        if not run_file.is_file():
            raise RunError(f"{run_dir} is not a refmtp run directory (no run.json)")
        run = _read_json_object(run_file, "run file")
        if run.get("format") != RUN_FORMAT or run.get("format_version") != RUN_FORMAT_VERSION:
            raise RunError(f"{run_file} is not a refmtp run file of version {RUN_FORMAT_VERSION}")
        for key, kind in (("settings", dict), ("model", dict), ("data", dict)):
            if not isinstance(run.get(key), kind):
                raise RunError(f"{run_file} is malformed: '{key}' must be an object; restore "
                               "the file or start a new run with --out")
        fingerprint = run["data"].get("fingerprint")
        run_id = run.get("run_id")
        overrides = run.get("overrides", [])
        if not isinstance(fingerprint, str) or not isinstance(run_id, (str, type(None))) or \
                not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise RunError(f"{run_file} is malformed: 'data.fingerprint' and 'run_id' must be "
                           "strings, 'overrides' a list of strings; restore it or start a new "
                           "run with --out")
        stored = TrainSettings.from_dict(run["settings"])
        settings = dataclasses.replace(stored)
        for key, value in (requested or {}).items():
            if value is None:
                continue
            if key in TrainSettings.RESUMABLE:
                setattr(settings, key, value)
            elif key not in run["settings"] and key not in TrainSettings.__dataclass_fields__:
                raise RunError(f"unknown training setting {key!r}")
            elif key == "microbatches" and value != stored.microbatches:
                raise RunError(
                    f"ranks x --grad-accum = {value} differs from the resumed run's "
                    f"{stored.microbatches} microbatches per step ({run_dir}): resume with ranks x "
                    f"--grad-accum = {stored.microbatches} (the same slices, the same bits)")
            elif _normalise(key, value) != _normalise(key, getattr(stored, key)):
                raise RunError(
                    f"--{key.replace('_', '-')} {value} differs from the resumed run's "
                    f"{getattr(stored, key)!r} ({run_dir}): drop the option to resume, or "
                    "start a new run with --out"
                )
        settings.validate()
        try:
            stored_cfg = ModelConfig.from_dict(run["model"])
        except (ConfigError, TypeError) as exc:
            raise RunError(f"{run_file} has an invalid model config: {exc}") from None
        if cfg is not None:
            cfg, _ = byte_level_config(cfg.validate())
            diff = _first_difference(_model_fields(cfg), _model_fields(stored_cfg))
            if diff:
                raise RunError(
                    f"the requested model config differs from the run in {run_dir} ({diff}): "
                    "drop --preset/--config to resume, or start a new run with --out"
                )
        _check_seq_len(settings, stored_cfg)
        _, shard = parallel_plan(settings, stored_cfg, world)
        check_training_memory(settings, stored_cfg)
        bk = get_backend(settings.backend)
        lock = RunLock(run_dir).acquire()
        try:
            return cls._resume_locked(run_dir, run, settings, stored, stored_cfg, bk, lock, world,
                                      None if shard is None else shard.held())
        except BaseException:
            lock.release()
            raise

    @classmethod
    def _resume_locked(cls, run_dir, run, settings, stored, stored_cfg, bk, lock,
                       world, only=None) -> "Trainer":
        """:meth:`resume` with the run directory locked; ``only(name)``: the parameters this
        rank holds (expert parallel: rank 0's experts; :meth:`distributed` reads the others')."""
        run_file = run_dir / "run.json"
        ckpt = latest_checkpoint(run_dir)
        corpus = load_corpus(settings.data)
        if corpus.fingerprint != run["data"]["fingerprint"]:
            raise RunError(
                f"the data ({corpus.source}) changed since the run started (fingerprint "
                f"{corpus.fingerprint[:12]} != {run['data']['fingerprint'][:12]}): resume "
                "with the same data (for the default corpus: the same Python version)"
            )
        check_window(corpus, settings.seq_len)
        sampler = WindowSampler(corpus.train, settings.seq_len, settings.seed + 1, bk)
        run_id = run.get("run_id")
        if ckpt is None:  # stopped before its first checkpoint: the same run from step 0
            if any((run_dir / n).exists() for n in run_checkpoints(run_dir)):
                raise RunError(f"{run_dir} has no complete checkpoint to resume from; start a "
                               "new run with --out")
            params = init_params(stored_cfg, seed=settings.seed, backend=settings.backend,
                                 dtype=settings.dtype)
            opt = AdamW(AdamWSettings(settings.beta1, settings.beta2, settings.eps,
                                      settings.weight_decay))
            truncate_metrics(run_dir / "metrics.jsonl", -1)
            _store_settings(run_file, run, settings, stored)
            return cls(settings, stored_cfg, run_dir, corpus, params, opt, sampler, 0,
                       overrides=run.get("overrides", []), run_id=run_id, lock=lock, world=world)
        if ckpt.resolve().parent != run_dir.resolve():
            raise RunError(f"checkpoint {ckpt} lies outside the run directory {run_dir}: "
                           "refusing to resume from it")
        state = _read_state(ckpt, run, settings)
        repair_latest(run_dir)
        try:
            ckpt_cfg, params = load_checkpoint(ckpt, backend=settings.backend,
                                               dtype=settings.dtype, only=only)
        except ConfigError as exc:
            raise RunError(f"{ckpt}: {exc}") from None
        diff = _first_difference(_model_fields(ckpt_cfg), _model_fields(stored_cfg))
        if diff:
            raise RunError(f"{ckpt}/config.json differs from {run_file} ({diff})")
        opt = load_optimizer(ckpt / "optimizer.safetensors", params, backend=settings.backend,
                             only=only)
        try:
            sampler.set_state(state["data"])
        except (KeyError, TypeError, ValueError) as exc:
            raise RunError(f"{ckpt / STATE_FILE} has an invalid sampler state ({exc})") from None
        step = state["step"]
        if opt.step_count != step:
            raise RunError(f"{ckpt}: optimizer is at step {opt.step_count}, trainer at {step}")
        truncate_metrics(run_dir / "metrics.jsonl", step)
        _store_settings(run_file, run, settings, stored)
        return cls(settings, stored_cfg, run_dir, corpus, params, opt, sampler, step,
                   overrides=run.get("overrides", []), tokens_seen=state["tokens_seen"],
                   elapsed_s=float(state["elapsed_s"]), resumed_from=ckpt, run_id=run_id,
                   lock=lock, world=world)

    @classmethod
    def distributed(cls, world: World, build) -> "Trainer":
        """The trainer of every rank: rank 0 runs ``build()`` (:meth:`new` or :meth:`resume` with
        ``world``, the only place that reads or writes the run directory) and sends the result to
        the other ranks, which hold the same parameters, optimizer state and sampler but write
        nothing; with the experts sharded each rank gets only the experts it owns
        (:meth:`_part`, one rank after the other). An error of ``build`` is raised on every rank
        (:class:`RunError` with rank 0's line)."""
        if world.size == 1:
            return build()
        if world.rank == 0:
            try:
                trainer = build()
            except Exception as exc:
                world.bcast(("error", str(exc).strip().splitlines()[0] if str(exc).strip()
                             else type(exc).__name__))
                raise
            t = trainer
            world.bcast(("ok", {
                "settings": t.settings, "cfg": t.cfg, "out_dir": str(t.out_dir), "corpus": t.corpus,
                "opt": (t.opt.settings, t.opt.step_count),
                "sampler": t.sampler.state(), "step": t.step, "overrides": t.overrides,
                "tokens_seen": t.tokens_seen, "elapsed_s": t.elapsed_s,
                "resumed_from": t.resumed_from, "run_id": t.run_id}))
            world.scatter(t._part, "sending every rank its parameters")
            if t.shard is not None:  # rank 0 keeps its own experts only
                holds = t.shard.held()
                t.params = {n: a for n, a in t.params.items() if holds(n)}
                t.opt.m = {n: a for n, a in t.opt.m.items() if holds(n)}
                t.opt.v = {n: a for n, a in t.opt.v.items() if holds(n)}
            return trainer
        kind, snap = world.bcast(None)
        if kind == "error":
            raise RunError(snap)
        host_params, m, v = world.scatter(None, "sending every rank its parameters")
        bk = get_backend(snap["settings"].backend)
        params = {n: bk.asarray(a, dtype=str(a.dtype)) for n, a in host_params.items()}
        opt_settings, opt_step = snap["opt"]
        opt = AdamW(opt_settings)
        opt.step_count = opt_step
        opt.m = {n: bk.asarray(a, dtype=str(a.dtype)) for n, a in m.items()}
        opt.v = {n: bk.asarray(a, dtype=str(a.dtype)) for n, a in v.items()}
        s = snap["settings"]
        sampler = WindowSampler(snap["corpus"].train, s.seq_len, s.seed + 1, bk)
        sampler.set_state(snap["sampler"])
        trainer = cls(s, snap["cfg"], Path(snap["out_dir"]), snap["corpus"], params, opt, sampler,
                      snap["step"], overrides=snap["overrides"], tokens_seen=snap["tokens_seen"],
                      elapsed_s=snap["elapsed_s"], resumed_from=snap["resumed_from"],
                      run_id=snap["run_id"], world=world)
        return trainer

    def _part(self, rank: int) -> tuple[dict, dict, dict]:
        """Rank 0, for rank ``rank``: (parameters, AdamW m, v) it holds, host arrays. A resumed
        run with sharded experts reads that rank's experts from the checkpoint (rank 0 loaded
        only its own)."""
        host = self.backend.to_numpy
        holds = (lambda n: True) if self.shard is None else self.shard.held(rank)
        parts = [{n: host(a) for n, a in d.items() if holds(n)}
                 for d in (self.params, self.opt.m, self.opt.v)]
        if self.shard is not None and not self.shard.replicated and self.resumed_from is not None:
            theirs = self.shard.experts_of(rank)

            def only(name):
                return routed_expert(name) in theirs
            _, experts = load_checkpoint(self.resumed_from, backend="numpy",
                                         dtype=self.settings.dtype, only=only)
            opt = load_optimizer(self.resumed_from / "optimizer.safetensors", experts,
                                 backend="numpy", only=only)
            for part, new in zip(parts, (experts, opt.m, opt.v)):
                part.update(new)
        return tuple(parts)

    # ---------------------------------------------------------------------------------------
    # description
    # ---------------------------------------------------------------------------------------
    @property
    def n_params(self) -> int:
        """Parameters of the whole model (an expert-parallel rank holds a part of them)."""
        return param_count(self.cfg)

    def describe(self) -> list[str]:
        """The resolved configuration, a few lines for the user."""
        s, c = self.settings, self.cfg
        name = s.preset or s.config_file or "config"
        n_moe = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
        lines = [
            f"model   {name}: {self.n_params:,} parameters; {c.num_hidden_layers} layers "
            f"({c.num_hidden_layers - n_moe} dense + {n_moe} MoE, {c.n_routed_experts} experts "
            f"top-{c.num_experts_per_tok}), D={c.D} MTP",
        ]
        fields = {k: v for k, v in c.to_dict().items() if k != "refmtp"}
        lines += _wrap("  ", [f"{k}={v}" for k, v in fields.items()])
        lines += _wrap("  ", [f"refmtp.{k}={v}" for k, v in c.to_dict()["refmtp"].items()])
        for o in self.overrides:
            lines.append(f"  override: {o}")
        sched = self.schedule
        lines.append(
            f"train   steps={s.steps} batch_size={s.batch_size} seq_len={s.seq_len} "
            f"({s.batch_size * s.seq_len} tokens/step) lr={s.lr:g} warmup={sched.warmup_steps} "
            f"cosine->{s.min_lr_ratio:g}x by step {sched.decay_steps}"
        )
        lines.append(
            f"        AdamW betas=({s.beta1:g}, {s.beta2:g}) eps={s.eps:g} "
            f"weight_decay={s.weight_decay:g} grad_clip={s.grad_clip:g} seed={s.seed} "
            f"bias_update_gamma={c.refmtp.bias_update_gamma:g}"
        )
        lines.append(f"        backend={s.backend} dtype={s.dtype} "
                     f"kernels={'on' if kernels_enabled() else 'off'} eval_every={s.eval_every} "
                     f"log_every={s.log_every} checkpoint_every={s.checkpoint_every}")
        lines.append(f"data    {self.corpus.description}")
        lines.append(f"        {self.corpus.train.size:,} training / {self.corpus.heldout.size:,} "
                     "held-out tokens (bytes)")
        if self.world.size > 1:
            lines.append(self._describe_ranks())
        if self.workers > 1:
            side = side_by_side_workers(self.workers, self.grad_accum, self.backend, self.shard is not None)
            lines.append(f"workers {side} of this process's {self.grad_accum} microbatch(es) "
                         f"side by side (--workers {self.workers}; the same bits as one at a time)")
        if self.resumed_from is not None:
            lines.append(f"resume  from {self.resumed_from} (step {self.step})")
        lines.append(f"out     {self.out_dir}")
        return lines

    def _describe_ranks(self) -> str:
        w, c = self.world, self.cfg
        line = f"mpi     {w.size} ranks x --grad-accum {self.grad_accum}"
        if self.shard is not None:
            rep, exp = held_params(c, self.shard, w.rank)
            b = 3 * (8 if self.settings.dtype == "float64" else 4)  # weights + AdamW m, v
            line += (f"; expert parallel, experts {'replicated' if self.shard.replicated else 'sharded'}: "
                     f"rank {w.rank} holds {rep + exp:,} of {self.n_params:,} parameters "
                     f"({exp:,} in {len(self.shard.experts) if not self.shard.replicated else c.n_routed_experts} "
                     f"of {c.n_routed_experts} experts per MoE layer), ~{b * (rep + exp) / 2**20:.2f} MiB "
                     "with the AdamW moments")
        return line + (f"; --rank-timeout {w.timeout:g} s" if w.timeout > 0 else "; no --rank-timeout")

    # ---------------------------------------------------------------------------------------
    # the loop
    # ---------------------------------------------------------------------------------------
    def run(self, on_step=None, on_log=None) -> TrainResult:
        """Train until ``settings.steps`` updates are done (or SIGINT / SIGTERM).

        ``on_step(step, record)`` is called after every update with the step's losses;
        ``on_log(record)`` with every record written to metrics.jsonl (and evaluations).
        Raises NonFiniteError (nothing saved) when a loss or gradient is not finite, and
        :class:`Aborted` on a second signal (nothing saved; the last checkpoint is valid).
        """
        s = self.settings
        t_start = time.perf_counter()
        step_time = 0.0
        tokens_before = self.tokens_seen
        last = {}
        window_time, window_tokens = 0.0, 0
        interrupted = False
        self._pending_data = None
        writes = self.world.writes
        if writes:
            self.lock.acquire()
        try:
            with _deferred_signals(self):
                try:
                    if self.step == 0 and s.eval_every > 0 and self.resumed_from is None:
                        evaluated = self._eval_record()  # every rank: the experts may be sharded
                        if writes:
                            self._log({"step": 0, "tokens": 0, **evaluated}, on_log)
                    while self.step < s.steps:
                        self.world.where = f"step {self.step + 1}"  # for a rank that gives up
                        if self.world.any(self.stop_requested):  # every rank stops at one step
                            interrupted = True
                            break
                        t0 = time.perf_counter()
                        self._pending_data = self.sampler.state()  # cleared when the step commits
                        record = self._train_step()
                        dt = time.perf_counter() - t0
                        step_time += dt
                        window_time += dt
                        window_tokens += s.batch_size * s.seq_len
                        self.elapsed_s += dt
                        record["tokens_per_s"] = window_tokens / max(window_time, 1e-9)
                        last = record
                        if on_step is not None:
                            on_step(self.step, record)
                        do_eval = s.eval_every > 0 and self.step % s.eval_every == 0
                        do_eval = do_eval or self.step == s.steps
                        evaluated = self._eval_record() if do_eval else None
                        if writes and (self.step % s.log_every == 0 or do_eval
                                       or self.step == s.steps):
                            if do_eval:
                                record.update(evaluated)
                            self._log(record, on_log)
                            window_time, window_tokens = 0.0, 0
                        if s.checkpoint_every and self.step % s.checkpoint_every == 0:
                            self.save()
                except Aborted:
                    raise
                except KeyboardInterrupt:
                    interrupted = True
                    self.stop_requested = True  # a further signal aborts the save below
                    if self._pending_data is not None:  # the interrupted step committed nothing
                        self.sampler.set_state(self._pending_data)
                        self._pending_data = None
                interrupted = interrupted or self.world.any(self.stop_requested)
                ckpt = self.save()
        finally:
            if writes:
                self.lock.release()
        elapsed = time.perf_counter() - t_start
        trained = self.tokens_seen - tokens_before
        return TrainResult(
            status="interrupted" if interrupted else "done", step=self.step, checkpoint=ckpt,
            out_dir=self.out_dir, last=last, last_eval=self.last_eval,
            tokens_per_s=trained / step_time if step_time > 0 else 0.0, elapsed_s=elapsed,
            signum=(self.stop_signal or signal.SIGINT) if interrupted else None,
        )

    def close(self) -> None:
        """Release the run directory (done by :meth:`run` when it returns)."""
        if self.world.writes:
            self.lock.release()

    def _train_step(self) -> dict:
        s, number = self.settings, self.step + 1
        self.world.where = f"step {number}"
        tokens = self.sampler.next(s.batch_size)  # (B, T+1) int64 on the backend
        lr = self.schedule(self.step)
        try:
            with sharded(self.shard) if self.shard is not None else nullcontext():
                r = train_step(self.params, self.cfg, tokens, self.opt, lr, s.grad_clip,
                               grad_accum=self.grad_accum, workers=self.workers, world=self.world,
                               commit=self._commit)
        except NonFinite as exc:
            raise NonFiniteError(f"step {number}: {exc}; stopped without saving, "
                                 f"{self._last_good()}; lower --lr or check the data") from None
        self.step = number
        self.tokens_seen += s.batch_size * s.seq_len
        self._pending_data = None  # the sampler's advance is now part of the run
        record = {"step": number, "tokens": self.tokens_seen, "lr": lr, "grad_norm": r.grad_norm,
                  "loss": r.losses}
        imbalance = _imbalance(self.backend, r.load)
        if imbalance:
            record["imbalance"] = imbalance
            record["imbalance_max"] = max(imbalance.values())
        return record

    @contextmanager
    def _commit(self):
        """The updates of a step: Ctrl-C waits until they are done (the step is then part of the run)."""
        self._committing = True
        try:
            yield
        finally:
            self._committing = False

    # ---------------------------------------------------------------------------------------
    # evaluation
    # ---------------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Held-out loss terms and top-1 accuracy per depth (main, mtp.1 .. mtp.D).

        Main logits at position t predict token t+1; MTP depth k at position t predicts token
        t+k+1 (V3 sec. 2.2), so its targets are ``tokens[:, k+1 : T+1]``. With the experts
        sharded over the ranks every rank calls it; rank 0 gets the result, the others None.
        """

        if self._serves_experts:  # no rank holds every expert: they evaluate together
            return self._evaluate_sharded()
        return self._evaluate_batches()

    def _evaluate_batches(self) -> dict:
        s, bk = self.settings, self.backend
        xp = bk.xp
        T = s.seq_len
        sums: dict[str, float] = {}
        correct: dict[str, float] = {}
        total: dict[str, int] = {}
        n_batches = 0
        for i in range(0, self._heldout.shape[0], s.batch_size):
            tokens = bk.asarray(self._heldout[i:i + s.batch_size], dtype="int64")  # (B, T+1)
            res = forward(self.params, self.cfg, tokens, need_cache=False)
            out = res[0] if isinstance(res, tuple) else res
            for k, v in out.losses.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n_batches += 1
            preds = [("main", out.logits, tokens[:, 1:T + 1])]
            for k, logits in enumerate(out.mtp_logits, start=1):
                preds.append((f"mtp.{k}", logits, tokens[:, k + 1:T + 1]))
            for name, logits, target in preds:
                hit = xp.argmax(logits, axis=-1) == target  # (B, T-k)
                correct[name] = correct.get(name, 0.0) + float(xp.sum(hit))
                total[name] = total.get(name, 0) + int(math.prod(target.shape))
        return {"loss": {k: v / n_batches for k, v in sums.items()},
                "acc": {k: correct[k] / total[k] for k in correct}}

    @property
    def _serves_experts(self) -> bool:
        """Expert parallel with sharded experts: evaluation needs every rank (no rank holds the
        whole model). Rank 0 runs the model on each held-out batch with the sharded layer; the
        other ranks only run their experts on the rows it sends (refmtp.training.expert_parallel
        .serve_forward): each expert's block is the single process's, so are the numbers."""
        return self.shard is not None and not self.shard.replicated

    def _evaluate_sharded(self) -> dict | None:
        """:meth:`evaluate` with the experts sharded; every rank calls it, rank 0 gets the result."""
        self.world.where = f"the evaluation at step {self.step}"
        dtype = self.settings.dtype
        try:
            with sharded(self.shard):
                if not self.world.writes:
                    for _ in range(0, self._heldout.shape[0], self.settings.batch_size):
                        serve_forward(self.params, self.shard, self.backend, dtype)
                    return None
                return self._evaluate_batches()
        except (ValueError, ArithmeticError) as exc:  # the others wait inside an exchange
            self.world.abort(f"the evaluation at step {self.step} failed ({exc})", 1)

    def _eval_record(self) -> dict:
        """Evaluate (rank 0; every rank when the experts are sharded) -> the metrics entries;
        {} on the other ranks."""
        if not (self.world.writes or self._serves_experts):
            return {}
        ev = self.evaluate()
        if ev is None:  # a rank that served its experts
            return {}
        self.last_eval = {"step": self.step, **ev}
        return {"eval_loss": ev["loss"], "eval_acc": ev["acc"]}

    # ---------------------------------------------------------------------------------------
    # output
    # ---------------------------------------------------------------------------------------
    def _log(self, record: dict, on_log) -> None:
        record = {**record, "elapsed_s": round(self.elapsed_s, 3)}
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if on_log is not None:
            on_log(record)

    def _last_good(self) -> str:
        ckpt = latest_checkpoint(self.out_dir)
        if ckpt is None:
            return (f"no checkpoint was written yet (restart the run with refmtp train "
                    f"--resume {self.out_dir}; it starts again from step 0)")
        return f"last good checkpoint: {ckpt}"

    def save(self) -> Path:
        """Write a checkpoint of the current step (refmtp.training.rundir.write_checkpoint).

        Refuses (NonFiniteError) to write a parameter or optimizer moment that is not finite,
        so every checkpoint of a run is a good one. Only rank 0 writes (None on the others).
        Every rank calls it at the same steps: the ranks agree on the check, and with the experts
        sharded every rank sends its experts (weights, m, v) to rank 0 in rank order, which
        writes the files of a single process (byte for byte)."""
        bad = first_nonfinite(self.params) or first_nonfinite(
            {f"optimizer {k}.{n}": a for k, d in (("m", self.opt.m), ("v", self.opt.v))
             for n, a in d.items()})
        if self.world.size > 1:
            self.world.where = f"the checkpoint of step {self.step}"
            bad = next((b for b in self.world.allgather(bad, "the check before a checkpoint") if b),
                       None)
        if bad is not None:
            raise NonFiniteError(f"step {self.step}: {bad!r} is not finite after the update; "
                                 f"not saved, {self._last_good()}; lower --lr or check the data")
        params, opt = self.params, self.opt
        if self._serves_experts:
            host = self.backend.to_numpy
            mine = None if self.world.writes else tuple(
                {n: host(a) for n, a in d.items() if routed_expert(n) is not None}
                for d in (self.params, self.opt.m, self.opt.v))
            theirs = self.world.gather(mine, "the gather of the experts for a checkpoint")
            if not self.world.writes:
                return None
            params, opt = dict(self.params), AdamW(self.opt.settings)
            opt.step_count, opt.m, opt.v = self.opt.step_count, dict(self.opt.m), dict(self.opt.v)
            for p_q, m_q, v_q in theirs[1:]:  # ranks 1 .. N-1
                params.update(p_q)
                opt.m.update(m_q)
                opt.v.update(v_q)
        if not self.world.writes:
            return None

        def contents(tmp: Path) -> None:
            save_checkpoint(tmp, self.cfg, params)
            save_optimizer(tmp / "optimizer.safetensors", opt)
            state = {
                "step": self.step, "tokens_seen": self.tokens_seen,
                "elapsed_s": self.elapsed_s, "data": self.sampler.state(),
                "backend": self.settings.backend, "dtype": self.settings.dtype,
                "data_fingerprint": self.corpus.fingerprint, "seed": self.settings.seed,
                "run_id": self.run_id,
                "files": {name: file_sha256(tmp / name) for name in HASHED_FILES},
            }
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

        self.last_checkpoint = write_checkpoint(self.out_dir, self.step, contents)
        return self.last_checkpoint


# -------------------------------------------------------------------------------------------
# helpers
# -------------------------------------------------------------------------------------------
def _check_seq_len(settings: TrainSettings, cfg: ModelConfig) -> None:
    if settings.seq_len <= cfg.D:
        raise ValueError(
            f"seq_len={settings.seq_len} must exceed the MTP depth D={cfg.D} (depth k predicts "
            "k+1 tokens ahead)"
        )
    if settings.seq_len > cfg.max_position_embeddings:
        raise ValueError(
            f"seq_len={settings.seq_len} exceeds max_position_embeddings="
            f"{cfg.max_position_embeddings}"
        )


def parallel_plan(settings: TrainSettings, cfg: ModelConfig, world: World):
    """(microbatches of this rank, ExpertShard or None) of a run on ``world``; RunError /
    ValueError when the run's microbatches or --expert-parallel do not fit the ranks."""
    s, w = settings, world
    if s.microbatches % w.size:
        raise RunError(f"the run takes {s.microbatches} microbatch(es) per step: they cannot "
                       f"be split over {w.size} ranks (ranks x --grad-accum must be "
                       f"{s.microbatches})")
    shard = None
    if s.expert_parallel > 1:
        if s.expert_parallel != w.size:
            raise RunError(f"--expert-parallel {s.expert_parallel} shards the experts over "
                           f"{s.expert_parallel} ranks; this run has {w.size}: launch it with "
                           f"mpiexec -n {s.expert_parallel}")
        shard = ExpertShard(cfg, w, replicated=os.environ.get(REPLICATED_ENV) == "1")  # ValueError: uneven
    return s.microbatches // w.size, shard


def check_training_memory(settings: TrainSettings, cfg: ModelConfig) -> None:
    """Refuse, before allocating anything, a run whose estimate exceeds the available memory."""
    need = training_bytes(cfg, settings.batch_size, settings.seq_len, settings.dtype)
    need += settings.eval_batches * settings.batch_size * (settings.seq_len + 1)  # held-out windows
    check_memory(need, f"training this model (batch {settings.batch_size} x seq_len "
                 f"{settings.seq_len}, {settings.dtype})",
                 "lower --batch-size / --seq-len or choose a smaller model")


def _check_empty(out_dir: Path, probe_lock: bool = True) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise RunError(f"output {out_dir} exists and is not a directory: choose another --out")
    if not out_dir.is_dir():
        return
    if probe_lock and (out_dir / LOCK_FILE).exists():
        RunLock(out_dir).acquire().release()  # RunError naming the holder while it runs
    if any(p.name != LOCK_FILE for p in out_dir.iterdir()):
        raise RunError(
            f"output directory {out_dir} already exists and is not empty: continue it with "
            f"--resume {out_dir} or choose another --out"
        )


def _read_json_object(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RunError(f"cannot read {what} {path}: {str(exc).splitlines()[0]}; restore it or "
                       "start a new run with --out") from None
    if not isinstance(data, dict):
        raise RunError(f"{what} {path} is malformed (not a JSON object); restore it or start a "
                       "new run with --out")
    return data


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_state(ckpt: Path, run: dict, settings: TrainSettings) -> dict:
    """trainer_state.json of ``ckpt``, checked: types, and that it belongs to the run."""
    path = ckpt / STATE_FILE
    state = _read_json_object(path, "trainer state")
    fix = "restore the run's own checkpoint or start a new run with --out"
    for key, kinds in (("step", int), ("tokens_seen", int), ("elapsed_s", (int, float)),
                       ("data", dict)):
        v = state.get(key)
        if isinstance(v, bool) or not isinstance(v, kinds) or (kinds is int and v < 0):
            raise RunError(f"{path} is malformed: '{key}' is {v!r}; {fix}")
    if state["step"] != checkpoint_step(ckpt.name):
        raise RunError(f"{path} is at step {state['step']}, but the directory is {ckpt.name}; {fix}")
    run_id = run.get("run_id")
    if run_id is not None and state.get("run_id") != run_id:
        raise RunError(f"{ckpt} was not written by this run (run id {state.get('run_id')!r}, "
                       f"run.json has {run_id!r}); {fix}")
    if state.get("data_fingerprint", run["data"]["fingerprint"]) != run["data"]["fingerprint"]:
        raise RunError(f"{ckpt} was trained on other data than run.json names; {fix}")
    if state.get("seed", settings.seed) != settings.seed:
        raise RunError(f"{ckpt} has seed {state.get('seed')!r}, the run {settings.seed}; {fix}")
    hashes = state.get("files", {})
    if not isinstance(hashes, dict):
        raise RunError(f"{path} is malformed: 'files' must be an object; {fix}")
    for name, digest in sorted(hashes.items()):
        f = ckpt / str(name)
        if "/" in str(name) or not f.is_file() or file_sha256(f) != digest:
            raise RunError(f"{f} is missing or not the file this run wrote (sha256 differs); {fix}")
    return state


def _store_settings(run_file: Path, run: dict, settings: TrainSettings,
                    stored: TrainSettings) -> None:
    if settings.to_dict() != stored.to_dict():
        run["settings"] = settings.to_dict()
        write_json_atomic(run_file, run)


def _normalise(key, value):
    if key == "data" and value is not None:
        return str(Path(value).expanduser().resolve())
    if isinstance(value, int) and not isinstance(value, bool) and key in ("lr", "eps",
                                                                         "weight_decay"):
        return float(value)
    return value


def _imbalance(bk, load: dict) -> dict:
    """max/mean of each MoE layer's expert loads (1.0 = perfectly balanced)."""
    out = {}
    for layer in sorted(load):
        c = bk.to_numpy(load[layer]).astype("float64")  # (E,) host copy for the metric
        mean = float(c.mean())
        if mean > 0:
            out[str(layer)] = float(c.max()) / mean
    return out


def _wrap(indent: str, items: list[str], width: int = 100) -> list[str]:
    lines, cur = [], indent
    for it in items:
        if len(cur) + len(it) + 1 > width and cur.strip():
            lines.append(cur.rstrip())
            cur = indent
        cur += it + " "
    if cur.strip():
        lines.append(cur.rstrip())
    return lines


__all__ = ["Trainer", "TrainSettings", "TrainResult", "NonFiniteError", "RunError", "Aborted",
           "CheckpointWriteError", "check_training_memory",
           "byte_level_config", "count_params"]
