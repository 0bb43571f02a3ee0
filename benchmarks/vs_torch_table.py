"""The issue-17 targets table of docs/performance.md, generated from ``vs_torch.py`` results.

    python benchmarks/vs_torch_table.py benchmarks/results/vs_torch_issue17.json \
        benchmarks/results/vs_torch_issue17_small.json            # print the table
    python benchmarks/vs_torch_table.py ... --write-docs              # and put it into the page

One row per (result file, case, thread count): tokens/s of both sides (median over the
alternations), the refmtp/torch ratio with its per-alternation median, min and max, refmtp's
share of the GEMM peak measured in the same run (on the causal FLOP count, the full-square count
beside it; then per alternation against the peak sampled right after that alternation's steps,
median and range, where the results have it), the peak resident memory of one step per side, the OpenBLAS kernels of the run and the
1-minute load average. The rows sit between the ``vs-torch-issue17`` markers of
docs/performance.md (``--markers NAME``: between the ``NAME`` markers instead). Not a test.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _machine import write_between_markers  # noqa: E402

REPO = HERE.parent
DOCS = REPO / "docs" / "performance.md"
MARKERS = "vs-torch-issue17"  # <!-- NAME:begin --> ... <!-- NAME:end --> in docs/performance.md
TARGET_RATIO, TARGET_PEAK = 1.3, 50.0  # issue 17: >= 1.3x torch at 1 and 2 threads, >= 50% of peak at 1


def cores(timing: dict) -> str:
    """How refmtp used the row's cores (vs_torch.refmtp_schedule; older results: BLAS threads)."""
    s = timing.get("refmtp_schedule") or {"mode": "blas", "blas_threads": timing.get("blas_threads")}
    if s["mode"] == "threads":
        return f"{s['workers']} workers x BLAS {s['blas_threads']}"
    return f"BLAS {s['blas_threads']}"


def rows(result: dict) -> list:
    out = []
    for case in result["results"]:
        for t in case["timings"]:
            r, a = t["refmtp"], t["ratio_per_alternation"]
            out.append({
                "config": f"{case['preset']} (B x T = {case['batch']} x {case['seq']})",
                "threads": t["threads"],
                "refmtp": r["tokens_per_s"], "torch": t["torch"]["tokens_per_s"],
                "ratio": t["ratio_refmtp_over_torch"], "alt": (a["median"], a["min"], a["max"]),
                "peak": r["pct_of_gemm_peak"], "peak_full": r.get("pct_of_gemm_peak_full_square"),
                "beside": r.get("pct_of_peak_beside_steps"),
                "rss": (t["peak_rss"]["refmtp"]["step_mib"], t["peak_rss"]["torch"]["step_mib"]),
                "load": t["load_average_1m"][0],
                "kernels": result.get("context_start", {}).get("blas_kernel") or "?",
                "cores": cores(t),
            })
    return out


def table(results: list) -> str:
    head = ("| config | threads | refmtp on them | refmtp tok/s | torch tok/s | ratio | per alternation: median "
            "(min-max) | % of GEMM peak (full square) | % of the peak beside each step: median (min-max) | step RSS MiB refmtp / torch | OpenBLAS kernels | load 1 min |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for res in results:
        for w in rows(res):
            full = f" ({w['peak_full']:.1f})" if w["peak_full"] is not None else ""
            ok_ratio = "**" if w["ratio"] >= TARGET_RATIO else ""
            b = w["beside"]
            beside = "-" if b is None else f"{b['median']:.1f}% ({b['min']:.1f}-{b['max']:.1f})"
            lines.append(
                f"| {w['config']} | {w['threads']} | {w['cores']} | {w['refmtp']:,.0f} | {w['torch']:,.0f} | "
                f"{ok_ratio}{w['ratio']:.2f}x{ok_ratio} | {w['alt'][0]:.2f}x ({w['alt'][1]:.2f}-{w['alt'][2]:.2f}) | "
                f"{w['peak']:.1f}%{full} | {beside} | {w['rss'][0]:.0f} / {w['rss'][1]:.0f} | {w['kernels']} | {w['load']:.1f} |")
    first = results[0]
    lines.append("")
    cid = first["machine"].get("cpu_id") or {}
    family = f", CPU family {cid['cpu_family']} model {cid['model']}" if "cpu_family" in cid and "model" in cid else ""
    lines.append(f"Measured {first['date'][:16].replace('T', ' ')} UTC on {first['machine']['cpu_model']} "
                 f"({first['machine']['cpu_count']} cores{family}), numpy {first['machine']['numpy']} with "
                 f"{first['machine']['numpy_blas']['name']} {first['machine']['numpy_blas']['version']}, torch "
                 f"{first['torch']}, float32, median of {first['repeats']} alternations; bold: the ratio "
                 f"meets the target ({TARGET_RATIO}x). Written by `python benchmarks/vs_torch_table.py ... "
                 "--write-docs`.")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="vs_torch.py JSON files")
    ap.add_argument("--write-docs", action="store_true", help="replace the table in docs/performance.md")
    ap.add_argument("--markers", default=MARKERS, help="the NAME of the <!-- NAME:begin/end --> block to write")
    args = ap.parse_args(argv)
    results = []
    for f in args.results:
        try:
            results.append(json.loads(Path(f).read_text()))
        except (OSError, ValueError) as exc:
            print(f"vs_torch_table: cannot read {f}: {exc}", file=sys.stderr)
            return 2
    text = table(results)
    print(text)
    if args.write_docs:
        begin, end = f"<!-- {args.markers}:begin -->", f"<!-- {args.markers}:end -->"
        if not write_between_markers(DOCS, begin, end, text):
            print(f"vs_torch_table: {DOCS.name} has no {begin} ... {end} block", file=sys.stderr)
            return 2
        print(f"wrote the table into {DOCS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
