"""Benchmark: forward+backward time per step and cached-decoding time per token, two refmtp
installs alternated in one run (a before/after check for a change that must not slow either).

    python benchmarks/step_and_token.py --python /path/to/other/venv/bin/python --label-other before
    python benchmarks/step_and_token.py                     # this install only

Each round runs a fresh process per install (``--rounds`` rounds, the two alternating, so a noisy
shared machine affects both alike): the median over 7 forward+backward steps of the preset at
(B, T) = (4, 64) in float32 after one warm-up, and the median over 5 repeats of 48 single-token
``Decoder.main`` calls after a 16-token prefill. Prints a table and writes
``benchmarks/results/step_and_token.json`` with the machine, the BLAS threads and the load.
Not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import sys
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _machine import machine_info, write_result  # noqa: E402

PROBE = r"""
import json, statistics, sys, time
import numpy as np
from refmtp.config import preset
from refmtp.model import init_params, forward, backward
try:
    from refmtp.inference.decode import Decoder
except ImportError:  # installs from before the layered layout
    from refmtp.decode import Decoder
cfg = preset(sys.argv[1])
params = init_params(cfg, seed=0, dtype="float32")
tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(4, 65)).astype(np.int64)
forward(params, cfg, tokens)
steps = []
for _ in range(7):
    t = time.perf_counter(); out, cache = forward(params, cfg, tokens); backward(cache)
    steps.append(time.perf_counter() - t)
dec = Decoder(params, cfg)
per_token = []
for _ in range(5):
    c = dec.new_cache("main", capacity=80)
    dec.main(tokens[:1, :16], c)
    t = time.perf_counter()
    for i in range(48):
        dec.main(tokens[:1, 16 + i:17 + i], c)
    per_token.append((time.perf_counter() - t) / 48)
print(json.dumps({"step_ms": 1e3 * statistics.median(steps), "token_ms": 1e3 * statistics.median(per_token)}))
"""


def probe(python: str, preset: str, env: dict) -> dict:
    # cwd outside any checkout: "python -c" puts the cwd first on sys.path
    out = subprocess.run([python, "-c", PROBE, preset], capture_output=True, text=True, env=env, check=True,
                         cwd=tempfile.gettempdir())
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", default=None, help="the other install's python (alternated with this one)")
    ap.add_argument("--label-other", default="other")
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", default="1", help="OPENBLAS_NUM_THREADS for both sides")
    ap.add_argument("--out", default=str(HERE / "results" / "step_and_token.json"))
    args = ap.parse_args()
    env = {**os.environ, "OPENBLAS_NUM_THREADS": args.threads, "OMP_NUM_THREADS": args.threads}
    sides = [("this", sys.executable)] + ([(args.label_other, args.python)] if args.python else [])
    result = {"benchmark": "step_and_token", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_info(), "threads": args.threads, "load_before": os.getloadavg(),
              "rounds": args.rounds, "sides": [label for label, _ in sides], "presets": {}}
    print(f"{'preset':<7} {'side':<10} {'step ms (median)':>17} {'min-max':>15} {'token ms (median)':>18} {'min-max':>13}")
    for name in args.presets:
        runs = {label: [] for label, _ in sides}
        for r in range(args.rounds):
            for label, py in (sides if r % 2 == 0 else sides[::-1]):  # alternate who goes first
                runs[label].append(probe(py, name, env))
        result["presets"][name] = {}
        for label, _ in sides:
            st = [x["step_ms"] for x in runs[label]]
            tk = [x["token_ms"] for x in runs[label]]
            result["presets"][name][label] = {"step_ms": st, "token_ms": tk,
                                              "step_ms_median": statistics.median(st),
                                              "token_ms_median": statistics.median(tk)}
            print(f"{name:<7} {label:<10} {statistics.median(st):>17.2f} {min(st):>7.2f}-{max(st):<7.2f}"
                  f" {statistics.median(tk):>18.3f} {min(tk):>6.3f}-{max(tk):<6.3f}")
    result["load_after"] = os.getloadavg()
    write_result(args.out, result)


if __name__ == "__main__":
    main()
