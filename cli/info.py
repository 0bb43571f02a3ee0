"""``refmtp info``: versions, usable backends, and the BLAS numpy uses."""
from __future__ import annotations

import platform
import sys

import click


def blas_info() -> str:
    """Name (and version) of the BLAS numpy links against."""
    import numpy as np

    try:
        cfg = np.show_config(mode="dicts")
        blas = cfg.get("Build Dependencies", {}).get("blas", {})
        name = blas.get("name", "unknown")
        version = blas.get("version", "")
        return f"{name} {version}".strip()
    except Exception:  # pragma: no cover - very old numpy
        return "unknown"


def collect_info() -> dict:
    import numpy as np

    from refmtp import __version__
    from refmtp.backends import available_backends

    info = {
        "refmtp": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "numpy": np.__version__,
        "blas": blas_info(),
    }
    from refmtp.backends import openblas

    info["blas_kernels"] = openblas.kernels()
    info["blas_kernel_advice"] = openblas.kernel_advice(info["blas_kernels"])
    from importlib.metadata import PackageNotFoundError, version

    dists = {"numba": "numba", "scipy": "scipy", "click": "click", "safetensors": "safetensors",
             "array_api_compat": "array-api-compat", "cupy": "cupy-cuda12x", "torch": "torch",
             "transformers": "transformers", "matplotlib": "matplotlib"}
    for mod, dist in dists.items():
        try:
            info[mod] = version(dist)
        except PackageNotFoundError:
            info[mod] = None
    if info["cupy"] is None:  # cupy may come from another wheel name (cupy-cuda11x, cupy)
        try:
            import cupy

            info["cupy"] = cupy.__version__
        except Exception:
            info["cupy"] = None
    info["backends"] = available_backends()
    try:
        from refmtp.backends import get_backend

        info["gpu"] = get_backend("cupy").describe().get("gpu")
    except Exception:
        info["gpu"] = None
    return info


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def info(as_json):
    """Print versions, usable backends (numpy, numba, cupy + GPU) and numpy's BLAS."""
    data = collect_info()
    if as_json:
        import json

        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"refmtp {data['refmtp']}  (python {data['python']}, {data['platform']})")
    click.echo(f"numpy {data['numpy']}  BLAS: {data['blas']}"
               + (f", {data['blas_kernels']} kernels" if data["blas_kernels"] else ""))
    if data["blas_kernel_advice"]:
        click.echo(f"  note: {data['blas_kernel_advice']}")
    for mod in ("numba", "scipy", "click", "safetensors", "array_api_compat"):
        mark = "ok" if data[mod] else "MISSING"
        click.echo(f"  {mod:<17} {data[mod] or '-':<10} {mark}")
    click.echo("backends:")
    for name, status in data["backends"].items():
        sym = "✓" if status == "ok" else "✗"
        click.echo(f"  {sym} {name:<6} {status}")
    click.echo(f"  {'✓' if data['numba'] else '✗'} numba kernels (numpy backend)"
               f"{'' if data['numba'] else ': pip install numba'}")
    click.echo(f"  GPU: {data['gpu'] or 'none'}")
    for mod in ("torch", "transformers", "matplotlib"):
        click.echo(f"  optional {mod:<13} {data[mod] or 'not installed'}")
