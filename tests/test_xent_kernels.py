"""Fused cross-entropy kernels: the compiled Numba loops against their py_func, and the CuPy kernels
on large GPU shapes. Parity of every backend's kernels with the reference on the shared edge
shapes is in tests/test_kernel_parity.py (the Numba parity test that was here moved there)."""
from __future__ import annotations

import numpy as np
import pytest

from refmtp.backends import numba_xent
from refmtp.model.ops.xent import xent_backward_ref, xent_forward_ref

CASES = [(1, 1), (1, 7), (5, 3), (33, 257)]  # one token, V=1, odd sizes


def _data(N, V, dtype, seed=0):
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((N, V)) * 4).astype(dtype)
    t = rng.integers(0, V, size=N)
    if N > 2:
        t[1] = -100
    d = rng.standard_normal(N).astype(dtype)
    return z, t.astype(np.int64), d


@pytest.mark.parametrize("N,V", CASES)
def test_numba_xent_bit_exact_with_py_func(N, V):
    z, t, d = _data(N, V, np.float64, seed=1)
    a_l, a_s = np.empty(N), np.empty(N)
    b_l, b_s = np.empty(N), np.empty(N)
    numba_xent.xent_forward_numba(z, t, np.int64(-100), a_l, a_s)
    numba_xent.xent_forward_numba.py_func(z, t, -100, b_l, b_s)
    np.testing.assert_array_equal(a_l, b_l)
    np.testing.assert_array_equal(a_s, b_s)
    a, b = np.empty_like(z), np.empty_like(z)
    numba_xent.xent_backward_numba(d, z, t, a_s, np.int64(-100), a)
    numba_xent.xent_backward_numba.py_func(d, z, t, a_s, -100, b)
    np.testing.assert_array_equal(a, b)


# + a vocabulary much wider than the 256-thread block, more rows than the 65535-block grid of
# the forward, and more N*V elements than the backward's grid covers in one pass
GPU_CASES = CASES + [(9, 5000), (70000, 3), (66000, 260)]


@pytest.mark.gpu
@pytest.mark.parametrize("N,V", GPU_CASES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cupy_xent_matches_reference(N, V, dtype):
    from refmtp.backends import cupy_xent, get_backend

    bk = get_backend("cupy")
    z, t, d = _data(N, V, np.dtype(dtype))
    zc, tc, dc = bk.asarray(z), bk.asarray(t), bk.asarray(d)
    losses, lse = cupy_xent.xent_forward(zc, tc)
    assert losses.dtype == lse.dtype == zc.dtype
    rl, rlse = xent_forward_ref(zc, tc)
    hl, hlse = xent_forward_ref(z, t)  # the numpy reference on the host
    tol = 1e-13 if dtype == "float64" else 2e-5
    for got in (losses, rl):  # kernel and plain cupy path, both against numpy
        np.testing.assert_allclose(bk.to_numpy(got), hl, rtol=tol, atol=tol)
    np.testing.assert_allclose(bk.to_numpy(losses), bk.to_numpy(rl), rtol=tol, atol=tol)
    np.testing.assert_allclose(bk.to_numpy(lse), hlse, rtol=tol, atol=tol)
    dz = cupy_xent.xent_backward(dc, zc, tc, lse)
    host_dz = xent_backward_ref(d, z, t, hlse)
    np.testing.assert_allclose(bk.to_numpy(dz), bk.to_numpy(xent_backward_ref(dc, zc, tc, rlse)),
                               rtol=tol, atol=tol)
    np.testing.assert_allclose(bk.to_numpy(dz), host_dz, rtol=tol, atol=tol)
    if N > 2:
        assert float(losses[1]) == 0.0 and not bk.to_numpy(dz[1]).any()  # the ignored row
