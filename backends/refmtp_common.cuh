// Shared device helpers of every refmtp CUDA source (backends/*.cu #include this file).
//
// Round-to-nearest arithmetic: on the device the _rn intrinsics (__fadd_rn, __dmul_rn, ...),
// which the compiler never contracts into a fused multiply-add, so every product and sum rounds
// exactly like NumPy's (IEEE round-to-nearest, one rounding per operation) whatever --fmad says.
// On the host (tests compile the per-element code with nvcc as a CPU program) they are the
// plain operators, which a host compiler does not contract either (-ffp-contract=off is the
// default without fast-math). Overloaded for float and double, so templates call
// refmtp_add_rn(a, b) for either T.
//
// Grid-stride helpers: refmtp_global_id() / refmtp_global_stride() for a 1-d launch
// (backends/cupy_kernels.py:launch sizes every grid).
//
// NVRTC finds this file through the -I<backends dir> option of cupy_kernels.NVRTC_OPTIONS;
// nvcc through the quoted include (same directory) or the same -I.
#pragma once

__host__ __device__ __forceinline__ float refmtp_add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}

__host__ __device__ __forceinline__ double refmtp_add_rn(double a, double b) {
#ifdef __CUDA_ARCH__
    return __dadd_rn(a, b);
#else
    return a + b;
#endif
}

__host__ __device__ __forceinline__ float refmtp_sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fsub_rn(a, b);
#else
    return a - b;
#endif
}

__host__ __device__ __forceinline__ double refmtp_sub_rn(double a, double b) {
#ifdef __CUDA_ARCH__
    return __dsub_rn(a, b);
#else
    return a - b;
#endif
}

__host__ __device__ __forceinline__ float refmtp_mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}

__host__ __device__ __forceinline__ double refmtp_mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
    return __dmul_rn(a, b);
#else
    return a * b;
#endif
}

#ifdef __CUDACC__
__device__ __forceinline__ long long refmtp_global_id() {
    return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ long long refmtp_global_stride() {
    return (long long)gridDim.x * blockDim.x;
}
#endif
