"""Parity of the MoE dispatch/combine kernels (Numba, CuPy) with the plain array references in
refmtp/model/moe.py, on random data and edge cases: an expert hit by no token, every token on one
expert, a single token, sizes that are not multiples of a block. The CUDA source is compiled with
nvcc here (no GPU needed); the cupy parity tests run under the gpu marker."""
from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

from refmtp.backends import get_backend, numba_moe, set_kernels_enabled
from refmtp.backends.cupy_kernels import CU_DIR, INCLUDE_OPTION, NVRTC_OPTIONS
from refmtp.model.moe import (moe_combine_backward_ref, moe_combine_ref, moe_dispatch_plan_ref,
                        moe_permute_backward_ref, moe_permute_ref)
from tests.conftest import HAS_GPU

NAMES = ("moe_dispatch_plan", "moe_permute", "moe_permute_backward", "moe_combine",
         "moe_combine_backward")
# (N, K, E, d, kind): kind "random" | "unused" (expert E-1 never chosen) | "one" (all on expert 0)
CASES = [
    (1, 1, 4, 3, "random"),  # a single token, top-1
    (1, 3, 5, 2, "random"),  # a single token, several experts
    (7, 2, 5, 3, "unused"),
    (13, 1, 6, 5, "one"),  # every token on one expert
    (9, 3, 4, 7, "one"),  # every token's first choice on expert 0
    (257, 2, 8, 33, "random"),  # not a multiple of a 256-thread block
    (64, 4, 16, 8, "unused"),
]


def _case(N, K, E, d, kind, dtype, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "random":
        idx = np.stack([rng.permutation(E)[:K] for _ in range(N)])
    elif kind == "unused":
        idx = np.stack([rng.permutation(E - 1)[:K] for _ in range(N)])
    else:
        idx = np.stack([np.concatenate([[0], 1 + rng.permutation(E - 1)[:K - 1]]) for _ in range(N)])
    S = N * K
    return dict(
        idx=idx.astype(np.int64),
        x=rng.standard_normal((N, d)).astype(dtype),
        w=rng.standard_normal((N, K)).astype(dtype),
        ys=rng.standard_normal((S, d)).astype(dtype),
        dy=rng.standard_normal((N, d)).astype(dtype),
    )


def _run_all(fns, c, E):
    """Every dispatch function on one case; fns maps kernel name -> callable."""
    N, K = c["idx"].shape
    order, offsets = fns["moe_dispatch_plan"](c["idx"], E)
    xs = fns["moe_permute"](c["x"], order, K)
    dx = fns["moe_permute_backward"](c["ys"], order, N)
    y = fns["moe_combine"](c["ys"], order, c["w"])
    dys, dw = fns["moe_combine_backward"](c["dy"], c["ys"], order, c["w"])
    return dict(order=order, offsets=offsets, xs=xs, dx=dx, y=y, dys=dys, dw=dw)


REFS = {"moe_dispatch_plan": moe_dispatch_plan_ref, "moe_permute": moe_permute_ref,
        "moe_permute_backward": moe_permute_backward_ref, "moe_combine": moe_combine_ref,
        "moe_combine_backward": moe_combine_backward_ref}
EXACT = ("order", "offsets", "xs", "dx", "y", "dys")  # bit-exact; dw is a reduction over d


def _compare(got, ref, dtype, to_host=lambda a: a):
    for k in EXACT:
        np.testing.assert_array_equal(to_host(got[k]), to_host(ref[k]), err_msg=k)
    tol = 1e-13 if dtype == np.float64 else 2e-6
    g, r = to_host(got["dw"]), to_host(ref["dw"])
    scale = np.abs(to_host(got["dys"])).max() + 1.0
    np.testing.assert_allclose(g, r, rtol=tol, atol=tol * scale, err_msg="dweight")
    assert g.dtype == r.dtype == dtype


@pytest.mark.parametrize("N,K,E,d,kind", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numba_matches_reference(N, K, E, d, kind, dtype):
    c = _case(N, K, E, d, kind, dtype)
    ref = _run_all(REFS, c, E)
    got = _run_all(numba_moe.KERNELS, c, E)
    _compare(got, ref, np.dtype(dtype))
    # the plan itself: stable, grouped by expert, loads as counted
    load = np.diff(ref["offsets"])
    np.testing.assert_array_equal(load, np.bincount(c["idx"].reshape(-1), minlength=E))
    if kind == "unused":
        assert load[E - 1] == 0
    if kind == "one":
        assert load[0] == N
    flat = c["idx"].reshape(-1)
    for e in range(E):
        block = ref["order"][ref["offsets"][e]:ref["offsets"][e + 1]]
        assert (flat[block] == e).all() and (np.diff(block) > 0).all()


@pytest.mark.parametrize("N,K,E,d,kind", CASES[:4])
def test_numba_bit_exact_with_py_func(N, K, E, d, kind):
    c = _case(N, K, E, d, kind, np.float64, seed=1)
    flat = c["idx"].reshape(-1)
    S = flat.size
    o1, f1 = np.empty(S, np.int64), np.empty(E + 1, np.int64)
    o2, f2 = np.empty(S, np.int64), np.empty(E + 1, np.int64)
    numba_moe.moe_dispatch_plan_numba(flat, np.int64(E), o1, f1)
    numba_moe.moe_dispatch_plan_numba.py_func(flat, E, o2, f2)
    np.testing.assert_array_equal(o1, o2)
    np.testing.assert_array_equal(f1, f2)
    pairs = [
        (numba_moe.moe_permute_numba, (c["x"], o1, np.int64(K)), (S, d)),
        (numba_moe.moe_permute_backward_numba, (c["ys"], o1, np.int64(K)), (N, d)),
        (numba_moe.moe_combine_numba, (c["ys"], o1, c["w"].reshape(-1), np.int64(K)), (N, d)),
    ]
    for fn, args, shape in pairs:
        a, b = np.empty(shape), np.empty(shape)
        fn(*args, a)
        fn.py_func(*args, b)
        np.testing.assert_array_equal(a, b)
    a = (np.empty((S, d)), np.empty(S))
    b = (np.empty((S, d)), np.empty(S))
    args = (c["dy"], c["ys"], o1, c["w"].reshape(-1), np.int64(K))
    numba_moe.moe_combine_backward_numba(*args, *a)
    numba_moe.moe_combine_backward_numba.py_func(*args, *b)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def _table(bk):
    if bk.name == "numpy":
        return numba_moe.KERNELS
    from refmtp.backends import cupy_moe

    return cupy_moe.KERNELS


def test_kernels_registered_and_switchable(backend):
    prev = set_kernels_enabled(True)
    try:
        for name in NAMES:
            assert backend.kernel(name) is _table(backend)[name]
        set_kernels_enabled(False)
        assert all(backend.kernel(name) is None for name in NAMES)
    finally:
        set_kernels_enabled(prev)


def test_bad_expert_index_is_rejected(backend):
    for bad in ([[0, 4]], [[-1, 0]]):
        idx = backend.asarray(np.array(bad), dtype="int64")
        for fn in (moe_dispatch_plan_ref, _table(backend)["moe_dispatch_plan"]):
            with pytest.raises(ValueError, match=r"expert indices must lie in \[0, 4\)"):
                fn(idx, 4)


# -------------------------------------------------------------------------------------------
NVCC = shutil.which("nvcc")
CU = CU_DIR / "moe_dispatch.cu"


def test_cuda_source_has_no_float_atomics_and_no_fast_math():
    src = CU.read_text()
    code = re.sub(r"//[^\n]*", "", src)  # comments may mention what the code avoids
    assert "atomic" not in code
    # the one include is the shared header, found by NVRTC through -I<backends dir>
    assert re.findall(r"#include\s+(\S+)", code) == ['"refmtp_common.cuh"']
    assert INCLUDE_OPTION in NVRTC_OPTIONS
    assert not any("fast_math" in o or "fmad" in o for o in NVRTC_OPTIONS)


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH: CUDA source not compiled here")
def test_cuda_source_compiles_with_nvcc(tmp_path):
    from refmtp.backends import cupy_moe

    lines = [f'#include "{CU}"', "void instantiate_moe_dispatch() {"]
    lines += [f"    (void)&{n};" for n in cupy_moe._MOD.name_expressions]
    lines.append("}")
    wrapper = tmp_path / "moe_dispatch_all.cu"
    wrapper.write_text("\n".join(lines) + "\n")
    res = subprocess.run([NVCC, "-std=c++17", INCLUDE_OPTION, "-arch=sm_80", "--ptx", str(wrapper),
                          "-o", str(tmp_path / "moe.ptx")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ptx = (tmp_path / "moe.ptx").read_text()
    for n in ("moe_plan_count", "moe_plan_place", "moe_combine", "moe_combine_backward_dweight"):
        assert n in ptx
    # every float/double instantiation was emitted; no fused multiply-add in the combine sums
    assert len(re.findall(r"\.entry\s+\S+", ptx)) == len(cupy_moe._MOD.name_expressions)
    assert "fma.rn" not in ptx


# -------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU with cupy")
@pytest.mark.parametrize("N,K,E,d,kind", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cupy_matches_reference(N, K, E, d, kind, dtype):
    from refmtp.backends import cupy_moe

    bk = get_backend("cupy")
    c = _case(N, K, E, d, kind, dtype, seed=2)
    host_ref = _run_all(REFS, c, E)  # the NumPy reference: deterministic scatter order
    dev = {k: bk.asarray(v) for k, v in c.items()}
    got = _run_all(cupy_moe.KERNELS, dev, E)
    _compare(got, host_ref, np.dtype(dtype), to_host=bk.to_numpy)
    # and against the plain path on the GPU: its scatter-add (backends/scatter_add.cu) adds in
    # index order like np.add.at, so everything but the dweight reduction is bit-exact
    dev_ref = _run_all(REFS, dev, E)
    for k in EXACT:
        np.testing.assert_array_equal(bk.to_numpy(got[k]), bk.to_numpy(dev_ref[k]), err_msg=k)
        np.testing.assert_array_equal(bk.to_numpy(dev_ref[k]), host_ref[k], err_msg=f"{k} plain cupy vs numpy")
    tol = 1e-13 if dtype == np.float64 else 2e-6
    np.testing.assert_allclose(bk.to_numpy(got["dw"]), bk.to_numpy(dev_ref["dw"]), rtol=tol, atol=tol,
                               err_msg="dw")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU with cupy")
def test_cupy_kernels_are_registered():
    bk = get_backend("cupy")
    prev = set_kernels_enabled(True)
    try:
        assert all(bk.kernel(n) is not None for n in NAMES)
    finally:
        set_kernels_enabled(prev)


@pytest.mark.parametrize("N,K,E,d,kind", CASES[:4])
def test_permute_and_combine_backward_gradcheck(backend, N, K, E, d, kind):
    """The dispatch references' own backwards against float64 central differences (the MoE layer
    gradcheck covers them too, but only composed with the experts)."""
    from refmtp.verification.gradcheck import check_grad

    c = _case(N, K, E, d, kind, np.float64)
    order, _ = moe_dispatch_plan_ref(backend.asarray(c["idx"]), E)

    def permute(x):
        return moe_permute_ref(x, order, K), None

    check_grad(permute, lambda dout, _: {"x": moe_permute_backward_ref(dout, order, N)},
               {"x": backend.asarray(c["x"])})

    def combine(ys, weight):
        return moe_combine_ref(ys, order, weight), (ys, weight)

    def combine_bwd(dout, cache):
        dys, dweight = moe_combine_backward_ref(dout, cache[0], order, cache[1])
        return {"ys": dys, "weight": dweight}

    check_grad(combine, combine_bwd, {"ys": backend.asarray(c["ys"]), "weight": backend.asarray(c["w"])})
