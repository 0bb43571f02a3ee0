"""The CuPy RawKernel table of the cupy backend, and the plumbing every CuPy wrapper shares.

CUDA sources live next to this file as ``<op>.cu``; each is read as text and compiled lazily
on first call by :class:`LazyKernel` (never at import), with float and double instantiations
and no fast-math. Each ``cupy_<op>.py`` module defines ``KERNELS`` mapping a kernel name to a
wrapper with the exact signature of the plain array reference in ``refmtp/``.

Shared by every wrapper (written once, here):

* :func:`cuda_type` -- the only dtype -> C type map ("float" / "double");
* :func:`launch` -- the only grid/block sizing (1-d grid-stride launches);
* ``NVRTC_OPTIONS`` -- the one place kernels are compiled from, with ``-I<backends dir>`` so
  ``#include "refmtp_common.cuh"`` (the shared round-to-nearest helpers) resolves.

Argument contracts live in :mod:`refmtp.backends.contracts` (shared with the Numba wrappers).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

CU_DIR = Path(__file__).parent
COMMON_HEADER = CU_DIR / "refmtp_common.cuh"
INCLUDE_OPTION = f"-I{CU_DIR}"  # nvcc and NVRTC spell it the same
NVRTC_OPTIONS = ("--std=c++17", INCLUDE_OPTION)

THREADS = 256  # default block size of a 1-d launch
MAX_BLOCKS = 65535  # grid cap; every kernel's grid-stride loop covers the rest


def cu_source(name: str) -> str:
    """Text of ``backends/<name>.cu``."""
    return (CU_DIR / f"{name}.cu").read_text()


def _compile_source(name: str) -> str:
    """The code handed to NVRTC: the .cu text plus a trailing comment with the shared header's
    hash. CuPy's on-disk kernel cache keys on the code and options only, not on included
    files, so an edited refmtp_common.cuh must change the code to force a recompile."""
    digest = hashlib.sha256(COMMON_HEADER.read_bytes()).hexdigest()[:16]
    return cu_source(name) + f"\n// refmtp_common.cuh sha256 {digest}\n"


def cuda_type(dtype, what: str) -> str:
    """The C++ template argument for a float dtype: "float" or "double" (others raise)."""
    import numpy as np

    if dtype == np.float32:
        return "float"
    if dtype == np.float64:
        return "double"
    raise TypeError(f"{what} kernel handles float32 and float64, got {dtype}")


def grid_blocks(n_items: int, items_per_block: int, max_blocks: int | None = None) -> int:
    """Blocks of a 1-d grid covering ``n_items`` at ``items_per_block`` each, capped at
    ``max_blocks`` (default :data:`MAX_BLOCKS`, read at call time); at least 1."""
    cap = MAX_BLOCKS if max_blocks is None else max_blocks
    return max(1, min((int(n_items) + items_per_block - 1) // items_per_block, cap))


def launch(kernel, n_items: int, args: tuple, *, threads: int = THREADS,
           items_per_block: int | None = None, shared_mem: int = 0) -> None:
    """Launch ``kernel`` (a compiled RawKernel function) over ``n_items`` work items.

    1-d grid of ``threads``-wide blocks, one item per thread (``items_per_block`` defaults to
    ``threads``; pass 1 for one block per item, e.g. a row reduction), at most
    :data:`MAX_BLOCKS` blocks: the kernels' grid-stride loops cover the rest. Nothing is
    launched when ``n_items <= 0``.
    """
    if n_items <= 0:
        return
    blocks = grid_blocks(n_items, threads if items_per_block is None else items_per_block)
    kernel((blocks,), (threads,), args, shared_mem=shared_mem)


def cu_files() -> list[Path]:
    return sorted(CU_DIR.glob("*.cu"))


class LazyKernel:
    """A templated kernel from ``<file>.cu`` compiled on first use (thinc's LazyKernel idea)."""

    instances: list["LazyKernel"] = []  # every kernel module declared, for the nvcc compile test

    def __init__(self, file: str, name_expressions: list[str]):
        LazyKernel.instances.append(self)
        self.file = file
        self.name_expressions = list(name_expressions)
        self._module = None

    def get(self, name_expression: str):
        if self._module is None:
            import cupy

            try:
                self._module = cupy.RawModule(
                    code=_compile_source(self.file),
                    options=NVRTC_OPTIONS,
                    name_expressions=self.name_expressions,
                )
            except Exception as exc:  # cupy.cuda.compiler.CompileException
                raise RuntimeError(
                    f"could not compile CUDA kernels in backends/{self.file}.cu: {exc}"
                ) from None
        return self._module.get_function(name_expression)

    def launch(self, name_expression: str, n_items: int, args: tuple, **kw) -> None:
        """:func:`launch` of ``name_expression`` (compiled only when there is work)."""
        if n_items > 0:
            launch(self.get(name_expression), n_items, args, **kw)
