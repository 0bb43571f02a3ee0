"""Benchmark: the two schools of drafting side by side on one target (``refmtp speculate --compare``).

    python benchmarks/compare.py --ckpt runs/default --draft-ckpt runs/draft --heads-ckpt runs/heads
    python benchmarks/compare.py ... --write-docs        # also replace the table in docs/inference.md

Runs ``refmtp speculate --compare`` (plain decoding; MTP drafting K = 1..Kmax with the last module
reused past D; blockwise; the independent draft model; parallel heads) in a subprocess with one
BLAS thread, records the load average before and after, and writes
``benchmarks/results/compare.json`` (the report, the machine, the command) and the markdown
table. ``--write-docs`` puts that table between the ``compare-table`` markers of docs/inference.md,
so the documented table is always this command's output. Checkpoint paths are stored as given
(relative ones stay relative). Not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _machine import machine_info, write_between_markers, write_result  # noqa: E402

REPO = HERE.parent
DOCS = REPO / "docs" / "inference.md"
BEGIN, END = "<!-- compare-table:begin -->", "<!-- compare-table:end -->"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True, help="target checkpoint or run directory")
    ap.add_argument("--draft-ckpt", default=None)
    ap.add_argument("--heads-ckpt", default=None)
    ap.add_argument("--k", type=int, default=None, help="Kmax (default D + 1)")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--plot", default=None, help="also write the acceptance plot here")
    ap.add_argument("--out", default=str(HERE / "results" / "compare.json"))
    ap.add_argument("--write-docs", action="store_true", help="replace the table in docs/inference.md")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["refmtp", "speculate", "--ckpt", args.ckpt, "--compare", "--samples", str(args.samples),
               "--max-new-tokens", str(args.max_new_tokens), "--temperature", str(args.temperature)]
        for flag, value in (("--draft-ckpt", args.draft_ckpt), ("--heads-ckpt", args.heads_ckpt),
                            ("--k", args.k), ("--plot", args.plot)):
            if value is not None:
                cmd += [flag, str(value)]
        files = ["--json", str(Path(tmp) / "r.json"), "--markdown", str(Path(tmp) / "t.md")]
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        done = subprocess.run(cmd + files, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        load_after = os.getloadavg()
        if done.returncode != 0:
            sys.stderr.write(done.stdout + done.stderr)
            return done.returncode
        print(done.stdout)
        report = json.loads((Path(tmp) / "r.json").read_text())
        table = (Path(tmp) / "t.md").read_text().rstrip("\n")
    report.update(ckpt=args.ckpt, draft_ckpt=args.draft_ckpt, heads_ckpt=args.heads_ckpt,
                  data=report["data"].split(" (")[0])  # no machine paths in tracked files
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    info = machine_info()
    info["env"] = {k: env[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    result = {"benchmark": "compare", "date": stamp, "command": cmd, "wall_s": wall,
              "load_average_before": load_before, "load_average_after": load_after,
              "machine": info, "report": report, "markdown": table}
    write_result(args.out, result)
    if args.write_docs:
        note = (f"Measured {stamp} on {info['cpu_model']} ({info['cpu_count']} cores shared with other "
                f"jobs; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after), numpy "
                f"{info['numpy']}, one BLAS thread; written by `python benchmarks/compare.py "
                f"--write-docs` (benchmarks/results/compare.json).")
        if not write_between_markers(DOCS, BEGIN, END, f"{table}\n\n{note}"):
            print(f"{DOCS} has no {BEGIN} ... {END} block", file=sys.stderr)
            return 2
        print(f"wrote the table into {DOCS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
