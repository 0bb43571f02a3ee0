"""CuPy RawKernel: deterministic scatter-add along axis 0 (source: backends/scatter_add.cu).

``scatter_add(out, idx, vals)`` is the cupy backend's ``Backend.scatter_add``: ``out[idx[i]] +=
vals[i]`` for i = 0..n-1 with repeated indices summed, in place, with the contract and the
result of the numpy backend's ``np.add.at(out, idx, vals)``, bit for bit: the indices are
sorted stably (:func:`scatter_plan`) and one thread per output element adds its row's entries
in index order. ``cupyx.scatter_add`` is not used for floats: its ``atomicAdd`` sums duplicates
in a scheduling-dependent order, so identical runs could differ in the last bit (exact resume,
golden replays and numpy/cupy parity need the same sum every time). Integer outputs, where
atomics are exact, still go through ``cupyx.scatter_add``.

This is a backend primitive, not an entry of the kernel table: it is used whatever
``REFMTP_KERNELS`` says (the plain cupy path has no deterministic scatter-add of its own).
Compiled lazily on first call; importing this module never imports cupy.
"""
from __future__ import annotations

import math

import numpy as np

from refmtp.backends.cupy_kernels import LazyKernel, cuda_type

_MOD = LazyKernel("scatter_add", ["scatter_add_rows<float>", "scatter_add_rows<double>"])


def scatter_plan(xp, flat_idx, n_rows: int):
    """Rows of a scatter-add in index order: ``(perm (n,) int64, start (n_rows+1,) int64)``.

    ``flat_idx`` (n,) int64 with every entry in ``[0, n_rows)``; ``perm`` is the STABLE argsort
    of flat_idx and row m owns ``perm[start[m]:start[m+1]]`` (its entries in increasing i).
    ``xp`` is an array-api-compat namespace (numpy for the host test, cupy on the GPU).
    """
    perm = xp.astype(xp.argsort(flat_idx, stable=True), xp.int64)  # (n,)
    rows = xp.take(flat_idx, perm)  # (n,) non-decreasing row ids
    start = xp.searchsorted(rows, xp.arange(n_rows + 1, dtype=rows.dtype), side="left")  # (M+1,)
    return perm, xp.astype(start, xp.int64)


def scatter_add(out, idx, vals):
    """``out[idx[i]] += vals[i]`` along axis 0, duplicates summed in index order; returns out.

    out (M, ...) float32/float64 cupy array (updated in place), idx (...) integer indices in
    [-M, M) (negative ones count from the end, as in numpy), vals broadcastable to
    ``idx.shape + out.shape[1:]``, cast to out's dtype (refmtp's callers pass matching dtypes).
    An index out of range raises IndexError, as np.add.at does.
    """
    import cupy

    if out.ndim < 1:
        raise ValueError("scatter_add: out must have at least one axis (the one indexed by idx)")
    if out.dtype not in (np.float32, np.float64):
        import cupyx

        cupyx.scatter_add(out, idx, vals)  # integer atomics are exact and order-free
        return out
    from array_api_compat import cupy as cp_xp

    M = int(out.shape[0])
    rest = tuple(out.shape[1:])
    C = math.prod(rest)
    idx = cupy.asarray(idx)
    if idx.dtype.kind not in "iu":
        raise IndexError(f"scatter_add: indices must be integers, got {idx.dtype}")
    flat = cupy.ascontiguousarray(idx, dtype=cupy.int64).reshape(-1)  # (n,)
    n = int(flat.shape[0])
    if n == 0:
        return out
    lo, hi = (int(v) for v in cupy.stack([flat.min(), flat.max()]).get())  # one device -> host copy
    if lo < -M or hi >= M:
        bad = hi if hi >= M else lo
        raise IndexError(f"scatter_add: index {bad} is out of bounds for axis 0 with size {M}")
    if lo < 0:
        flat = cupy.where(flat < 0, flat + M, flat)  # (n,) numpy's wrap-around for negative ids
    if C == 0:
        return out
    v = cupy.broadcast_to(cupy.asarray(vals, dtype=out.dtype), tuple(idx.shape) + rest)
    v = cupy.ascontiguousarray(v).reshape(n, C)  # (n, C)
    perm, start = scatter_plan(cp_xp, flat, M)  # (n,), (M+1,)
    work = out if out.flags.c_contiguous else cupy.ascontiguousarray(out)  # (M, ...) contiguous
    _MOD.launch(f"scatter_add_rows<{cuda_type(out.dtype, 'scatter_add')}>", M * C,
                (v, perm, start, np.int64(M), np.int64(C), work))
    if work is not out:
        out[...] = work
    return out
