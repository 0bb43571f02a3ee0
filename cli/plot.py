"""``refmtp plot RUN_DIR``: loss curves and expert-load imbalance of a run, as a PNG.

Reads ``RUN_DIR/metrics.jsonl`` (written by ``refmtp train``). Needs matplotlib (the optional
extra ``plot``: ``pip install 'refmtp[plot]'``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import click

from refmtp.cli.common import InputError, check_output_file

FORMATS = (".png", ".pdf", ".svg")  # what --out may be (matplotlib picks the format by suffix)
SECTIONS = ("loss", "eval_loss", "imbalance")  # {name: number} objects the plot reads


def _number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def check_record(rec, where: str) -> dict:
    """A metrics record the plot can read: an object with an integer step and, per section,
    an object of numbers (non-finite values are left out of the plot)."""
    if not isinstance(rec, dict):
        raise InputError(f"{where} is not a JSON object: metrics.jsonl holds one object per line")
    step = rec.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        raise InputError(f"{where} has no integer 'step' (found {step!r})")
    for section in SECTIONS:
        values = rec.get(section, {})
        if not isinstance(values, dict):
            raise InputError(f"{where}: '{section}' must be an object of numbers")
        rec[section] = {str(k): v for k, v in values.items() if _number(v)}
    return rec


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise InputError(f"{path} does not exist: pass a run directory written by refmtp train")
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text: not a metrics file written by refmtp "
                         "train") from None
    records = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            raise InputError(f"{path}:{n} is not valid JSON") from None
        records.append(check_record(rec, f"{path}:{n}"))
    if not records:
        raise InputError(f"{path} is empty: the run has not logged a step yet")
    return records


def series(records: list[dict], section: str, term: str):
    """(steps, values) of ``record[section][term]`` over the records that have it."""
    xs, ys = [], []
    for r in records:
        v = r.get(section, {}).get(term)
        if v is not None:
            xs.append(r["step"])
            ys.append(v)
    return xs, ys


def draw(records: list[dict], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    terms = []
    for r in records:
        for k in list(r.get("loss", {})) + list(r.get("eval_loss", {})):
            if (k == "main" or k.startswith("mtp.")) and k not in terms:
                terms.append(k)
    fig, (ax_loss, ax_imb) = plt.subplots(2, 1, figsize=(9, 8), sharex=True,
                                          gridspec_kw={"height_ratios": [2, 1]})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, term in enumerate(terms):
        c = colours[i % len(colours)]
        xs, ys = series(records, "loss", term)
        if xs:
            ax_loss.plot(xs, ys, color=c, lw=1.2, label=f"train {term}")
        xs, ys = series(records, "eval_loss", term)
        if xs:
            ax_loss.plot(xs, ys, color=c, ls="--", marker="o", ms=4, label=f"held-out {term}")
    ax_loss.set_ylabel("cross-entropy (nats / byte)")
    ax_loss.set_title(title)
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize=8)
    layers = sorted({k for r in records for k in r.get("imbalance", {})}, key=int)
    for layer in layers:
        xs, ys = series(records, "imbalance", layer)
        ax_imb.plot(xs, ys, lw=1, label=f"layer {layer}")
    if layers:
        ax_imb.axhline(1.0, color="k", lw=0.5)
        ax_imb.legend(fontsize=8, ncol=min(len(layers), 4))
    else:
        ax_imb.text(0.5, 0.5, "no MoE layers", ha="center", va="center",
                    transform=ax_imb.transAxes)
    ax_imb.set_ylabel("expert load max / mean")
    ax_imb.set_xlabel("step")
    ax_imb.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", "png", type=click.Path(dir_okay=False), default=None,
              help="PNG to write (default RUN_DIR/curves.png).")
def plot(run_dir, png):
    """Draw the loss curves (main and each MTP depth, train and held-out) and the expert-load
    imbalance of a training run to a PNG."""
    run = Path(run_dir)
    records = read_metrics(run)
    png = check_output_file(png if png else run / "curves.png", "--out", FORMATS)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise click.ClickException(
            "refmtp plot needs matplotlib: pip install 'refmtp[plot]' (or pip install matplotlib)"
        ) from None
    try:
        draw(records, png, title=f"refmtp run {run.resolve().name}")
    except OSError as exc:
        raise InputError(f"cannot write {png}: {exc.strerror or exc}") from None
    click.echo(f"wrote {png}")
