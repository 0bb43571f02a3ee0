"""The OpenBLAS that numpy loaded: its thread count, the kernels it chose, and whether they leave
the CPU's AVX-512 unused.

OpenBLAS built with DYNAMIC_ARCH (numpy's wheels) picks its kernels once, when it loads, from
the CPU it recognises. A CPU newer than the library can land on older kernels: the scipy-openblas
0.3.31 in numpy 2.4 gives an AMD EPYC of family 26 (Zen 5, full-width AVX-512) its Haswell
(AVX2) kernels, and its float32 GEMM then runs at half the speed its SkylakeX (AVX-512) kernels
reach on the same core (measured: 114 against 213 GFLOP/s at n = 1024, one thread;
docs/performance.md, "BLAS kernels"). ``OPENBLAS_CORETYPE=SkylakeX``, set before the process
starts, selects those kernels; it cannot change once numpy has loaded the library, so refmtp
only reports it (``refmtp info``) and never sets it.
"""
from __future__ import annotations

import ctypes

# the instruction sets OpenBLAS's SkylakeX kernels need
SKYLAKEX_FLAGS = ("avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl")
# OpenBLAS x86-64 kernel families without AVX-512 (names as openblas_get_corename returns them)
NO_AVX512 = {"haswell", "zen", "sandybridge", "nehalem", "core2", "penryn", "dunnington", "prescott",
             "atom", "barcelona", "bulldozer", "piledriver", "steamroller", "excavator", "katmai",
             "coppermine", "northwood", "opteron", "opteron_sse3", "bobcat", "nano"}


def library():
    """(ctypes handle, name prefix, name suffix) of the OpenBLAS numpy loaded, or None."""
    import numpy  # noqa: F401  (loads the library)

    paths = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1]
                if "openblas" in path.lower() and ".so" in path:
                    paths.add(path)
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas", "64_"), ("scipy_openblas", ""), ("openblas", "64_"),
                               ("openblas", "")):
            if hasattr(lib, f"{prefix}_get_num_threads{suffix}"):
                return lib, prefix, suffix
    return None


def threads(n: int | None = None) -> int | None:
    """Set OpenBLAS's thread count to ``n`` (when given); the count in effect (None: no OpenBLAS)."""
    found = library()
    if found is None:
        return None
    lib, prefix, suffix = found
    if n is not None:
        getattr(lib, f"{prefix}_set_num_threads{suffix}")(ctypes.c_int(int(n)))
    return int(getattr(lib, f"{prefix}_get_num_threads{suffix}")())


def kernels() -> str | None:
    """The kernel family OpenBLAS chose ("Haswell", "SkylakeX", ...; OPENBLAS_CORETYPE overrides it)."""
    found = library()
    if found is None:
        return None
    lib, prefix, suffix = found
    name = f"{prefix}_get_corename{suffix}"
    if not hasattr(lib, name):
        return None
    fn = getattr(lib, name)
    fn.restype = ctypes.c_char_p
    return fn().decode()


def cpu_flags() -> set:
    """The instruction-set flags of the first CPU in /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def kernel_advice(chosen: str | None = None, flags: set | None = None) -> str | None:
    """One line when OpenBLAS's kernels leave the CPU's AVX-512 unused, else None."""
    chosen = kernels() if chosen is None else chosen
    flags = cpu_flags() if flags is None else flags
    if not chosen or chosen.lower() not in NO_AVX512 or not all(f in flags for f in SKYLAKEX_FLAGS):
        return None
    return (f"this CPU has AVX-512 but OpenBLAS chose its {chosen} kernels; OPENBLAS_CORETYPE=SkylakeX, "
            "set before Python starts, selects its AVX-512 kernels (docs/performance.md, 'BLAS kernels')")
