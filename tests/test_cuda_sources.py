"""Every CUDA source in backends/ compiles with nvcc, with every templated kernel that a CuPy
wrapper asks for instantiated (taking a specialisation's address forces instantiation, so type
errors inside template bodies surface too). Runs without a GPU; skipped when nvcc is absent."""
from __future__ import annotations

import importlib
import shutil
import subprocess
from collections import defaultdict

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
        [NVCC, "-std=c++17", "-arch=sm_90", "--ptx", str(wrapper), "-o", str(tmp_path / f"{cu}.ptx")],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, f"nvcc failed on backends/{cu}.cu:\n{res.stderr[-3000:]}"
    assert "--use_fast_math" not in cupy_kernels.NVRTC_OPTIONS
