"""Numba kernel: ``out[idx[i]] += vals[i]`` over rows, in index order (numpy backend's scatter-add).

``np.add.at`` on rows is slow (about 40x this loop for a 2048 x 256 embedding gradient here);
this loop adds the same values in the same order (i = 0, 1, ..., one row at a time, each
element once), so the result is bit-identical to ``np.add.at`` (tests/test_backends.py).
:meth:`refmtp.backends.numpy_backend.NumpyBackend.scatter_add` takes it for a C-contiguous 2-D
float ``out``, ``vals`` of shape (len(idx), d) in the same dtype and ids in [0, len(out));
anything else (negative ids that wrap, out-of-range ids that raise, strided views, broadcast
values, REFMTP_KERNELS=0) goes to ``np.add.at``. Serial: the order of the adds is the result.
"""
from __future__ import annotations

from numba import njit


def _scatter_add_rows_loop(out, idx, vals):
    """out (M, d), idx (n,) int64 in [0, M), vals (n, d): out[idx[i]] += vals[i] for i in order."""
    n, d = vals.shape
    for i in range(n):
        r = idx[i]
        for c in range(d):
            out[r, c] += vals[i, c]


scatter_add_rows_numba = njit(cache=True, nogil=True)(_scatter_add_rows_loop)
