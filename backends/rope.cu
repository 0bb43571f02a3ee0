// RoPE in DeepSeek's interleaved pair layout (docs/deepseek-v3.md §2.4), forward and backward.
//
// Reference: refmtp/model/ops/rope.py::rope_apply_ref; wrapper: backends/cupy_rope.py (same signature).
//   x, y   (N, T, Dr) contiguous; pair p = (n, t, j) holds x[2p], x[2p+1] with j = p % half,
//   cos_t, sin_t (T, half), half = Dr / 2:
//     y[2j]   = x[2j] c - x[2j+1] s
//     y[2j+1] = x[2j] s + x[2j+1] c
//   Backward is the same kernel with -sin (rotation by -m theta').
//
// One thread per pair, grid-stride loop. Every product and sum goes through the _rn intrinsics
// (refmtp_mul_rn / refmtp_add_rn / refmtp_sub_rn of refmtp_common.cuh),
// which the compiler never contracts into an FMA, so results are IEEE round-to-nearest like the
// NumPy/Numba reference (bit-exact parity), whatever --fmad is set to. No fast-math.
// Instantiated for float and double (rope_apply<float>, rope_apply<double>).

#include "refmtp_common.cuh"

template <typename scalar_t>
__global__ void rope_apply(const scalar_t* __restrict__ x,
                           const scalar_t* __restrict__ cos_t,
                           const scalar_t* __restrict__ sin_t,
                           scalar_t* __restrict__ y,
                           long long n_pairs,  // N * T * half
                           long long seq_len,  // T
                           long long half)     // Dr / 2
{
    const long long stride = (long long)blockDim.x * gridDim.x;
    for (long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x; p < n_pairs; p += stride) {
        const long long j = p % half;              // pair index inside the Dr-vector
        const long long t = (p / half) % seq_len;  // token row of the tables
        const scalar_t a = x[2 * p];
        const scalar_t b = x[2 * p + 1];
        const scalar_t c = cos_t[t * half + j];
        const scalar_t s = sin_t[t * half + j];
        y[2 * p] = refmtp_sub_rn(refmtp_mul_rn(a, c), refmtp_mul_rn(b, s));
        y[2 * p + 1] = refmtp_add_rn(refmtp_mul_rn(a, s), refmtp_mul_rn(b, c));
    }
}
