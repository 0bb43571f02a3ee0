"""The backend layer: registry errors, RNG identity, top-k tie rule, scatter-add duplicates
(bit-exact and deterministic on every backend: the cupy RawKernel of backends/scatter_add.cu is
checked against np.add.at's order on the host through an nvcc harness, and on the GPU)."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from array_api_compat import numpy as np_xp

from refmtp.backends import (BackendUnavailable, backend_of, cupy_scatter, get_backend,
                             kernels_enabled, set_kernels_enabled)
from refmtp.backends.cupy_kernels import CU_DIR, INCLUDE_OPTION
from tests.conftest import HAS_GPU


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown backend 'tpu': choose one of numpy, cupy"):
        get_backend("tpu")


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU: the no-GPU error cannot be shown")
def test_cupy_without_gpu_names_what_is_missing():
    with pytest.raises(BackendUnavailable, match="cupy backend unavailable: .*(not importable|no CUDA device|0 CUDA)"):
        get_backend("cupy")


@pytest.mark.gpu
def test_cupy_lane_unavailable():
    """Stands for the whole cupy lane on machines without a GPU: conftest collects no cupy
    variant and no other gpu test there, and skips this one with the reason (one -ra line).
    With a GPU, conftest removes it (the lane itself runs)."""
    pytest.skip("cupy lane not collected: no usable GPU (see tests/conftest.py)")


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


def _sequential_scatter(out, idx, vals):
    """``out[idx[i]] += vals[i]`` one i at a time, in order (np.add.at's documented order)."""
    out = out.copy()
    M = out.shape[0]
    for i, m in enumerate(np.asarray(idx).reshape(-1)):
        m = int(m) % M
        out[m] = out[m] + vals.reshape((-1,) + out.shape[1:])[i]
    return out


def _scatter_case(M, rest, n, dtype, seed, negative=False):
    rng = np.random.default_rng(seed)
    out = rng.standard_normal((M,) + rest).astype(dtype)
    idx = rng.integers(0, max(1, M // 3), size=n)  # few rows: many duplicates in random order
    if negative:
        idx = np.where(rng.random(n) < 0.5, idx - M, idx)  # numpy wrap-around for negative ids
    vals = (rng.standard_normal((n,) + rest) * 10.0 ** rng.integers(-3, 4, size=(n,) + rest)).astype(dtype)
    return out, idx.astype(np.int64), vals


SCATTER_CASES = [(7, (5,), 40), (4, (), 33), (9, (2, 3), 1), (5, (3,), 0), (300, (17,), 2000)]


@pytest.mark.parametrize("M,rest,n", SCATTER_CASES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_scatter_add_is_bit_exact_in_index_order(backend, M, rest, n, dtype):
    """Duplicates summed in index order (float addition is not associative: the order shows),
    the same on every backend and on every run; negative ids wrap; out of range raises."""
    out, idx, vals = _scatter_case(M, rest, n, dtype, seed=M + n, negative=True)
    want = _sequential_scatter(out, idx, vals)
    got = []
    for _ in range(2):  # twice: the cupy sum order must not depend on thread scheduling
        o = backend.asarray(out.copy())  # numpy's asarray would not copy
        res = backend.scatter_add(o, backend.asarray(idx), backend.asarray(vals))
        assert res is o
        got.append(backend.to_numpy(o))
    np.testing.assert_array_equal(got[0], want)
    np.testing.assert_array_equal(got[1], want)
    if n:
        with pytest.raises(IndexError):
            backend.scatter_add(backend.asarray(out.copy()), backend.asarray(np.array([0, M])),
                                backend.asarray(vals[:2]))


def test_scatter_add_strided_out_and_broadcast_vals(backend):
    base = np.arange(24.0).reshape(6, 4)
    out = backend.asarray(base.copy())
    view = out[:, ::2]  # (6, 2), not contiguous: updated in place through the view
    backend.scatter_add(view, backend.asarray(np.array([5, 0, 5]), dtype="int64"),
                        backend.asarray(np.array([1.0, 2.0])))
    want = base.copy()
    want[5, ::2] += 2 * np.array([1.0, 2.0])  # row 5 twice
    want[0, ::2] += np.array([1.0, 2.0])
    np.testing.assert_array_equal(backend.to_numpy(out), want)


@pytest.mark.parametrize("M,rest,n", SCATTER_CASES)
def test_scatter_plan_reproduces_index_order_on_host(M, rest, n):
    """The wrapper's plan (stable argsort + row starts), run with numpy, and the kernel's loop
    written in numpy: together they are np.add.at, bit for bit (float32, many duplicates)."""
    out, idx, vals = _scatter_case(M, rest, n, "float32", seed=3 * M + n)
    perm, start = cupy_scatter.scatter_plan(np_xp, idx, M)
    assert perm.dtype == start.dtype == np.int64 and start.shape == (M + 1,)
    C = int(np.prod(rest))
    got = out.reshape(M, C).copy()
    v = vals.reshape(n, C)
    for m in range(M):  # the body of scatter_add_element
        for r in range(start[m], start[m + 1]):
            got[m] = got[m] + v[perm[r]]
    ref = out.copy()
    np.add.at(ref, idx, vals)
    np.testing.assert_array_equal(got.reshape(out.shape), ref)


NVCC = shutil.which("nvcc")


def _c_array(name, ctype, values):
    fmt = (lambda x: float(x).hex()) if ctype in ("float", "double") else (lambda x: str(int(x)))
    body = ", ".join([fmt(x) for x in np.ravel(values)] + ["0"])  # never zero-sized
    return f"static const {ctype} {name}[] = {{{body}}};\n"


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH: cannot compile backends/scatter_add.cu")
def test_scatter_add_cu_element_on_host_equals_add_at(tmp_path):
    """backends/scatter_add.cu's per-element code (what every GPU thread runs), compiled by nvcc
    as host code and run on the CPU with the wrapper's plan == np.add.at, bit for bit."""
    src = ["#include <cstdio>\n", f'#include "{CU_DIR / "scatter_add.cu"}"\n']
    calls, refs = [], []
    for i, ((M, rest, n), ctype) in enumerate([(c, t) for c in SCATTER_CASES for t in ("float", "double")]):
        dtype = np.float32 if ctype == "float" else np.float64
        out, idx, vals = _scatter_case(M, rest, n, dtype, seed=7 * i + 1)
        perm, start = cupy_scatter.scatter_plan(np_xp, idx, M)
        C = int(np.prod(rest))
        src += [_c_array(f"v{i}", ctype, vals), _c_array(f"p{i}", "long long", perm),
                _c_array(f"s{i}", "long long", start)]
        src.append(f"static {ctype} o{i}[] = {{{', '.join([float(x).hex() for x in out.ravel()] + ['0'])}}};\n")
        calls.append(f"    for (long long j = 0; j < {M * C}; ++j) scatter_add_element<{ctype}>(v{i}, p{i}, s{i}, "
                     f"{C}, j, o{i});\n"
                     f"    for (long long j = 0; j < {M * C}; ++j) printf(\"%a \", (double)o{i}[j]);\n"
                     f"    printf(\"\\n\");\n")
        ref = out.copy()
        np.add.at(ref, idx, vals)
        refs.append(ref)
    src.append("int main() {\n" + "".join(calls) + "    return 0;\n}\n")
    harness = tmp_path / "scatter_harness.cu"
    harness.write_text("".join(src))
    exe = tmp_path / "scatter_harness"
    build = subprocess.run([NVCC, "-std=c++17", "-o", str(exe), str(harness)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.split("\n")
    for i, ref in enumerate(refs):
        got = np.array([float.fromhex(t) for t in lines[i].split()], dtype=ref.dtype)
        np.testing.assert_array_equal(got, ref.ravel(), err_msg=f"case {i}")


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH: cannot compile backends/scatter_add.cu")
def test_scatter_add_cu_ptx_has_no_atomics_and_no_fma(tmp_path):
    src = tmp_path / "scatter_ptx.cu"
    src.write_text((CU_DIR / "scatter_add.cu").read_text() + "\n"
                   + "".join(f"template __global__ void scatter_add_rows<{t}>(const {t}*, const long long*, "
                             f"const long long*, long long, long long, {t}*);\n" for t in ("float", "double")))
    ptx = tmp_path / "scatter.ptx"
    build = subprocess.run([NVCC, "-std=c++17", INCLUDE_OPTION, "--ptx", "-o", str(ptx), str(src)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    text = ptx.read_text()
    assert text.count(".entry") == 2
    assert "atom" not in text and "fma" not in text
    assert "add.rn.f32" in text and "add.rn.f64" in text


def test_gather(backend):
    x = backend.asarray(np.arange(12.0).reshape(3, 4))
    idx = backend.asarray(np.array([[3, 0], [1, 1], [2, 0]]), dtype="int64")
    np.testing.assert_array_equal(backend.to_numpy(backend.gather(x, idx)), [[3, 0], [5, 5], [10, 8]])


def test_backend_of_rejects_foreign_arrays():
    with pytest.raises(TypeError, match="pass numpy or cupy arrays"):
        backend_of([1, 2, 3])
    assert backend_of(np.zeros(2)).name == "numpy"


def test_kernel_switch(backend):
    bk = backend
    assert kernels_enabled()
    names = ("rope_apply", "xent_forward", "xent_backward", "moe_dispatch_plan", "moe_permute",
             "moe_permute_backward", "moe_combine", "moe_combine_backward", "verify_drafts_batch")
    assert all(bk.kernel(n) is not None for n in names)  # both backends register every kernel
    prev = set_kernels_enabled(False)
    try:
        assert all(bk.kernel(n) is None for n in names)
    finally:
        set_kernels_enabled(prev)


def test_dtype_handling(backend):
    bk = backend
    assert bk.dtype("float32") == np.float32 and bk.dtype("int64") == np.int64
    with pytest.raises(ValueError, match="unsupported dtype 'float8'"):
        bk.dtype("float8")
    with pytest.raises(ValueError, match="choose float32 or float64"):
        bk.check_float_dtype("int64")


@pytest.mark.parametrize("M,d,n", [(7, 5, 40), (256, 256, 2048), (3, 1, 9), (5, 4, 1)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numpy_row_scatter_kernel_is_np_add_at(M, d, n, dtype):
    """The numpy backend's row kernel (backends/numba_scatter.py; ids in range, contiguous rows)
    gives np.add.at's bits, and the same with kernels off (np.add.at itself)."""
    from refmtp.backends.numpy_backend import _rows_kernel_fits

    rng = np.random.default_rng(M * n + d)
    out = rng.standard_normal((M, d)).astype(dtype)
    idx = rng.integers(0, max(1, M // 2), size=n).astype(np.int64)  # many duplicates
    vals = (rng.standard_normal((n, d)) * 10.0 ** rng.integers(-3, 4, size=(n, d))).astype(dtype)
    assert _rows_kernel_fits(out, idx, vals)
    want = out.copy()
    np.add.at(want, idx, vals)
    bk = get_backend("numpy")
    np.testing.assert_array_equal(bk.scatter_add(out.copy(), idx, vals), want)
    np.testing.assert_array_equal(_sequential_scatter(out, idx, vals), want)
    prev = set_kernels_enabled(False)
    try:
        assert not _rows_kernel_fits(out, idx, vals)
        np.testing.assert_array_equal(bk.scatter_add(out.copy(), idx, vals), want)
    finally:
        set_kernels_enabled(prev)
