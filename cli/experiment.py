"""``refmtp experiment``: experiments that put refmtp's pieces side by side (docs/experiments.md).

    refmtp experiment mtp [--quick] [--out DIR] [--seeds N] [--steps N]
    refmtp experiment table DIR/results.json [--write docs/experiments.md]

``mtp`` runs :func:`refmtp.verification.experiment_mtp.run_experiment` and writes, under DIR,
``results.json``, ``table.md`` (the markdown tables) and ``plot.png`` (needs matplotlib, the
``plot`` extra; without it one line says the plot was skipped). ``table`` prints the tables of
a results file, or writes them into the generated block of a page.
"""
from __future__ import annotations

import dataclasses
import os
import platform
from datetime import datetime
from pathlib import Path

import click

from refmtp.cli.common import InputError, check_output_file


def machine() -> dict:
    """The machine the experiment ran on: ``refmtp info``'s versions plus the CPU."""
    from refmtp.cli.info import collect_info

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.lower().startswith("model name")), cpu)
    except OSError:
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                      "MKL_NUM_THREADS", "REFMTP_KERNELS") if k in os.environ}
    return {**collect_info(), "cpu_model": cpu, "cpu_count": os.cpu_count(),
            "cpu_affinity": affinity, "env": env}


@click.group()
def experiment():
    """Experiments: the MTP variants side by side (docs/experiments.md)."""


@experiment.command("mtp")
@click.option("--quick", is_flag=True,
              help="The tiny model and 80 steps per run (a few minutes) instead of the full plan.")
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="Output directory (default runs/experiment-mtp-<timestamp>); must not exist "
                   "or be empty.")
@click.option("--seeds", type=int, default=3, show_default=True, help="Seeds 0..N-1 per variant.")
@click.option("--steps", type=int, default=None,
              help="Same-token steps per run instead of the plan's (400 full, 80 quick).")
def mtp(quick, out, seeds, steps):
    """Train no MTP, causal D=1, causal D=2 and parallel heads D=2 on the same data, tokens and
    seeds; held-out loss and accuracy, acceptance and tau at K=D, and a same-wall-time
    comparison. Writes results.json, table.md and plot.png under --out."""
    from refmtp.verification.experiment_mtp import (PLANS, PLOT_FILE, RESULTS_FILE, TABLE_FILE,
                                                    check_plan, draw_plot, markdown_tables,
                                                    run_experiment)

    if not 1 <= seeds <= 10:
        raise InputError(f"--seeds {seeds} must be between 1 and 10")
    if steps is not None and steps < 1:
        raise InputError(f"--steps {steps} must be >= 1")
    plan = PLANS["quick" if quick else "full"]
    if steps is not None:
        plan = dataclasses.replace(plan, steps=steps)
    seed_list = list(range(seeds))
    check_plan(plan, seed_list)
    out_dir = Path(out) if out else Path("runs") / (
        "experiment-mtp-" + datetime.now().strftime("%Y%m%d-%H%M%S"))
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(f"--out {out_dir} exists and is not an empty directory: choose another")
    out_dir.mkdir(parents=True, exist_ok=True)
    check_output_file(out_dir / RESULTS_FILE, "--out")
    try:
        import matplotlib  # noqa: F401
        can_plot = True
    except ImportError:
        can_plot = False
    n_runs = seeds * 7
    click.echo(f"experiment mtp, plan {plan.name}: preset {plan.model}, {plan.steps} steps x "
               f"{plan.batch_size} x {plan.seq_len} tokens, seeds {seed_list}, {n_runs} runs "
               f"-> {out_dir}")
    results = run_experiment(plan, out_dir, seed_list, machine=machine(), log=click.echo)
    table = markdown_tables(results)
    (out_dir / TABLE_FILE).write_text(table)
    click.echo("\n" + table)
    click.echo(f"wrote {out_dir / RESULTS_FILE} and {out_dir / TABLE_FILE}")
    if can_plot:
        draw_plot(results, out_dir / PLOT_FILE)
        click.echo(f"wrote {out_dir / PLOT_FILE}")
    else:
        click.echo("plot skipped: matplotlib is not installed (pip install 'refmtp[plot]')")


@experiment.command("table")
@click.argument("results", type=click.Path(dir_okay=False))
@click.option("--write", "page", type=click.Path(dir_okay=False), default=None,
              help="Write the tables into this page's generated block (docs/experiments.md).")
def table(results, page):
    """Print the markdown tables of a results.json, or write them into a page."""
    from refmtp.verification.experiment_mtp import markdown_tables, read_results, write_page

    data = read_results(results)
    if page is None:
        click.echo(markdown_tables(data), nl=False)
        return
    if Path(results).is_absolute():
        raise InputError(f"give RESULTS as a path relative to the repository (it is quoted in "
                         f"the page), not {results}")
    write_page(page, data, Path(results).as_posix())
    click.echo(f"wrote the tables of {results} into {page}")
