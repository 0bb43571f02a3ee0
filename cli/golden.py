"""``refmtp golden``: export, generate and verify golden files (docs/golden-format.md).

Exit codes of ``verify``: 0 every case passes, 1 a numerical mismatch (or a missing output
tensor), 2 an unreadable, tampered or foreign file, or bad input (an unknown case name, an
outputs file of the wrong kind): one line on stderr, no traceback.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from refmtp.cli.common import InputError


def _lib():
    """The golden package, imported on first use (it loads the model: CLI start-up cost)."""
    from refmtp.verification import golden

    return golden


@click.group()
def golden():
    """Golden files other implementations check themselves against (docs/golden-format.md)."""


# -------------------------------------------------------------------------------------------
@golden.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="config.json (HF DeepseekV3 names + \"refmtp\") of the model.")
@click.option("--preset", help="A named preset instead of --config: tiny, small, deepseek-v3.")
@click.option("--seed", type=click.IntRange(min=0), required=True,
              help="Seed of the weights and the tokens.")
@click.option("--batch", type=click.IntRange(min=1), default=2, show_default=True, help="B.")
@click.option("--seq-len", type=click.IntRange(min=1), default=8, show_default=True,
              help="T (tokens holds T+1 columns).")
@click.option("--dtype", type=click.Choice(["float64", "float32"]), default="float64",
              show_default=True)
@click.option("--init-std", type=float, default=None,
              help="Std of every weight matrix [default: the golden default, 0.2].")
@click.option("--bias-std", type=float, default=None,
              help="Std of the non-zero e_score_correction_bias [default: 0.05].")
@click.option("--name", help="Case name [default: the --out directory's name].")
@click.option("--description", default="", help="One line saying what the case pins.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Case directory to write (replaced if it exists).")
def export(config_path, preset, seed, batch, seq_len, dtype, init_std, bias_std, name,
           description, out_dir):
    """Write one model case for any valid config: random weights from the seed (non-zero
    e_score_correction_bias), random tokens, outputs, losses, every gradient, routing."""
    lib = _lib()
    from refmtp.config import ConfigError, ModelConfig
    from refmtp.config import preset as get_preset

    if (config_path is None) == (preset is None):
        raise click.UsageError("give exactly one of --config FILE or --preset NAME")
    try:
        cfg = ModelConfig.load(config_path) if config_path else get_preset(preset)
    except ConfigError as exc:
        raise InputError(str(exc)) from None
    for option, std in (("--init-std", init_std), ("--bias-std", bias_std)):
        if std is not None and not 0 <= std < float("inf"):
            raise InputError(f"{option} {std} must be a finite number >= 0")
    _check_sizes(cfg, batch, seq_len, dtype)
    argv = ["refmtp", "golden", "export",
            *(["--config", config_path] if config_path else ["--preset", preset]),
            "--seed", str(seed), "--batch", str(batch), "--seq-len", str(seq_len), "--dtype", dtype]
    kw = {}
    if init_std is not None:
        argv += ["--init-std", repr(init_std)]
        kw["init_std"] = init_std
    if bias_std is not None:
        argv += ["--bias-std", repr(bias_std)]
        kw["bias_std"] = bias_std
    if name:
        argv += ["--name", name]
    if description:
        argv += ["--description", description]
    argv += ["--out", out_dir]
    try:
        m = lib.export_model_case(out_dir, cfg, seed=seed, batch=batch, seq_len=seq_len,
                                  dtype=dtype, name=name, description=description,
                                  command=shlex.join(argv), **kw)
    except (ValueError, OSError) as exc:
        raise InputError(str(exc).splitlines()[0]) from None
    size = sum(e["bytes"] for e in m["files"].values())
    click.echo(f"wrote case {m['case']} to {out_dir}: {len(m['tensors'])} expected tensors, "
               f"{size / 1024:.1f} KiB")


def _check_sizes(cfg, batch: int, seq_len: int, dtype: str) -> None:
    """Inputs within max_position_embeddings and a case that fits in memory, before any work."""
    from refmtp.memory import check_memory, forward_bytes

    if seq_len > cfg.max_position_embeddings:
        raise InputError(f"--seq-len {seq_len} exceeds the config's max_position_embeddings="
                         f"{cfg.max_position_embeddings}: lower --seq-len")
    try:
        check_memory(forward_bytes(cfg, batch, seq_len, dtype, gradients=True),
                     f"this case ({dtype}, batch {batch} x seq_len {seq_len})",
                     "golden cases are for small configs: use --preset tiny or a smaller config")
    except ValueError as exc:
        raise InputError(str(exc)) from None


# -------------------------------------------------------------------------------------------
@golden.command()
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False),
              help="Recipe JSON [default: the shipped golden/recipe.json].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Where to write the cases [default: next to the recipe].")
@click.option("--case", "cases", multiple=True, help="Only these cases (repeatable).")
def generate(recipe_path, out_dir, cases):
    """Regenerate every shipped case from golden/recipe.json (byte-identical when re-run)."""
    lib = _lib()
    try:
        names = lib.generate(out_dir, recipe_path, only=cases or None,
                             log=click.echo)
    except lib.GoldenError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except (ValueError, OSError) as exc:
        raise InputError(str(exc).splitlines()[0]) from None
    except (ImportError, AttributeError, TypeError) as exc:  # a recipe builder that is no function
        raise InputError(f"the recipe names a builder that cannot be called "
                         f"({type(exc).__name__}: {exc}): fix its 'builder' entry") from None
    root = Path(out_dir) if out_dir else (Path(recipe_path).parent if recipe_path else lib.shipped_dir())
    total = sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and "__pycache__" not in f.parts)
    click.echo(f"{len(names)} cases in {root} ({total / 1e6:.2f} MB in that directory)")


# -------------------------------------------------------------------------------------------
@golden.command()
@click.argument("path", required=False, metavar="[CASE|DIR]", type=click.Path())
@click.option("--all", "all_cases", is_flag=True, help="Verify every shipped case.")
@click.option("--backend", type=click.Choice(["numpy", "cupy"]), default="numpy",
              show_default=True, help="Backend of the recomputation.")
@click.option("--against", type=click.Path(dir_okay=False),
              help="Another implementation's outputs to compare: safetensors with the golden key "
                   "names (JSON {case: decision} for the acceptance case).")
@click.option("--allow-missing", is_flag=True,
              help="With --against: outputs the file lacks are listed as not checked and do not fail.")
@click.option("-v", "--verbose", is_flag=True, help="Full tables even when verifying many cases.")
@click.option("--precision", metavar="bf16|fp16|fp32",
              help="With --against: judge a reduced-precision implementation with statistics "
                   "(relative errors, top-1, KL, routing agreement) against thresholds derived "
                   "from refmtp's emulated runs (docs/precision.md).")
def verify(path, all_cases, backend, against, allow_missing, verbose, precision):
    """Check hashes, then recompute a case (or compare --against) within its tolerances.

    CASE is the name of a shipped case (`refmtp golden list`); DIR a case directory or a golden
    root (all its cases); none, or --all, verifies every shipped case. An existing path wins
    over a case name. Exit 0 pass, 1 mismatch, 2 unreadable, tampered or bad input."""
    if precision is not None and precision not in ("bf16", "fp16", "fp32"):
        click.echo(f"error: --precision {precision!r}: choose one of bf16, fp16, fp32", err=True)
        sys.exit(2)
    if precision is not None and not against:
        click.echo("error: --precision judges another implementation's outputs: give --against OUT",
                   err=True)
        sys.exit(2)
    lib = _lib()
    if all_cases and path:
        raise click.UsageError("give a CASE, a DIR or --all, not both")
    try:
        if path is not None and not Path(path).exists():
            shipped = lib.shipped_case(path)
            if shipped is None:
                raise lib.GoldenError(f"{path}: no such case or directory; `refmtp golden list` "
                                      "shows the shipped cases")
            path = str(shipped)
        if path is None:
            dirs = lib.case_dirs(lib.shipped_dir())
        elif Path(path).is_dir() and not (Path(path) / lib.MANIFEST).exists() \
                and (any(Path(path).glob(f"*/{lib.MANIFEST}")) or (Path(path) / lib.RECIPE).exists()):
            dirs = lib.case_dirs(path)
        else:
            dirs = [Path(path)]
        if against and len(dirs) != 1:
            raise click.UsageError("--against compares one case: give its name or directory")
    except lib.GoldenError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    if precision is not None:
        _verify_precision(dirs[0], against, precision, allow_missing)
    many = len(dirs) > 1
    worst = 0
    for d in dirs:
        try:
            report = lib.verify_case(d, backend=backend, against=against, allow_missing=allow_missing)
        except lib.GoldenError as exc:
            click.echo(f"error: {exc}", err=True)
            worst = 2
            continue
        except Exception as exc:  # BackendUnavailable and the like: one line, exit 2
            from refmtp.backends import BackendUnavailable

            if isinstance(exc, BackendUnavailable):
                click.echo(f"error: {exc}", err=True)
                sys.exit(2)
            raise
        click.echo(lib.format_report(report, verbose=verbose or not many))
        if report.status != "pass":
            click.echo("\n".join(_diagnosis(report, d)))
        worst = max(worst, report.exit_code)
    if many:
        click.echo(f"{len(dirs)} cases: {'all pass' if worst == 0 else 'FAILURES (exit ' + str(worst) + ')'}")
    sys.exit(worst)


def _verify_precision(case_dir, against, precision, allow_missing):
    """The reduced-precision verdict of one case: the statistics table, PASS/FAIL, exit 0/1/2."""
    from refmtp.verification.golden import precision as prec

    lib = _lib()
    try:
        report = prec.verify_precision(case_dir, against, precision, allow_missing=allow_missing)
    except lib.GoldenError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    click.echo(prec.format_precision_report(report))
    sys.exit(report.exit_code)


def _diagnosis(report, case_dir) -> list[str]:
    """The earliest failing tensor and the likely causes from the bug catalog (docs/conformance.md)."""
    from refmtp.verification import conformance as conf

    lib = _lib()
    try:
        prints = conf.load_fingerprints()
    except lib.GoldenError as exc:
        prints = None
        click.echo(f"  note: {exc}", err=True)
    return ["  diagnosis:"] + ["  " + line for line in conf.diagnose(report, prints, conf.n_layers(Path(case_dir)))]


# -------------------------------------------------------------------------------------------
@golden.command(name="list")
def list_():
    """The shipped cases: name, kind, dtype, expected tensors (or records), description.

    Verify one by name: `refmtp golden verify NAME [--against OUT]`."""
    lib = _lib()
    try:
        cases = lib.list_cases()
    except lib.GoldenError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    wn = max(len(c["name"]) for c in cases)
    wk = max(len(c["kind"]) for c in cases)
    wc = max(len(f"{c['count']} {c['unit']}") for c in cases)
    for c in cases:
        count = f"{c['count']} {c['unit']}"
        click.echo(f"{c['name']:<{wn}}  {c['kind']:<{wk}}  {c['dtype']:<7}  {count:>{wc}}  {c['description']}")


# -------------------------------------------------------------------------------------------
@golden.command()
@click.option("--write", is_flag=True,
              help="Write golden/conformance.json and the tables of docs/conformance.md.")
@click.option("--doc", "doc_path", type=click.Path(dir_okay=False),
              help="The page whose generated part to rewrite [default with --write: "
                   "docs/conformance.md when it exists next to golden/].")
@click.option("--mutant", "mutants", multiple=True, help="Only these mutants (repeatable).")
@click.option("--list", "list_only", is_flag=True, help="List the bug catalog and exit.")
def conformance(write, doc_path, mutants, list_only):
    """Run the bug catalog against every shipped case: each mutant must fail at least one case
    (docs/conformance.md). Exit 0 when every mutant is caught and none crashes, else 1."""
    from refmtp.verification import conformance as conf
    from refmtp.mutation import CATALOG, IDS

    if list_only:
        for m in CATALOG:
            click.echo(f"{m.id:<40} {m.component:<12} {m.what}" + (f" [{m.source}]" if m.source else ""))
        return
    unknown = [m for m in mutants if m not in IDS]
    if unknown:
        click.echo(f"error: unknown mutant {unknown[0]!r} (`refmtp golden conformance --list`)", err=True)
        sys.exit(2)
    if write and mutants:
        raise click.UsageError("--write regenerates the whole catalog: drop --mutant")
    lib = _lib()
    root = lib.shipped_dir()
    if write:
        target = Path(doc_path) if doc_path else root.parent / "docs" / "conformance.md"
        if not target.parent.is_dir():
            click.echo(f"error: {target.parent} does not exist: give --doc PATH", err=True)
            sys.exit(2)
    try:
        result = conf.run_catalog(root, mutants=mutants or None, log=click.echo)
    except lib.GoldenError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    missed = [m for m, p in result.prints.items() if not p]
    if write:
        conf.write_fingerprints(result, root / conf.FINGERPRINTS, root)
        old = target.read_text(encoding="utf-8") if target.is_file() else ""
        target.write_text(conf.render_page(old, result), encoding="utf-8")
        click.echo(f"wrote {root / conf.FINGERPRINTS} and {target}")
    n = len(result.prints)
    click.echo(f"{n - len(missed)} of {n} mutants caught by at least one case"
               + (f"; NOT caught: {', '.join(missed)}" if missed else "")
               + (f"; crashed: {', '.join(result.errors)}" if result.errors else ""))
    sys.exit(1 if missed or result.errors else 0)


# -------------------------------------------------------------------------------------------
@golden.command()
@click.option("--write", is_flag=True,
              help="Write golden/precision_thresholds.json and the table of docs/precision.md.")
@click.option("--doc", "doc_path", type=click.Path(dir_okay=False),
              help="The page whose generated table to rewrite [default with --write: "
                   "docs/precision.md when it exists next to golden/].")
def precision(write, doc_path):
    """Derive the thresholds of `verify --precision`: emulate every shipped model, decode and speculative case
    in bf16, fp16 and fp32, take the worst statistic per group, apply the margins
    (docs/precision.md). Prints the table; --write stores it."""
    from refmtp.verification.golden import precision as prec

    lib = _lib()
    root = lib.shipped_dir()
    target = Path(doc_path) if doc_path else root.parent / "docs" / "precision.md"
    if write and not target.parent.is_dir():
        click.echo(f"error: {target.parent} does not exist: give --doc PATH", err=True)
        sys.exit(2)
    try:
        data = prec.derive_thresholds(root, log=click.echo)
    except lib.GoldenError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except ValueError as exc:  # bf16 without ml_dtypes
        click.echo(f"error: {str(exc).splitlines()[0]}", err=True)
        sys.exit(2)
    click.echo(prec.render_table(data))
    if write:
        path = prec.write_thresholds(data, root / prec.THRESHOLDS)
        old = target.read_text(encoding="utf-8") if target.is_file() else ""
        target.write_text(prec.render_doc(old, data), encoding="utf-8")
        click.echo(f"wrote {path} and {target}")
