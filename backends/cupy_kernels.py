"""The CuPy RawKernel table of the cupy backend.

CUDA sources live next to this file as ``<op>.cu``; each is read as text and compiled lazily
on first call by :class:`LazyKernel` (never at import), with float and double instantiations
and no fast-math. Each ``cupy_<op>.py`` module defines ``KERNELS`` mapping a kernel name to a
wrapper with the exact signature of the plain array reference in ``refmtp/``.
"""
from __future__ import annotations

from pathlib import Path

CU_DIR = Path(__file__).parent
NVRTC_OPTIONS = ("--std=c++17",)


def cu_source(name: str) -> str:
    """Text of ``backends/<name>.cu``."""
    return (CU_DIR / f"{name}.cu").read_text()


def cuda_type(dtype, what: str) -> str:
    """The C++ template argument for a float dtype: "float" or "double" (others raise)."""
    import numpy as np

    if dtype == np.float32:
        return "float"
    if dtype == np.float64:
        return "double"
    raise TypeError(f"{what} kernel handles float32 and float64, got {dtype}")


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
                    code=cu_source(self.file),
                    options=NVRTC_OPTIONS,
                    name_expressions=self.name_expressions,
                )
            except Exception as exc:  # cupy.cuda.compiler.CompileException
                raise RuntimeError(
                    f"could not compile CUDA kernels in backends/{self.file}.cu: {exc}"
                ) from None
        return self._module.get_function(name_expression)


def collect() -> dict:
    """The kernel table, built on first use (not at import, so wrapper modules may import
    LazyKernel from here in any order)."""
    from refmtp.backends import cupy_accept, cupy_moe, cupy_rope, cupy_xent

    table: dict = {}
    for mod in (cupy_rope, cupy_xent, cupy_moe, cupy_accept):
        table.update(mod.KERNELS)
    return table

