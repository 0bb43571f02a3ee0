"""Every CUDA source in backends/ compiles with nvcc, with every templated kernel that a CuPy
wrapper asks for instantiated (taking a specialisation's address forces instantiation, so type
errors inside template bodies surface too). Runs without a GPU; skipped when nvcc is absent."""
from __future__ import annotations

import importlib
import shutil
import re
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

from refmtp.backends import cupy_kernels

NVCC = shutil.which("nvcc")


def _declared_kernels() -> dict[str, list[str]]:
    # Importing the wrapper modules never imports cupy (they import it inside functions).
    for mod in ("cupy_rope", "cupy_xent", "cupy_moe", "cupy_accept", "cupy_scatter"):
        importlib.import_module(f"refmtp.backends.{mod}")
    by_file = defaultdict(list)
    for lk in cupy_kernels.LazyKernel.instances:
        by_file[lk.file].extend(lk.name_expressions)
    return by_file


def test_every_cu_file_is_used_by_a_wrapper():
    declared = _declared_kernels()
    files = {p.stem for p in cupy_kernels.cu_files()}
    assert files, "no .cu files found in backends/"
    assert files == set(declared), f"cu files {sorted(files)} vs wrappers {sorted(declared)}"


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH: CUDA sources not compiled here")
@pytest.mark.parametrize("cu", sorted(p.stem for p in cupy_kernels.cu_files()))
def test_cu_compiles_with_nvcc(cu, tmp_path):
    names = _declared_kernels()[cu]
    src = cupy_kernels.CU_DIR / f"{cu}.cu"
    lines = [f'#include "{src}"', "void refmtp_instantiate_all() {"]
    lines += [f"    (void)&{n};" for n in names]
    lines.append("}")
    wrapper = tmp_path / f"{cu}_instantiate.cu"
    wrapper.write_text("\n".join(lines) + "\n")
    res = subprocess.run(
        [NVCC, "-std=c++17", cupy_kernels.INCLUDE_OPTION, "-arch=sm_90", "--ptx", str(wrapper),
         "-o", str(tmp_path / f"{cu}.ptx")],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, f"nvcc failed on backends/{cu}.cu:\n{res.stderr[-3000:]}"
    assert "--use_fast_math" not in cupy_kernels.NVRTC_OPTIONS


# -------------------------------------------------------------------------------------------
# The plumbing written once: the shared header, its include path, the launch helper, the C type map
# -------------------------------------------------------------------------------------------
RN_INTRINSICS = ("__fadd_rn", "__dadd_rn", "__fmul_rn", "__dmul_rn", "__fsub_rn", "__dsub_rn")


def _code(text: str) -> str:
    return re.sub(r"//[^\n]*", "", text)  # comments may name what the code uses


@pytest.mark.parametrize("cu", sorted(p.stem for p in cupy_kernels.cu_files()))
def test_every_cu_includes_the_common_header_and_nothing_else(cu):
    code = _code(cupy_kernels.cu_source(cu))
    assert re.findall(r"#include\s+(\S+)", code) == ['"refmtp_common.cuh"']
    # the round-to-nearest helpers live in the header only
    assert not any(f in code for f in RN_INTRINSICS), f"{cu}.cu calls an _rn intrinsic directly"


def test_common_header_ships_and_is_on_the_include_path():
    header = cupy_kernels.COMMON_HEADER
    assert header.is_file() and header.parent == cupy_kernels.CU_DIR
    assert all(f in header.read_text() for f in RN_INTRINSICS)
    assert cupy_kernels.INCLUDE_OPTION == f"-I{cupy_kernels.CU_DIR}"
    assert cupy_kernels.INCLUDE_OPTION in cupy_kernels.NVRTC_OPTIONS
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert re.search(r'"refmtp\.backends" = \[[^]]*"\*\.cuh"', pyproject), "package-data lacks *.cuh"
    # the code NVRTC compiles carries the header's hash (CuPy's disk cache ignores included files)
    src = cupy_kernels._compile_source("rope")
    assert src.startswith(cupy_kernels.cu_source("rope")) and "refmtp_common.cuh sha256" in src


def test_grid_sizing_is_the_launch_helper():
    g = cupy_kernels.grid_blocks
    assert g(1, 256) == 1 and g(256, 256) == 1 and g(257, 256) == 2
    assert g(10**9, 256) == cupy_kernels.MAX_BLOCKS and g(10**9, 256, max_blocks=2) == 2
    assert g(70000, 1) == cupy_kernels.MAX_BLOCKS and g(9, 1) == 9
    calls = []
    cupy_kernels.launch(lambda *a, **k: calls.append((a, k)), 0, ())
    assert calls == []  # nothing to do: no launch (a 0-block grid is a CUDA error)
    cupy_kernels.launch(lambda *a, **k: calls.append((a, k)), 300, ("x",), threads=128)
    assert calls == [(((3,), (128,), ("x",)), {"shared_mem": 0})]
    # no wrapper sizes a grid itself
    for mod in ("cupy_rope", "cupy_xent", "cupy_moe", "cupy_accept", "cupy_scatter"):
        text = _code((cupy_kernels.CU_DIR / f"{mod}.py").read_text())
        assert "65535" not in text and "_THREADS" not in text and "blocks" not in text, mod
        assert not re.search(r"\b_[A-Z]+\.get\(", text), f"{mod} launches a kernel without cupy_kernels.launch"


def test_cuda_type_is_the_only_dtype_map():
    import numpy as np

    assert cupy_kernels.cuda_type(np.dtype("float32"), "t") == "float"
    assert cupy_kernels.cuda_type(np.float64, "t") == "double"
    with pytest.raises(TypeError, match="t kernel handles float32 and float64, got int64"):
        cupy_kernels.cuda_type(np.dtype("int64"), "t")
    for mod in ("cupy_rope", "cupy_xent", "cupy_moe", "cupy_accept", "cupy_scatter"):
        text = _code((cupy_kernels.CU_DIR / f"{mod}.py").read_text())
        assert '"float" if' not in text and '<float>" if' not in text and "_CTYPE" not in text, mod
