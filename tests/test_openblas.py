"""refmtp.backends.openblas: the OpenBLAS numpy loaded, its kernels, and the advice `refmtp info`
prints when they leave the CPU's AVX-512 unused."""
from __future__ import annotations

import pytest

from refmtp.backends import openblas

AVX512 = set(openblas.SKYLAKEX_FLAGS) | {"avx2", "fma"}


def test_advice_when_the_kernels_leave_avx512_unused():
    line = openblas.kernel_advice("Haswell", AVX512)
    assert "Haswell kernels" in line and "OPENBLAS_CORETYPE=SkylakeX" in line
    assert openblas.kernel_advice("Zen", AVX512) is not None


@pytest.mark.parametrize("chosen, flags", [
    ("SkylakeX", AVX512), ("Cooperlake", AVX512), ("SapphireRapids", AVX512),  # AVX-512 kernels already
    ("Haswell", AVX512 - {"avx512bw"}), ("Haswell", {"avx2", "fma"}),  # the CPU cannot run SkylakeX's
    ("", AVX512)])  # no OpenBLAS
def test_no_advice_otherwise(chosen, flags):
    assert openblas.kernel_advice(chosen, flags) is None


def test_the_loaded_library_answers():
    if openblas.library() is None:
        pytest.skip("numpy's BLAS here is not an OpenBLAS these helpers can reach")
    n = openblas.threads()
    assert isinstance(n, int) and n >= 1
    assert openblas.threads(1) == 1
    openblas.threads(n)
    assert openblas.threads() == n
    assert isinstance(openblas.kernels(), str) and openblas.kernels()
