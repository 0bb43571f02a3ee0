// Deterministic scatter-add along axis 0 for the cupy backend (wrapper: backends/cupy_scatter.py).
//
// Reference: the numpy backend's np.add.at(out, idx, vals) (backends/numpy_backend.py), which
// adds vals[i] into out[idx[i]] for i = 0, 1, ..., n-1, in that order. The wrapper sorts the n
// indices stably (perm) and marks where each output row's run of entries starts (start, M+1
// entries: row m owns perm[start[m] .. start[m+1]-1], in increasing i). One thread per output
// element (m, c) then adds its row's entries in increasing i, starting from out[m, c]: the same
// additions in the same order as np.add.at, so the result is bit-identical to NumPy's and to
// itself from run to run. (cupyx.scatter_add uses float atomicAdd, which sums duplicates in a
// scheduling-dependent order: two identical runs could differ in the last bit, which breaks
// exact resume and golden replays.)
//
// No atomics, no fast-math. Sums use refmtp_add_rn (refmtp_common.cuh: __fadd_rn / __dadd_rn on
// the device, plain IEEE + on the host), so nothing is contracted. Float and double instantiations.
// scatter_add_element is __host__ __device__ so tests/test_backends.py can run the exact same
// code on the CPU (a host harness compiled with nvcc).
//
//   vals  (n, C) T contiguous      perm (n,) int64      start (M+1,) int64      out (M, C) T

#include "refmtp_common.cuh"

// out[i] (i = m*C + c) += vals[perm[r]*C + c] for r = start[m] .. start[m+1]-1, in that order.
template <typename T>
__host__ __device__ inline void scatter_add_element(const T* vals, const long long* perm,
                                                    const long long* start, long long C,
                                                    long long i, T* out) {
    const long long m = i / C;
    const long long c = i - m * C;
    const long long first = start[m];
    const long long last = start[m + 1];
    if (first == last) {
        return;  // no entry for this row: out stays as it is (as with np.add.at)
    }
    T acc = out[i];
    for (long long r = first; r < last; ++r) {
        acc = refmtp_add_rn(acc, vals[perm[r] * C + c]);
    }
    out[i] = acc;
}

// One thread per output element, grid-stride loop over the M*C elements.
template <typename T>
__global__ void scatter_add_rows(const T* __restrict__ vals, const long long* __restrict__ perm,
                                 const long long* __restrict__ start, long long M, long long C,
                                 T* __restrict__ out) {
    const long long total = M * C;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        scatter_add_element<T>(vals, perm, start, C, i, out);
    }
}
