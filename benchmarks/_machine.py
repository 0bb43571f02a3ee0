"""The machine a benchmark ran on, as a JSON-ready dict (shared by every benchmark script).

    from _machine import machine_info, write_result   # benchmarks/ is the script's directory
    info = machine_info()

Keys: cpu_model (from /proc/cpuinfo, else platform), cpu_count (logical), cpu_affinity (cores this
process may use), platform, python, numpy, numpy_blas (name and version numpy was built with,
plus its configuration line), numba, scipy, cupy (version or why it is unavailable), gpu and
gpu_driver / cuda_runtime when the cupy backend works, refmtp, and the thread-count variables
that change BLAS timings (OMP_NUM_THREADS, OPENBLAS_NUM_THREADS, MKL_NUM_THREADS,
NUMBA_NUM_THREADS, REFMTP_KERNELS).
"""
from __future__ import annotations

import os
import platform


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _cpu_id() -> dict:
    """The first CPU's family, model and AVX-512 flag from /proc/cpuinfo ("AMD EPYC" alone names
    several generations: family 25 is Zen 3/4, family 26 Zen 5); {} where there is none."""
    out = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip().lower().replace(" ", "_"), value.strip()
                if key in ("cpu_family", "model") and key not in out:
                    out[key] = int(value) if value.isdigit() else value
                elif key == "flags":
                    out["avx512f"] = "avx512f" in value.split()
                    break
    except OSError:
        pass
    return out


def _blas() -> dict:
    import numpy as np

    try:
        deps = np.show_config(mode="dicts").get("Build Dependencies", {})
        blas = deps.get("blas", {})
        out = {"name": blas.get("name", "unknown"), "version": blas.get("version", "unknown")}
        if "openblas configuration" in blas:
            out["configuration"] = blas["openblas configuration"]
        return out
    except Exception as exc:  # older numpy without mode="dicts"
        return {"name": "unknown", "error": str(exc)}


def _version(module: str) -> str:
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "unknown")
    except ImportError as exc:
        return f"unavailable ({exc})"


def machine_info() -> dict:
    """Describe this machine and software stack (never raises for a missing optional piece)."""
    import numpy as np

    info = {
        "cpu_model": _cpu_model(),
        "cpu_id": _cpu_id(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numpy_blas": _blas(),
        "numba": _version("numba"),
        "scipy": _version("scipy"),
        "cupy": _version("cupy"),
        "refmtp": _version("refmtp"),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                            "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
                                            "REFMTP_KERNELS") if k in os.environ},
    }
    try:
        from refmtp.backends import BackendUnavailable, get_backend

        try:
            desc = get_backend("cupy").describe()
            info["gpu"] = desc.get("gpu")
            info["gpu_driver"] = desc.get("driver")
            info["cuda_runtime"] = desc.get("runtime")
        except BackendUnavailable as exc:
            info["gpu"] = None
            info["gpu_unavailable"] = str(exc)
    except ImportError:  # refmtp not installed: still describe the machine
        info["gpu"] = None
    return info


if __name__ == "__main__":
    import json

    print(json.dumps(machine_info(), indent=2))


def write_result(path, result: dict):
    """Write a benchmark's JSON result (creating the folder) and say where; returns the Path."""
    import json
    from pathlib import Path

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return out


def write_between_markers(page, begin: str, end: str, text: str) -> bool:
    """Replace what lies between the ``begin`` and ``end`` markers of the file ``page`` by
    ``text`` (a generated table); False, and nothing written, when a marker is missing."""
    from pathlib import Path

    page = Path(page)
    old = page.read_text()
    if begin not in old or end not in old:
        return False
    head, rest = old.split(begin, 1)
    _, tail = rest.split(end, 1)
    page.write_text(f"{head}{begin}\n{text}\n{end}{tail}")
    return True
