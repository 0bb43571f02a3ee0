"""Batched RNG-v1 acceptance: plain array reference == loop over verify_drafts == Numba (jit and
py_func) == the CUDA source (compiled by nvcc as a host program, and on a GPU through CuPy)."""
from __future__ import annotations

import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from refmtp.backends import cupy_accept, get_backend, numba_accept, set_kernels_enabled
from refmtp.backends.cupy_kernels import INCLUDE_OPTION
from refmtp.inference.acceptance import BatchVerdict, verify_drafts, verify_drafts_batch, verify_drafts_batch_ref
from refmtp.verification.acceptance_cases import dyadic_cases

DYADIC_CASES = dyadic_cases()

ACCEPT_CU = Path(numba_accept.__file__).with_name("accept.cu")


# ------------------------------------------------------------------------------------------------
# Random batches with every kind of row
# ------------------------------------------------------------------------------------------------

def random_batch(seed, N, K, V, *, one_hot=False, dtype=np.float64, q_dtype=None, greedy_frac=0.2,
                 fallback_frac=0.15, logits=True):
    """Inputs of ``verify_drafts_batch`` with sparse p, near-boundary coins, greedy rows (with
    ties) and rows built to hit the residual fallback (p_j = q_j except a deficit at the draft)."""
    rng = np.random.default_rng(seed)

    def dist(shape):
        x = rng.random(shape) ** 2
        x[rng.random(shape) < 0.3] = 0.0
        x[..., 0] += 1e-3  # every row keeps some mass
        return x / x.sum(-1, keepdims=True)

    p = dist((N, K + 1, V))  # (N, K+1, V)
    q = None if one_hot else dist((N, K, V))  # (N, K, V)
    drafts = np.zeros((N, K), dtype=np.int64)
    for n in range(N):
        for k in range(K):
            drafts[n, k] = rng.integers(V) if one_hot else rng.choice(V, p=q[n, k])
    u_accept = rng.random((N, K))
    u_sample = rng.random(N)
    greedy = rng.random(N) < greedy_frac
    lg = np.round(rng.normal(size=(N, K + 1, V)), 1) if logits else None  # rounding makes ties
    for n in range(N):
        if K > 0 and greedy[n] and rng.random() < 0.7:  # greedy rows: drafts mostly the argmax
            src = lg[n] if lg is not None else p[n]
            drafts[n] = np.argmax(src[:K], axis=-1)
        if K > 0 and not greedy[n] and rng.random() < fallback_frac:  # force a residual fallback at j
            j = int(rng.integers(K))
            u_accept[n, :j] = 0.0
            for k in range(j):  # earlier drafts accepted: p(d) > 0
                p[n, k, drafts[n, k]] += 0.5
                p[n, k] /= p[n, k].sum()
            d = drafts[n, j]
            if one_hot:
                p[n, j] = 0.0
                p[n, j, d] = 1.0 - 2.0 ** -20  # deficit: residual p with d zeroed is empty
            else:
                q[n, j] = p[n, j]
                q[n, j, d] = max(q[n, j, d], 0.25)
                q[n, j] /= q[n, j].sum()
                p[n, j] = q[n, j]
                p[n, j, d] = q[n, j, d] * (1 - 2.0 ** -20)  # p = q except a deficit at the draft
            u_accept[n, j] = 1 - 2.0 ** -30
    p = p.astype(dtype)
    if q is not None:
        q = q.astype(q_dtype or dtype)
    return p, q, drafts, u_accept, u_sample, greedy, lg


def loop_over_verify_drafts(p, q, drafts, u_accept, u_sample, greedy, logits):
    """The batch result assembled from one ``verify_drafts`` call per request."""
    N, K1, _ = p.shape
    out = BatchVerdict(np.zeros(N, np.int64), np.full((N, K1), -1, np.int64), np.zeros(N, bool), np.zeros(N, bool))
    for n in range(N):
        v = verify_drafts(p[n], None if q is None else q[n], drafts[n], u_accept[n], u_sample[n],
                          greedy=bool(greedy[n]), logits=None if logits is None else logits[n])
        out.num_accepted[n] = v.num_accepted
        out.tokens[n, : len(v.tokens)] = v.tokens
        out.residual_fallback[n], out.is_bonus[n] = v.residual_fallback, v.is_bonus
    return out


def assert_same(a, b, what):
    for name, x, y in zip(BatchVerdict._fields, a, b):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape and (x == y).all(), f"{what}: {name} differs at rows {np.flatnonzero((x != y).reshape(len(x), -1).any(-1))[:5]}"


CONFIGS = [  # (N, K, V, one_hot, dtype, logits)
    (64, 0, 5, False, np.float64, True),
    (64, 1, 1, False, np.float64, True),
    (64, 1, 2, True, np.float64, False),
    (96, 1, 7, False, np.float32, True),
    (96, 3, 7, False, np.float64, True),
    (96, 3, 7, True, np.float32, False),
    (48, 2, 33, False, np.float64, False),
    (48, 4, 5, True, np.float64, True),
]


@pytest.mark.parametrize("N,K,V,one_hot,dtype,logits", CONFIGS)
def test_batch_ref_equals_loop_and_numba(N, K, V, one_hot, dtype, logits):
    args = random_batch(N * 7 + K * 3 + V, N, K, V, one_hot=one_hot, dtype=dtype, logits=logits)
    ref = verify_drafts_batch_ref(*args)
    assert_same(ref, loop_over_verify_drafts(*args), "ref vs loop over verify_drafts")
    assert_same(ref, numba_accept.verify_drafts_batch(*args), "ref vs numba")
    assert_same(ref, numba_accept.verify_drafts_batch(*args, jit=False), "ref vs numba py_func")
    assert_same(ref, verify_drafts_batch(*args), "ref vs public (dispatch)")
    # the random data really covers the row kinds
    greedy = args[5]
    if K > 0:
        assert ref.residual_fallback.any() and (~ref.is_bonus & ~greedy).any()
    assert ref.is_bonus.any() and (greedy.any() or N < 50)
    valid = np.arange(K + 1)[None, :] <= ref.num_accepted[:, None]
    assert ((ref.tokens >= 0) == valid).all()  # -1 padding exactly after A+1 tokens


def _on(bk, args):
    return [None if a is None else bk.asarray(a) for a in args]


def _host(bk, verdict):
    return [bk.to_numpy(x) for x in verdict]


def test_mixed_dtypes_and_kernel_switch(backend):
    bk = backend
    kern = numba_accept.verify_drafts_batch if bk.name == "numpy" else cupy_accept.verify_drafts_batch
    args = random_batch(5, 80, 2, 6, dtype=np.float32, q_dtype=np.float64)
    ref = verify_drafts_batch_ref(*args)  # numpy, on the host
    dev = _on(bk, args)
    assert_same(ref, _host(bk, kern(*dev)), "float32 p / float64 q")
    assert_same(ref, _host(bk, verify_drafts_batch(*dev)), "kernels on (dispatch)")
    previous = set_kernels_enabled(False)
    try:
        assert bk.kernel("verify_drafts_batch") is None
        assert_same(ref, _host(bk, verify_drafts_batch(*dev)), "kernels off")
    finally:
        set_kernels_enabled(previous)
    assert bk.kernel("verify_drafts_batch") is kern


def _dyadic_groups():
    groups = defaultdict(list)
    for c in DYADIC_CASES:
        groups[(c["V"], c["K"], c["q"] is None)].append(c)
    return groups


def _stack_cases(cases):
    V, K = cases[0]["V"], cases[0]["K"]
    p = np.array([c["p"] for c in cases], dtype=np.float64).reshape(len(cases), K + 1, V)
    q = None if cases[0]["q"] is None else np.array([c["q"] for c in cases], dtype=np.float64).reshape(len(cases), K, V)
    drafts = np.array([c["drafts"] for c in cases], dtype=np.int64).reshape(len(cases), K)
    ua = np.array([c["u_accept"] if c["u_accept"] is not None else [0.0] * K for c in cases]).reshape(len(cases), K)
    us = np.array([c["u_sample"] if c["u_sample"] is not None else 0.0 for c in cases])
    greedy = np.array([c["greedy"] for c in cases])
    logits = None
    if any(c["logits"] is not None for c in cases):
        logits = np.array([c["logits"] if c["logits"] is not None else np.log(np.array(c["p"]) + 1e-300)
                           for c in cases], dtype=np.float64)
    return p, q, drafts, ua, us, greedy, logits


def test_dyadic_cases_batched_equal_verify_drafts(backend):
    n = 0
    for cases in _dyadic_groups().values():
        args = _stack_cases(cases)
        ref = verify_drafts_batch_ref(*args)
        if backend.name == "numpy":
            assert_same(ref, numba_accept.verify_drafts_batch(*args), "dyadic numba")
        dev = _on(backend, args)
        assert_same(ref, _host(backend, verify_drafts_batch(*dev)), f"dyadic dispatch ({backend.name})")
        assert_same(ref, _host(backend, verify_drafts_batch_ref(*dev)), f"dyadic reference ({backend.name})")
        for i, c in enumerate(cases):
            v = verify_drafts(c["p"], c["q"], c["drafts"], c["u_accept"], c["u_sample"], c["greedy"], c["logits"])
            assert (int(ref.num_accepted[i]), tuple(int(t) for t in ref.tokens[i, : v.num_accepted + 1]),
                    bool(ref.residual_fallback[i]), bool(ref.is_bonus[i])) == tuple(v), c["case"]
            n += 1
    assert n == len(DYADIC_CASES)


def test_batch_input_checks(backend):
    host = random_batch(3, 6, 2, 4, greedy_frac=0.0, fallback_frac=0.0)
    p, q, drafts, ua, us, greedy, lg = _on(backend, host)
    bad_q = backend.asarray(host[1].copy())
    bad_q[2, 1, int(host[2][2, 1])] = 0.0
    with pytest.raises(ValueError, match=r"q\[2, 1, \d\] = 0\.0"):
        verify_drafts_batch(p, bad_q, drafts, ua, us, False)
    g = np.zeros(6, bool)
    g[2] = True  # a greedy row ignores q
    verify_drafts_batch(p, bad_q, drafts, ua, us, backend.asarray(g))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        verify_drafts_batch(p, q, drafts + 4, ua, us, False)
    with pytest.raises(ValueError, match=r"u_accept must be \(N, K\)"):
        verify_drafts_batch(p, q, drafts, ua[:, :1], us, False)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        verify_drafts_batch(p, q, drafts, ua + 1.0, us, False)
    with pytest.raises(ValueError, match="greedy must be"):
        verify_drafts_batch(p, q, drafts, ua, us, backend.asarray(np.zeros(5, bool)))
    with pytest.raises(ValueError, match="u_accept"):
        verify_drafts_batch(p, q, drafts, None, None, False)
    out = verify_drafts_batch(None, None, drafts, None, None, True, lg)  # all greedy: logits only
    want = verify_drafts_batch_ref(*host[:5], np.ones(6, bool), host[6])  # numpy, on the host
    assert_same(_host(backend, out), want, "logits-only greedy")


# ------------------------------------------------------------------------------------------------
# CUDA source: compiled by nvcc; the per-request device function run on the host
# ------------------------------------------------------------------------------------------------

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH: cannot compile backends/accept.cu")

_CTYPES = {"float": np.float32, "double": np.float64}


def _lit(x, ctype):
    x = float(np.dtype(_CTYPES[ctype]).type(x)) if ctype != "bool" else x
    if ctype == "bool":
        return "true" if x else "false"
    if np.isinf(x):
        return "-__builtin_inf()" if x < 0 else "__builtin_inf()"
    return float(x).hex()


def _c_array(name, ctype, values):
    vals = [_lit(v, ctype) if ctype in ("float", "double", "bool") else str(int(v)) for v in np.ravel(values)]
    vals.append({"bool": "false", "long long": "0"}.get(ctype, "0.0"))  # never zero-sized
    return f"static const {ctype} {name}[] = {{{', '.join(vals)}}};\n"


def _harness(datasets):
    src = ["#include <cstdio>\n", f'#include "{ACCEPT_CU}"\n']
    src.append("""
template <typename T, typename L>
void run(int id, const T* p, const T* q, int has_q, const long long* d, const double* ua, const double* us,
         const bool* g, const L* s, int N, int K, int V) {
    long long* na = new long long[N + 1]; long long* tok = new long long[(long long)N * (K + 1) + 1];
    bool* fb = new bool[N + 1]; bool* bo = new bool[N + 1];
    for (long long n = 0; n < N; ++n) verify_one<T, L>(p, q, has_q, d, ua, us, g, s, n, K, V, na, tok, fb, bo);
    printf("%d", id);
    for (int n = 0; n < N; ++n) printf(" %lld %d %d", na[n], (int)fb[n], (int)bo[n]);
    for (long long i = 0; i < (long long)N * (K + 1); ++i) printf(" %lld", tok[i]);
    printf("\\n");
}
""")
    calls = []
    for i, (T, L, (p, q, drafts, ua, us, greedy, lg)) in enumerate(datasets):
        N, K1, V = p.shape
        src.append(_c_array(f"p{i}", T, p))
        src.append(_c_array(f"q{i}", T, q if q is not None else []))
        src.append(_c_array(f"d{i}", "long long", drafts))
        src.append(_c_array(f"ua{i}", "double", ua))
        src.append(_c_array(f"us{i}", "double", us))
        src.append(_c_array(f"g{i}", "bool", greedy))
        src.append(_c_array(f"s{i}", L, lg if lg is not None else p))
        qname = f"q{i}" if q is not None else f"p{i}"
        calls.append(f"    run<{T}, {L}>({i}, p{i}, {qname}, {int(q is not None)}, d{i}, ua{i}, us{i}, g{i}, s{i}, "
                     f"{N}, {K1 - 1}, {V});\n")
    src.append("int main() {\n" + "".join(calls) + "    return 0;\n}\n")
    return "".join(src)


@needs_nvcc
def test_accept_cu_matches_reference_on_host(tmp_path):
    """The kernel's per-request code (``verify_one``, which the __global__ kernel calls for each
    request) compiled by nvcc as host code and run on the CPU == the reference, on random batches
    of every dtype combination and on all dyadic cases (exact boundaries)."""
    specs = [("double", "double", dict()), ("float", "float", dict(dtype=np.float32)),
             ("double", "float", dict()), ("float", "double", dict(dtype=np.float32))]
    datasets, refs = [], []
    for i, (N, K, V, one_hot, _, logits) in enumerate(CONFIGS):
        T, L, kw = specs[i % len(specs)]
        args = list(random_batch(100 + i, N, K, V, one_hot=one_hot, logits=logits, **kw))
        if args[6] is None:
            args[6] = np.log(args[0].astype(np.float64) + 1e-300)  # scores for the greedy rows
        args[6] = args[6].astype(_CTYPES[L])
        # what the C arrays hold: p/q rounded to T, scores to L
        args[0] = args[0].astype(_CTYPES[T])
        if args[1] is not None:
            args[1] = args[1].astype(_CTYPES[T])
        datasets.append((T, L, args))
        refs.append(verify_drafts_batch_ref(*args))
    for cases in _dyadic_groups().values():
        args = list(_stack_cases(cases))
        if args[6] is None:
            args[6] = args[0]
        datasets.append(("double", "double", args))
        refs.append(verify_drafts_batch_ref(*args))
    src = tmp_path / "accept_harness.cu"
    src.write_text(_harness(datasets))
    exe = tmp_path / "accept_harness"
    build = subprocess.run([NVCC, "-std=c++17", "-o", str(exe), str(src)], capture_output=True, text=True)
    assert build.returncode == 0, f"nvcc failed:\n{build.stderr[-3000:]}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == len(datasets)
    for line, ref, (T, L, args) in zip(lines, refs, datasets):
        vals = [int(x) for x in line.split()]
        i, vals = vals[0], vals[1:]
        N, K1 = args[0].shape[:2]
        per = np.array(vals[: 3 * N]).reshape(N, 3)
        tokens = np.array(vals[3 * N:]).reshape(N, K1)
        got = BatchVerdict(per[:, 0], tokens, per[:, 1].astype(bool), per[:, 2].astype(bool))
        assert_same(ref, got, f"accept.cu dataset {i} <{T}, {L}>")


@needs_nvcc
def test_accept_cu_compiles_to_ptx(tmp_path):
    """The four __global__ instantiations the CuPy wrapper requests compile as device code alone
    (no host harness, no standard headers, no fast-math: as NVRTC sees the file)."""
    inst = []
    for expr in cupy_accept.NAME_EXPRESSIONS:
        T, L = re.fullmatch(r"verify_drafts_batch<(\w+), (\w+)>", expr).groups()
        inst.append(f"template __global__ void {expr}(const {T}*, const {T}*, int, const long long*, const double*, "
                    f"const double*, const bool*, const {L}*, int, int, int, long long*, long long*, bool*, bool*);")
    src = tmp_path / "accept_ptx.cu"
    src.write_text(ACCEPT_CU.read_text() + "\n" + "\n".join(inst) + "\n")
    build = subprocess.run([NVCC, "-std=c++17", INCLUDE_OPTION, "--ptx", "-o", str(tmp_path / "accept.ptx"), str(src)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    ptx = (tmp_path / "accept.ptx").read_text()
    assert ptx.count(".entry") == 4


# ------------------------------------------------------------------------------------------------
# CuPy (GPU)
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("N,K,V,one_hot,dtype,logits", CONFIGS + [(3000, 3, 129, False, np.float32, True)])
def test_cupy_kernel_matches_reference(N, K, V, one_hot, dtype, logits):
    bk = get_backend("cupy")
    args = random_batch(N + K + V, N, K, V, one_hot=one_hot, dtype=dtype, logits=logits)
    ref = verify_drafts_batch_ref(*args)
    dev = [None if a is None else bk.asarray(a) for a in args]
    got = cupy_accept.verify_drafts_batch(*dev)
    assert_same(ref, [bk.to_numpy(x) for x in got], "cupy kernel")
    assert_same(ref, [bk.to_numpy(x) for x in verify_drafts_batch(*dev)], "cupy public dispatch")
    assert_same(ref, [bk.to_numpy(x) for x in verify_drafts_batch_ref(*dev)], "cupy array reference")


def test_empty_batch_and_k0(backend):
    for N, K in [(0, 2), (3, 0)]:
        p, q = np.full((N, K + 1, 3), 1 / 4), np.full((N, K, 3), 1 / 3)
        args = (p, q, np.zeros((N, K), np.int64), np.zeros((N, K)), np.full(N, 0.5), np.zeros(N, bool), None)
        ref = verify_drafts_batch_ref(*args)
        assert ref.tokens.shape == (N, K + 1)
        if N:  # K = 0: only the bonus, ICDF([1/4]*3, 0.5): t = 0.375 -> token 1
            assert (ref.tokens == 1).all() and ref.is_bonus.all()
        if backend.name == "numpy":
            assert_same(ref, numba_accept.verify_drafts_batch(*args), "numba")
        dev = _on(backend, args)
        assert_same(ref, _host(backend, verify_drafts_batch(*dev)), "public")
        assert_same(ref, _host(backend, verify_drafts_batch_ref(*dev)), "reference")
