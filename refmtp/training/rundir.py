"""The run directory of a training run: its files, the checkpoint directories and ``latest``.

    run_dir/run.json            settings, model config, data fingerprint (format "refmtp-run")
    run_dir/metrics.jsonl       one JSON object per logged step
    run_dir/latest              the name of the newest complete checkpoint
    run_dir/checkpoint-NNNNNNN/ config.json, model.safetensors, optimizer.safetensors,
                                trainer_state.json

A checkpoint is written into ``ckpt.tmp/`` and renamed with ``os.replace``, then ``latest`` is
replaced the same way, then older checkpoints are removed: a crash never leaves a half-written
checkpoint under a final name (docs/training.md).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

RUN_FORMAT = "refmtp-run"
RUN_FORMAT_VERSION = 1
STATE_FILE = "trainer_state.json"  # the last file of a checkpoint: present means complete


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:07d}"


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def latest_checkpoint(run_dir) -> Path | None:
    """The newest complete checkpoint of a run (``latest``, else the highest numbered)."""
    run_dir = Path(run_dir)
    pointer = run_dir / "latest"
    if pointer.is_file():
        cand = run_dir / pointer.read_text().strip()
        if (cand / STATE_FILE).is_file():
            return cand
    done = sorted(p for p in run_dir.glob("checkpoint-*") if (p / STATE_FILE).is_file())
    return done[-1] if done else None


def write_checkpoint(run_dir: Path, step: int, contents: Callable[[Path], None]) -> Path:
    """Write checkpoint ``step`` of the run: ``contents(tmp_dir)`` fills a temporary directory
    (ending with STATE_FILE), which is renamed to its final name; then ``latest`` points to it
    and older checkpoints are removed. Returns the checkpoint directory."""
    final = run_dir / checkpoint_name(step)
    if final.is_dir() and (final / STATE_FILE).is_file():
        return final  # already saved at this step: identical content
    tmp = run_dir / "ckpt.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)  # leftover of an interrupted save
    tmp.mkdir()
    contents(tmp)
    if final.exists():
        shutil.rmtree(final)  # an incomplete directory under the final name
    os.replace(tmp, final)
    (run_dir / "latest.tmp").write_text(final.name + "\n")
    os.replace(run_dir / "latest.tmp", run_dir / "latest")
    for old in run_dir.glob("checkpoint-*"):
        if old != final and old.is_dir():
            shutil.rmtree(old)
    return final


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics logged after ``step`` (written before a crash, past the checkpoint)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            break  # a torn last line
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
