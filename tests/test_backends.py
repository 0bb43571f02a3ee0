"""The backend layer: registry errors, RNG identity, top-k tie rule, scatter-add duplicates."""
from __future__ import annotations

import numpy as np
import pytest

from refmtp.backends import (BackendUnavailable, backend_of, get_backend, kernels_enabled,
                             set_kernels_enabled)
from tests.conftest import HAS_GPU


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown backend 'tpu': choose one of numpy, cupy"):
        get_backend("tpu")


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU: the no-GPU error cannot be shown")
def test_cupy_without_gpu_names_what_is_missing():
    with pytest.raises(BackendUnavailable, match="cupy backend unavailable: .*(not importable|no CUDA device|0 CUDA)"):
        get_backend("cupy")


def test_rng_is_reproducible_and_host_drawn(backend):
    a = backend.to_numpy(backend.rng(7).normal((3, 4), std=0.02))
    b = np.random.Generator(np.random.PCG64(7)).standard_normal((3, 4)) * 0.02
    np.testing.assert_array_equal(a, b)
    f32 = backend.rng(7).normal((3, 4), std=0.02, dtype="float32")
    assert backend.to_numpy(f32).dtype == np.float32
    np.testing.assert_array_equal(backend.to_numpy(f32), b.astype(np.float32))


def test_rng_state_round_trip(backend):
    r = backend.rng(3)
    r.normal((5,))
    state = r.get_state()
    x = backend.to_numpy(r.uniform((4,)))
    r.set_state(state)
    np.testing.assert_array_equal(backend.to_numpy(r.uniform((4,))), x)


def test_topk_ties_resolve_to_lowest_index(backend):
    s = backend.asarray(np.array([[1.0, 3.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]]))
    idx, val = backend.topk(s, 3)
    np.testing.assert_array_equal(backend.to_numpy(idx), [[1, 2, 4], [0, 1, 2]])
    np.testing.assert_array_equal(backend.to_numpy(val), [[3, 3, 3], [0, 0, 0]])


def test_topk_handles_neg_inf_and_rejects_nan(backend):
    s = backend.asarray(np.array([[-np.inf, 1.0, -np.inf, -np.inf]]))
    idx, _ = backend.topk(s, 2)
    np.testing.assert_array_equal(backend.to_numpy(idx), [[1, 0]])
    with pytest.raises(ValueError, match="NaN"):
        backend.topk(backend.asarray(np.array([[np.nan, 1.0]])), 1)
    with pytest.raises(ValueError, match="k=3"):
        backend.topk(s[:, :2], 3)


def test_scatter_add_sums_duplicates(backend):
    out = backend.zeros((3, 2))
    idx = backend.asarray(np.array([0, 0, 2, 0]), dtype="int64")
    vals = backend.asarray(np.ones((4, 2)))
    backend.scatter_add(out, idx, vals)
    np.testing.assert_array_equal(backend.to_numpy(out), [[3, 3], [0, 0], [1, 1]])


def test_gather(backend):
    x = backend.asarray(np.arange(12.0).reshape(3, 4))
    idx = backend.asarray(np.array([[3, 0], [1, 1], [2, 0]]), dtype="int64")
    np.testing.assert_array_equal(backend.to_numpy(backend.gather(x, idx)), [[3, 0], [5, 5], [10, 8]])


def test_backend_of_rejects_foreign_arrays():
    with pytest.raises(TypeError, match="pass numpy or cupy arrays"):
        backend_of([1, 2, 3])
    assert backend_of(np.zeros(2)).name == "numpy"


def test_kernel_switch():
    bk = get_backend("numpy")
    assert kernels_enabled()
    assert bk.kernel("xent_forward") is not None
    prev = set_kernels_enabled(False)
    try:
        assert bk.kernel("xent_forward") is None
    finally:
        set_kernels_enabled(prev)


def test_dtype_handling():
    bk = get_backend("numpy")
    assert bk.dtype("float32") == np.float32
    with pytest.raises(ValueError, match="unsupported dtype 'float8'"):
        bk.dtype("float8")
    with pytest.raises(ValueError, match="choose float32 or float64"):
        bk.check_float_dtype("int64")
