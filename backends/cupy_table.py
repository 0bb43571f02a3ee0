"""The CuPy kernel table: every RawKernel wrapper, by the name of the reference it replaces.

Importing this module imports the wrappers but never cupy itself (they compile lazily on first
use); :meth:`refmtp.backends.cupy_backend.CupyBackend._load_kernels` reads it.
"""
from __future__ import annotations

from refmtp.backends import cupy_accept, cupy_moe, cupy_rope, cupy_xent


def collect() -> dict:
    """{kernel name: wrapper} of every CuPy wrapper module."""
    table: dict = {}
    for mod in (cupy_rope, cupy_xent, cupy_moe, cupy_accept):
        table.update(mod.KERNELS)
    return table
