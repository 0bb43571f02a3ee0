"""``refmtp train``: train a model on bytes, with checkpoints, metrics and exact resume.

The loop lives in :mod:`refmtp.training.trainer`; this module parses options, prints, and maps errors to
exit codes: 2 for input the user can fix (unknown preset, bad config, unreadable or empty data,
an existing --out, a --resume that does not match, a run directory another process holds, a
model or batch too large for the memory), 1 for a failure of the run (non-finite loss or
gradient, a checkpoint that cannot be written), 130 after Ctrl-C and 143 after SIGTERM (a
checkpoint is saved first; a second signal aborts at once, the last checkpoint stays valid).
No traceback reaches the user.
"""
from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import click

from refmtp.backends import BackendUnavailable
from refmtp.cli.common import InputError, one_line, one_line_text
from refmtp.config import ConfigError, ModelConfig, preset as get_preset
from refmtp.training.distributed import DEFAULT_TIMEOUT


def _default_out(name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path("runs") / f"{name}-{stamp}"
    n = 1
    while out.exists():
        n += 1
        out = Path("runs") / f"{name}-{stamp}-{n}"
    return out


def _fmt_losses(losses: dict) -> str:
    parts = [f"loss {losses['main']:.4f}"]
    parts += [f"{k} {v:.4f}" for k, v in losses.items() if k.startswith("mtp.")]
    if "balance" in losses:
        parts.append(f"bal {losses['balance']:.2e}")
    return "  ".join(parts)


def _fmt_eval(rec: dict) -> str:
    loss, acc = rec["eval_loss"], rec["eval_acc"]
    parts = [f"held-out: loss {loss['main']:.4f} acc {acc['main']:.3f}"]
    for k in acc:
        if k.startswith("mtp."):
            parts.append(f"{k} loss {loss.get(k, float('nan')):.4f} acc {acc[k]:.3f}")
    return "  ".join(parts)


def _fmt_step(rec: dict) -> str:
    line = (f"step {rec['step']:>6}  {_fmt_losses(rec['loss'])}  gnorm {rec['grad_norm']:.3f}  "
            f"lr {rec['lr']:.2e}  {rec.get('tokens_per_s', 0):,.0f} tok/s")
    if "imbalance_max" in rec:
        line += f"  imb {rec['imbalance_max']:.2f}"
    return line


@click.command()
@click.option("--preset", "preset_name", default=None,
              help="Model preset: tiny, mini, small (default), draft (a draft model for speculative decoding) or deepseek-v3.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="Model config.json (HF DeepSeek-V3 field names) instead of a preset.")
@click.option("--data", type=click.Path(), default=None,
              help="Text file or directory of text files (default: the Python stdlib source).")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Total number of updates, also with --resume (default 1500).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Windows per step (16).")
@click.option("--seq-len", type=click.IntRange(min=1), default=None, help="Tokens per window (128).")
@click.option("--lr", type=float, default=None, help="Peak learning rate (3e-3).")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=None,
              help="Linear warmup steps (default min(100, decay steps / 10)).")
@click.option("--decay-steps", type=click.IntRange(min=1), default=None,
              help="Step where the cosine reaches its minimum (default: --steps).")
@click.option("--backend", type=click.Choice(["numpy", "cupy"]), default=None,
              help="Array backend (numpy).")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default=None,
              help="Parameter dtype (float32).")
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Init and data seed (0).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Run directory (default runs/<preset>-<timestamp>).")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), default=None,
              help="Continue the run in this directory from its newest checkpoint.")
@click.option("--eval-every", type=click.IntRange(min=0), default=None,
              help="Held-out evaluation every N steps (250; 0: only at the end).")
@click.option("--log-every", type=click.IntRange(min=1), default=None,
              help="metrics.jsonl line every N steps (10).")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=None,
              help="Checkpoint every N steps (250; 0: only at the end and on Ctrl-C).")
@click.option("--expert-parallel", type=click.IntRange(min=1), default=None,
              help="Shard the routed experts over N ranks (launch with mpiexec -n N; "
                   "docs/distributed.md).")
@click.option("--grad-accum", type=click.IntRange(min=1), default=None,
              help="Microbatches per step on each process, summed in order (1); "
                   "ranks x N must divide --batch-size.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Run N of the process's microbatches side by side on N threads (the CPU's "
                   "cores; OpenBLAS gets cores / N threads each); the same bits as 1. Needs "
                   "--grad-accum N or more (docs/performance.md).")
@click.option("--rank-timeout", type=click.FloatRange(min=0, max=1e9), default=DEFAULT_TIMEOUT,
              show_default=True,
              help="Under MPI: seconds a rank waits for the others in an exchange before it "
                   "stops every rank, naming the ranks that did not arrive (0: wait forever).")
def train(preset_name, config_file, data, steps, batch_size, seq_len, lr, warmup_steps,
          decay_steps, backend, dtype, seed, out, resume_dir, eval_every, log_every,
          checkpoint_every, expert_parallel, grad_accum, workers, rank_timeout):
    """Train a DeepSeek-V3-style model (MLA + MoE + MTP) on byte-level text.

    With no options: the `small` preset on the Python standard library source, numpy, float32
    (about 10 minutes on 2 CPU cores). Checkpoints, metrics.jsonl and run.json go to --out.
    Under `mpiexec -n N` every rank computes 1/N of each batch (data parallel,
    docs/distributed.md); rank 0 writes and prints.
    """
    from refmtp.training.distributed import detect_world

    from refmtp.training.distributed import import_mpi

    try:
        world = detect_world()
        world.timeout = rank_timeout
        if (expert_parallel or 1) > 1 and world.size == 1:
            import_mpi(f"--expert-parallel {expert_parallel}")  # the install line when absent
            raise InputError(f"--expert-parallel {expert_parallel} shards the experts over "
                             f"{expert_parallel} ranks: launch it with mpiexec -n {expert_parallel} "
                             "refmtp train ...")
    except ValueError as exc:
        raise InputError(one_line(exc)) from None
    if world.size == 1:
        return _train(world, preset_name, config_file, data, steps, batch_size, seq_len, lr,
                      warmup_steps, decay_steps, backend, dtype, seed, out, resume_dir,
                      eval_every, log_every, checkpoint_every, expert_parallel, grad_accum, workers)
    if not world.writes:
        world.silence()  # rank 0 speaks for the run
    try:
        return _train(world, preset_name, config_file, data, steps, batch_size, seq_len, lr,
                      warmup_steps, decay_steps, backend, dtype, seed, out, resume_dir,
                      eval_every, log_every, checkpoint_every, expert_parallel, grad_accum, workers)
    except click.ClickException as exc:  # said once by rank 0 when every rank has it
        if not getattr(exc, "all_ranks", False):
            world.abort(one_line_text(exc.format_message()), exc.exit_code)
        raise
    except SystemExit as exc:  # the end of an interrupted run: every rank agreed on the stop
        raise exc
    except BaseException as exc:  # one rank failed alone: stop every rank, no hang
        world.abort(f"{type(exc).__name__}: {one_line(exc)}", 1)


def _everyone(exc):
    """Mark an error that every rank raises at the same point (rank 0 says it, the others exit)."""
    exc.all_ranks = True
    return exc


def _train(world, preset_name, config_file, data, steps, batch_size, seq_len, lr, warmup_steps,
           decay_steps, backend, dtype, seed, out, resume_dir, eval_every, log_every,
           checkpoint_every, expert_parallel, grad_accum, workers):
    from refmtp.training.trainer import Aborted, NonFiniteError, RunError, Trainer, TrainSettings

    requested = {
        "data": data, "steps": steps, "batch_size": batch_size, "seq_len": seq_len, "lr": lr,
        "warmup_steps": warmup_steps, "decay_steps": decay_steps, "backend": backend,
        "dtype": dtype, "seed": seed, "eval_every": eval_every, "log_every": log_every,
        "checkpoint_every": checkpoint_every,
        "expert_parallel": expert_parallel,
        "microbatches": None if grad_accum is None and world.size == 1 else
        world.size * (grad_accum or 1),
    }
    if resume_dir is not None and grad_accum is None:
        requested["microbatches"] = None  # the run's own; the trainer checks the ranks divide it
    def prepare():
        """Every check this rank can make on its own; returns how to build the trainer."""
        if resume_dir is None and workers > (grad_accum or 1):
            raise InputError(f"--workers {workers} runs microbatches side by side: give --grad-accum "
                             f"{workers} or more (now {grad_accum or 1})")
        if resume_dir is None and (grad_accum or 1) * world.size > 1:
            from refmtp.training.step import check_microbatches

            check_microbatches(batch_size or TrainSettings.batch_size, world.size * (grad_accum or 1),
                               "--grad-accum" if world.size == 1 else
                               f"{world.size} ranks x --grad-accum {grad_accum or 1} =")
        if preset_name is not None and config_file is not None:
            raise InputError("give --preset or --config, not both")
        cfg = None
        if config_file is not None:
            cfg = ModelConfig.load(config_file)
        elif preset_name is not None:
            cfg = get_preset(preset_name)
        if resume_dir is not None:
            if out is not None and Path(out).resolve() != Path(resume_dir).resolve():
                raise InputError("--out cannot be combined with --resume (the run continues "
                                 "in the --resume directory)")
            if requested["data"] is not None:
                requested["data"] = str(Path(data).expanduser().resolve())
            return lambda: Trainer.resume(resume_dir, requested, cfg, world=world)
        settings = TrainSettings()
        settings.preset = preset_name if config_file is None else None
        settings.config_file = str(Path(config_file).resolve()) if config_file else None
        if settings.preset is None and settings.config_file is None:
            settings.preset = "small"
        for key, value in requested.items():
            if value is not None:
                setattr(settings, key, value)
        if data is not None:
            settings.data = str(Path(data).expanduser().resolve())
        if cfg is None:
            cfg = get_preset(settings.preset)
        name = settings.preset or Path(config_file).stem
        out_dir = Path(out) if out is not None else _default_out(name)  # rank 0's is used
        settings.validate()
        return lambda: Trainer.new(settings, cfg, out_dir, world=world)

    errors = (ConfigError, RunError, BackendUnavailable, ValueError, OSError)
    problem = build = None
    try:
        build = prepare()
    except InputError as exc:
        problem = one_line_text(exc.format_message())
    except errors as exc:
        problem = one_line(exc)
    if world.size > 1:  # agree before any collective work: a rank with bad input stops all
        said = world.allgather(problem)
        bad = [(rank, line) for rank, line in enumerate(said) if line]
        problem = None if not bad else bad[0][1] if bad[0][0] == 0 else f"rank {bad[0][0]}: {bad[0][1]}"
    if problem is not None:
        raise _everyone(InputError(problem))
    try:
        trainer = Trainer.distributed(world, build)  # rank 0 builds; its error is every rank's
    except errors as exc:
        raise _everyone(InputError(one_line(exc))) from None

    trainer.workers = workers
    if workers > 1:
        _share_blas_threads(workers)
    try:
        for line in trainer.describe():
            click.echo(line)
        _run(trainer, NonFiniteError, Aborted)
    finally:
        trainer.close()


def _share_blas_threads(workers: int) -> None:
    """OpenBLAS at (its threads) // workers, at least 1: each worker thread's GEMMs run on its
    share of the cores (a second BLAS pool would spin beside the first; docs/performance.md)."""
    from refmtp.backends import openblas

    n = openblas.threads()
    if n is not None:
        openblas.threads(max(1, n // workers))


def _run(trainer, NonFiniteError, Aborted):
    s = trainer.settings
    if trainer.step >= s.steps:
        click.echo(f"the run is already at step {trainer.step} (--steps {s.steps}): nothing to "
                   f"do; checkpoint: {trainer.resumed_from}")
        return
    tty = sys.stdout.isatty()
    start = trainer.step
    # Without a terminal: one line per ~5% of the run (and at every evaluation).
    every = max(s.log_every, ((s.steps - start) // 20) // s.log_every * s.log_every)
    status = {"text": ""}

    def on_log(rec):
        if "loss" not in rec:  # the evaluation before the first step
            click.echo(f"step {rec['step']:>6}  {_fmt_eval(rec)}")
            return
        if "eval_loss" in rec:
            prefix = "\n" if tty else ""
            click.echo(f"{prefix}{_fmt_step(rec)}\nstep {rec['step']:>6}  {_fmt_eval(rec)}")
        elif not tty and (rec["step"] % every == 0 or rec["step"] == s.steps):
            click.echo(_fmt_step(rec))

    try:
        with warnings.catch_warnings():
            # overflow warnings are superseded by the non-finite check's one-line message
            warnings.simplefilter("ignore", RuntimeWarning)
            if tty:
                with click.progressbar(length=s.steps - start, label="training", show_eta=True,
                                       show_percent=False, show_pos=True, width=20,
                                       item_show_func=lambda _: status["text"]) as bar:
                    def on_step(step, rec):
                        status["text"] = (f"step {step}  {_fmt_losses(rec['loss'])}  "
                                          f"{rec.get('tokens_per_s', 0):,.0f} tok/s")
                        bar.update(1)

                    result = trainer.run(on_step=on_step, on_log=on_log)
            else:
                result = trainer.run(on_log=on_log)
    except NonFiniteError as exc:  # found by every rank (refmtp.training.step)
        raise _everyone(click.ClickException(one_line(exc))) from None
    except Aborted as exc:
        from refmtp.training.rundir import latest_checkpoint

        ckpt = latest_checkpoint(trainer.out_dir)
        where = (f"the last checkpoint {ckpt} is valid; continue with: refmtp train --resume "
                 f"{trainer.out_dir}" if ckpt else
                 f"no checkpoint yet; restart with: refmtp train --resume {trainer.out_dir}")
        click.echo(f"\naborted by a second signal at step {trainer.step}; {where}", err=True)
        if trainer.world.size > 1:  # the other ranks may wait in a collective: stop them too
            trainer.world.abort("aborted by a second signal", 128 + exc.signum)
        sys.exit(128 + exc.signum)
    except (ValueError, OSError) as exc:  # CheckpointError is a ValueError
        raise click.ClickException(f"training stopped: {one_line(exc)}") from None

    ev = result.last_eval
    click.echo(
        f"{result.status} at step {result.step}: {result.tokens_per_s:,.0f} tokens/s, "
        f"{result.elapsed_s:.0f} s this session"
    )
    if result.last:
        click.echo(f"last train step: {_fmt_losses(result.last['loss'])}")
    if ev is not None:
        click.echo(f"step {ev['step']} {_fmt_eval({'eval_loss': ev['loss'], 'eval_acc': ev['acc']})}")
    click.echo(f"checkpoint: {result.checkpoint}")
    click.echo(f"metrics:    {result.out_dir / 'metrics.jsonl'}  (plot: refmtp plot {result.out_dir})")
    if result.status == "interrupted":
        click.echo(f"interrupted; continue with: refmtp train --resume {result.out_dir}", err=True)
        sys.exit(128 + int(result.signum or 2))
