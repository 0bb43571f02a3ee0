// Fused softmax cross-entropy forward/backward for the cupy backend.
// Reference: refmtp/model/ops/xent.py xent_forward_ref / xent_backward_ref (same math).
// One block per row, a shared-memory tree reduction for max and sum(exp). No fast-math:
// exp/log are the IEEE-accurate device functions. Instantiated for float and double.
//
//   forward:  lse_n = log(sum_v exp(z_nv - m_n)) + m_n,  loss_n = lse_n - z_n[y_n] (0 if ignored)
//   backward: dz_nv = dloss_n * (exp(z_nv - lse_n) - [v == y_n])  (0 if ignored)

#include "refmtp_common.cuh"

template <typename T>
__device__ T block_reduce_max(T v, T* smem) {
    int tid = threadIdx.x;
    smem[tid] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (tid < s && smem[tid + s] > smem[tid]) smem[tid] = smem[tid + s];
        __syncthreads();
    }
    T r = smem[0];
    __syncthreads();
    return r;
}

template <typename T>
__device__ T block_reduce_sum(T v, T* smem) {
    int tid = threadIdx.x;
    smem[tid] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (tid < s) smem[tid] += smem[tid + s];
        __syncthreads();
    }
    T r = smem[0];
    __syncthreads();
    return r;
}

// blockDim.x must be a power of two; shared memory: blockDim.x * sizeof(T)
template <typename T>
__global__ void xent_forward(const T* __restrict__ logits, const long long* __restrict__ targets,
                             long long ignore_index, T* __restrict__ losses, T* __restrict__ lse,
                             int N, int V) {
    extern __shared__ unsigned char smem_raw[];
    T* smem = reinterpret_cast<T*>(smem_raw);
    for (int n = blockIdx.x; n < N; n += gridDim.x) {
        const T* z = logits + (long long)n * V;
        T m = z[0];
        for (int v = threadIdx.x; v < V; v += blockDim.x) m = z[v] > m ? z[v] : m;
        m = block_reduce_max<T>(m, smem);
        T s = 0;
        for (int v = threadIdx.x; v < V; v += blockDim.x) s += exp(z[v] - m);
        s = block_reduce_sum<T>(s, smem);
        if (threadIdx.x == 0) {
            T l = log(s) + m;
            lse[n] = l;
            long long t = targets[n];
            losses[n] = (t == ignore_index) ? T(0) : l - z[t];
        }
    }
}

template <typename T>
__global__ void xent_backward(const T* __restrict__ dlosses, const T* __restrict__ logits,
                              const long long* __restrict__ targets, const T* __restrict__ lse,
                              long long ignore_index, T* __restrict__ dlogits, int N, int V) {
    long long total = (long long)N * V;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        int n = (int)(i / V);
        int v = (int)(i % V);
        long long t = targets[n];
        if (t == ignore_index) {
            dlogits[i] = T(0);
        } else {
            T p = exp(logits[i] - lse[n]);
            dlogits[i] = dlosses[n] * (p - (v == t ? T(1) : T(0)));
        }
    }
}
