"""Numba helpers shared by the float32 kernels: an ``exp`` that vectorises, and a row sum that does.

libm's ``expf`` is a function call per element, so a loop around it runs one element at a time
(about 2.5 ns each here); numpy's own ``exp`` is vectorised but needs whole-array temporaries.
:func:`expf_parts` is plain arithmetic, so LLVM vectorises the loop it is inlined into:

    x = k ln2 + f,  k = round(x / ln2),  |f| <= ln2 / 2      (ln2 in two parts, Cody and Waite)
    e^f = 1 + f + f^2 (1/2 + f/6 + ...)                        (Cephes' expf polynomial, degree 7)
    e^x = e^f * 2^k,  2^k = the float32 with exponent bits k + 127

It returns ``e^f`` and the int32 bit pattern of ``2^k``; :func:`expf32` turns the bits into the
float32 ``2^k`` with :func:`f32_from_bits` (an LLVM ``bitcast``: a register reinterpreted, no
memory, so the loop stays vectorised) and returns ``e^f * 2^k``, the same product, the same bits,
as storing the bits into an int32 view of a float32 buffer and multiplying in a second loop. Measured error against float64 ``exp``: at most
1.4 ulp over [-87, 88] (numpy's float32 ``exp``: 3.3 ulp). ``x`` is clamped to [-87, 88]:
below, ``e^x < 1.7e-38`` (under the smallest normal float32) comes out as ``e^-87``, an
absolute error under 1.7e-38; above, ``e^x`` (> 1.65e38, near float32's overflow) comes out as
``e^88``. Callers state what that means for their outputs.

:func:`row_total` sums ``row[:n]`` in 16 interleaved partial sums (lane ``u`` adds ``row[u]``,
``row[u + 16]``, ... left to right, then the lanes in order, then the tail): a fixed order, so
the result does not depend on the machine's vector width or the thread count. :func:`dot_total`
is the same sum of the products ``a[j] * b[j]`` (each rounded to the inputs' dtype) without
writing them out first: the same bits as ``row_total`` over a row of those products, in one
pass. The partial sums are kept in the dtype of the ``acc`` argument (float64 lanes over a
float32 row, say).

Written as plain loops over an ``acc`` array (:func:`row_total_loop`, :func:`dot_total_loop`,
the references), LLVM does not vectorise these sums: it cannot prove that ``acc`` and the row do
not overlap, and without reassociation (not allowed: it would change the bits) it may not turn
the lanes into a vector on its own. So the 16 partial sums are one LLVM vector ``<16 x float>``
(or ``double``) built by :func:`lane_sums` / :func:`lane_dots` (Numba intrinsics): each step
loads 16 elements and adds them lane by lane (``fadd`` on a vector is 16 IEEE additions, the
same as the loop's); the lanes are then added in order as before. Same bits as the loops
(tests/test_fused_kernels.py), 2-4x faster on rows in cache.

:func:`row_max_f32` is the largest of ``row[:n]`` read through an int32 view of the row: a float
compare-and-select loop does not vectorise (LLVM may not reorder it without assuming no NaN),
an integer max does. ``b ^ ((b >> 31) & 0x7FFFFFFF)`` maps float32 bit patterns to int32 keys
in the floats' order (negative floats have their magnitude bits flipped), so the largest key is
the largest float, exactly (a max does not round); a NaN maps above +inf, so a row holding one
has a NaN maximum, as numpy's ``max`` has. The map is its own inverse.
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import njit
from numba.core import cgutils, types
from numba.extending import intrinsic

LANES = 16  # partial sums of row_total

_LOG2E = np.float32(1.44269504088896341)
_LN2_HI = np.float32(0.693359375)  # ln 2 = _LN2_HI + _LN2_LO; _LN2_HI has few mantissa bits, so k * _LN2_HI is exact
_LN2_LO = np.float32(-2.12194440e-4)
_P0, _P1, _P2, _P3, _P4, _P5 = (np.float32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3,
                                                       4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1))
X_MIN = np.float32(-87.0)
X_MAX = np.float32(88.0)


@njit(inline="always", cache=True)
def expf_parts(x):
    """float32 x -> (e^f, int32 bits of 2^k) with e^x = e^f * 2^k; x clamped to [X_MIN, X_MAX]."""
    if x < X_MIN:
        x = X_MIN
    if x > X_MAX:
        x = X_MAX
    k = np.floor(x * _LOG2E + np.float32(0.5))
    f = x - k * _LN2_HI
    f = f - k * _LN2_LO
    y = ((((_P0 * f + _P1) * f + _P2) * f + _P3) * f + _P4) * f + _P5
    return y * (f * f) + f + np.float32(1.0), (np.int32(k) + np.int32(127)) << 23


@intrinsic
def f32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the low 32 bits of the integer ``bits`` (a bitcast)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        if bits.bitwidth > 32:
            v = builder.trunc(v, context.get_value_type(types.int32))
        elif bits.bitwidth < 32:
            v = builder.sext(v, context.get_value_type(types.int32))
        return builder.bitcast(v, context.get_value_type(types.float32))

    return types.float32(bits), codegen


@njit(inline="always", cache=True)
def expf32(x):
    """float32 e^x = e^f * 2^k (:func:`expf_parts`, the same bits); x clamped to [X_MIN, X_MAX]."""
    y, b = expf_parts(x)
    return y * f32_from_bits(b)


@njit(inline="always", cache=True)
def row_total_loop(acc, row, n):
    """Reference of :func:`row_total`: the lanes in ``acc`` (LANES,), a plain loop."""
    n16 = n - n % LANES
    for u in range(LANES):
        acc[u] = 0
    for j0 in range(0, n16, LANES):
        for u in range(LANES):
            acc[u] += row[j0 + u]
    total = acc[0]
    for u in range(1, LANES):
        total += acc[u]
    for j in range(n16, n):
        total += row[j]
    return total


@njit(inline="always", cache=True)
def dot_total_loop(acc, a, b, n):
    """Reference of :func:`dot_total`: the lanes in ``acc`` (LANES,), a plain loop."""
    n16 = n - n % LANES
    for u in range(LANES):
        acc[u] = 0
    for j0 in range(0, n16, LANES):
        for u in range(LANES):
            acc[u] += a[j0 + u] * b[j0 + u]
    total = acc[0]
    for u in range(1, LANES):
        total += acc[u]
    for j in range(n16, n):
        total += a[j] * b[j]
    return total


def _lanes_codegen(term_of):
    """LLVM IR of lane_sums / lane_dots / lane_wide_squares: a <LANES x acc dtype> vector, zero,
    then for j0 = lo, lo + LANES, ... < hi: acc += the term of row[j0 : j0 + LANES] (``term_of``:
    "sum" the elements, "dot" a * b multiplied in the rows' dtype, "wide_square" x * x multiplied
    in the lanes' dtype; each widened to the lanes' dtype first where it is wider); returned as a
    LANES-tuple."""
    n_rows = 2 if term_of == "dot" else 1

    def codegen(context, builder, sig, args):
        row_types, lo, hi = sig.args[1:1 + n_rows], args[1 + n_rows], args[2 + n_rows]
        rows = [context.make_array(t)(context, builder, a) for t, a in zip(row_types, args[1:1 + n_rows])]
        intp = context.get_value_type(types.intp)
        elem = context.get_value_type(row_types[0].dtype)
        lane = context.get_value_type(sig.return_type.dtype)
        width = context.get_abi_sizeof(elem)
        acc = cgutils.alloca_once_value(builder, ir.Constant(ir.VectorType(lane, LANES), None))  # zeros

        def load(ary, aty, j):  # row[j : j + LANES] as a vector
            if aty.layout == "C":  # one unaligned vector load
                ptr = builder.bitcast(builder.gep(ary.data, [j]), ir.VectorType(elem, LANES).as_pointer())
                return builder.load(ptr, align=width)
            stride = builder.extract_value(ary.strides, 0)  # strided row: element by element
            base = builder.ptrtoint(ary.data, intp)
            vec = ir.Constant(ir.VectorType(elem, LANES), None)
            for u in range(LANES):
                addr = builder.add(base, builder.mul(builder.add(j, intp(u)), stride))
                vec = builder.insert_element(vec, builder.load(builder.inttoptr(addr, elem.as_pointer())), intp(u))
            return vec

        with cgutils.for_range_slice(builder, lo, hi, intp(LANES)) as (j, _):
            vals = [load(a, t, j) for a, t in zip(rows, row_types)]
            term = builder.fmul(vals[0], vals[1]) if term_of == "dot" else vals[0]
            if lane != elem:
                term = builder.fpext(term, ir.VectorType(lane, LANES))
            if term_of == "wide_square":
                term = builder.fmul(term, term)
            builder.store(builder.fadd(builder.load(acc), term), acc)
        vec = builder.load(acc)
        out = cgutils.get_null_value(context.get_value_type(sig.return_type))
        for u in range(LANES):
            out = builder.insert_value(out, builder.extract_element(vec, intp(u)), u)
        return out
    return codegen


def _lanes_signature(acc, rows, lo, hi):
    """(LANES-tuple of acc's dtype)(acc, *rows, lo, hi), or None (a typing error) unless every row
    is a 1-d float array of one dtype no wider than acc's."""
    if not (isinstance(acc, types.Array) and isinstance(acc.dtype, types.Float)):
        return None
    dt = rows[0].dtype if isinstance(rows[0], types.Array) else None
    if not all(isinstance(r, types.Array) and r.ndim == 1 and r.dtype == dt for r in rows):
        return None
    if not (isinstance(dt, types.Float) and dt.bitwidth <= acc.dtype.bitwidth):
        return None
    return types.UniTuple(acc.dtype, LANES)(acc, *rows, lo, hi)


@intrinsic
def lane_sums(typingctx, acc, row, lo, hi):
    """The LANES partial sums of row[lo:hi] (hi - lo a multiple of LANES) in acc's dtype: lane u
    adds row[lo + u], row[lo + u + LANES], ... in order. ``acc`` only gives the dtype."""
    sig = _lanes_signature(acc, (row,), lo, hi)
    return None if sig is None else (sig, _lanes_codegen("sum"))


@intrinsic
def lane_dots(typingctx, acc, a, b, lo, hi):
    """As :func:`lane_sums`, of the products a[j] * b[j] (rounded to the rows' dtype)."""
    sig = _lanes_signature(acc, (a, b), lo, hi)
    return None if sig is None else (sig, _lanes_codegen("dot"))


@intrinsic
def lane_wide_squares(typingctx, acc, row, lo, hi):
    """As :func:`lane_sums`, of the squares x * x formed in acc's dtype (exact for float32 x in
    float64 lanes)."""
    sig = _lanes_signature(acc, (row,), lo, hi)
    return None if sig is None else (sig, _lanes_codegen("wide_square"))


@njit(inline="always", cache=True)
def lanes_in_order(lanes):
    """lanes[0] + lanes[1] + ... + lanes[LANES - 1], left to right."""
    total = lanes[0]
    for u in range(1, LANES):
        total += lanes[u]
    return total


@njit(inline="always", cache=True)
def row_total(acc, row, n):
    """sum of row[:n] in LANES interleaved partial sums of acc's dtype (module docstring); the
    same bits as :func:`row_total_loop`. acc: (LANES,), read for its dtype only."""
    n16 = n - n % LANES
    total = lanes_in_order(lane_sums(acc, row, 0, n16))
    for j in range(n16, n):
        total += row[j]
    return total


@njit(inline="always", cache=True)
def dot_total(acc, a, b, n):
    """sum of a[j] * b[j] over j < n, in :func:`row_total`'s order (the same bits as row_total
    over the rounded products, and as :func:`dot_total_loop`). acc: (LANES,), for its dtype."""
    n16 = n - n % LANES
    total = lanes_in_order(lane_dots(acc, a, b, 0, n16))
    for j in range(n16, n):
        total += a[j] * b[j]
    return total


@njit(inline="always", cache=True)
def wide_squares_total(acc, row, lo, hi):
    """sum of row[j] * row[j] over lo <= j < hi (hi - lo a multiple of LANES), each square
    formed in acc's dtype, in :func:`row_total`'s lane order (the lanes one LLVM vector)."""
    return lanes_in_order(lane_wide_squares(acc, row, lo, hi))


def wide_squares_total_loop(acc, row, lo, hi):
    """Reference of :func:`wide_squares_total`: the lanes in ``acc`` (LANES,), a plain loop."""
    for u in range(LANES):
        acc[u] = 0
    for j0 in range(lo, hi, LANES):
        for u in range(LANES):
            x = acc.dtype.type(row[j0 + u])
            acc[u] += x * x
    total = acc[0]
    for u in range(1, LANES):
        total += acc[u]
    return total


if numba.config.DISABLE_JIT:  # plain Python (debugging): intrinsics cannot run there, the loops can
    row_total, dot_total, wide_squares_total = row_total_loop, dot_total_loop, wide_squares_total_loop


_MAGNITUDE = np.int32(0x7FFFFFFF)


@njit(inline="always", cache=True)
def _order_key(b):
    """int32 bits of a float32 -> an int32 in the floats' order (its own inverse)."""
    return b ^ ((b >> 31) & _MAGNITUDE)


@njit(inline="always", cache=True)
def row_max_f32(bits, n, out):
    """max of the float32 row whose int32 view is ``bits[:n]`` (n >= 1), exactly; ``out``: a
    float32 scratch array of length >= 1 (the key goes back to a float through its memory)."""
    key = _order_key(bits[0])
    for j in range(1, n):
        k = _order_key(bits[j])
        key = k if k > key else key
    out.view(np.int32)[0] = _order_key(key)
    return out[0]


def _expf_loop(x, out):
    """x (n,) float32 -> out = e^x by :func:`expf32`."""
    for j in range(x.shape[0]):
        out[j] = expf32(x[j])


def _expf_parts_loop(x, bits, out):
    """x (n,) float32 -> out = e^f, bits = 2^k as int32 (the memory of a float32 array)."""
    for j in range(x.shape[0]):
        out[j], bits[j] = expf_parts(x[j])


def expf_rows(x):
    """e^x elementwise for a float32 array with :func:`expf32` (the accuracy tests use it)."""
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    y = np.empty_like(flat)
    _expf_numba(flat, y)
    return y.reshape(np.shape(x))


def expf_rows_two_pass(x):
    """e^x as e^f times the 2^k stored through an int32 view, in a second pass: what
    :func:`expf32`'s bitcast replaces (the tests check both give the same bits)."""
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    y = np.empty_like(flat)
    two_k = np.empty_like(flat)
    _expf_parts_numba(flat, two_k.view(np.int32), y)
    return (y * two_k).reshape(np.shape(x))


_expf_numba = njit(cache=True, nogil=True)(_expf_loop)
_expf_parts_numba = njit(cache=True, nogil=True)(_expf_parts_loop)
