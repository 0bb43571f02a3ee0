// MoE dispatch and combine kernels for the cupy backend (wrappers: backends/cupy_moe.py).
//
// References (same math, plain arrays): refmtp/model/moe.py moe_dispatch_plan_ref, moe_permute_ref,
// moe_permute_backward_ref, moe_combine_ref, moe_combine_backward_ref. Slots are numbered
// j = n*K + k (token n, its k-th expert); `order` lists slot ids sorted by expert (stable) and
// `pos` is its inverse (pos[order[p]] = p).
//
// Determinism: no atomics at all. Every output element is owned by one thread, which adds its
// token's K slots in dispatch order p (the order of the reference's scatter-add, np.add.at),
// with refmtp_mul_rn / refmtp_add_rn (refmtp_common.cuh: the round-to-nearest intrinsics
// __fmul_rn, __dadd_rn, ..., never contracted into fused multiply-adds), so the products and
// sums round exactly like NumPy's.
// Combine and the permute's backward are therefore bit-exact with the NumPy reference;
// dweight is a sequential sum over d in double (like the Numba kernel), to rounding with
// NumPy's pairwise sum. No fast-math; float and double instantiations.
//
// Index arguments: long long (int64) arrays and slot counts, int K, d and E.

#include "refmtp_common.cuh"

// ---- dispatch plan: a stable counting sort of the S slots by expert ---------------------
// 1. counts[e] = #{j : flat_idx[j] == e}; one thread per expert scans every slot (no atomics).
__global__ void moe_plan_count(const long long* flat_idx, long long S, int E, long long* counts) {
    for (long long e = refmtp_global_id(); e < E; e += refmtp_global_stride()) {
        long long c = 0;
        for (long long j = 0; j < S; ++j) c += (flat_idx[j] == e) ? 1 : 0;
        counts[e] = c;
    }
}

// 2. order[offsets[e] + r] = the r-th slot (in slot order) that chose expert e: stable.
__global__ void moe_plan_place(const long long* flat_idx, long long S, int E,
                               const long long* offsets, long long* order) {
    for (long long e = refmtp_global_id(); e < E; e += refmtp_global_stride()) {
        long long p = offsets[e];
        for (long long j = 0; j < S; ++j) {
            if (flat_idx[j] == e) order[p++] = j;
        }
    }
}

// pos[order[p]] = p (order is a permutation, so every write has its own address).
__global__ void moe_inverse_permutation(const long long* order, long long S, long long* pos) {
    for (long long p = refmtp_global_id(); p < S; p += refmtp_global_stride()) pos[order[p]] = p;
}

// ---- permute: xs[p, c] = x[order[p] / K, c] ----------------------------------------------
template <typename T>
__global__ void moe_permute(const T* x, const long long* order, long long S, int K, int d, T* xs) {
    for (long long i = refmtp_global_id(); i < S * d; i += refmtp_global_stride()) {
        const long long p = i / d;
        const long long c = i - p * d;
        xs[i] = x[(order[p] / K) * d + c];
    }
}

// The position of token n's slots in dispatch order, ascending: the r-th smallest of
// pos[n*K .. n*K+K-1], found by selection (K is small; no local arrays needed).
__device__ __forceinline__ long long next_slot(const long long* pos, long long n, int K,
                                               long long last, long long S) {
    long long best = S;
    for (int k = 0; k < K; ++k) {
        const long long q = pos[n * K + k];
        if (q > last && q < best) best = q;
    }
    return best;
}

// ---- permute backward: dx[n, c] = sum over n's slots p (ascending) of dxs[p, c] ----------
template <typename T>
__global__ void moe_permute_backward(const T* dxs, const long long* pos, long long N, int K, int d,
                                     T* dx) {
    const long long S = N * K;
    for (long long i = refmtp_global_id(); i < N * d; i += refmtp_global_stride()) {
        const long long n = i / d;
        const long long c = i - n * d;
        T acc = T(0);
        long long last = -1;
        for (int r = 0; r < K; ++r) {
            const long long p = next_slot(pos, n, K, last, S);
            acc = refmtp_add_rn(acc, dxs[p * d + c]);
            last = p;
        }
        dx[i] = acc;
    }
}

// ---- combine: y[n, c] = sum over n's slots p (ascending) of ys[p, c] * w[order[p]] -------
template <typename T>
__global__ void moe_combine(const T* ys, const long long* order, const long long* pos,
                            const T* weight, long long N, int K, int d, T* y) {
    const long long S = N * K;
    for (long long i = refmtp_global_id(); i < N * d; i += refmtp_global_stride()) {
        const long long n = i / d;
        const long long c = i - n * d;
        T acc = T(0);
        long long last = -1;
        for (int r = 0; r < K; ++r) {
            const long long p = next_slot(pos, n, K, last, S);
            acc = refmtp_add_rn(acc, refmtp_mul_rn(ys[p * d + c], weight[order[p]]));
            last = p;
        }
        y[i] = acc;
    }
}

// ---- combine backward, 1: dys[p, c] = dy[order[p] / K, c] * w[order[p]] -----------------
template <typename T>
__global__ void moe_combine_backward_dys(const T* dy, const long long* order, const T* weight,
                                         long long S, int K, int d, T* dys) {
    for (long long i = refmtp_global_id(); i < S * d; i += refmtp_global_stride()) {
        const long long p = i / d;
        const long long c = i - p * d;
        const long long j = order[p];
        dys[i] = refmtp_mul_rn(dy[(j / K) * d + c], weight[j]);
    }
}

// ---- combine backward, 2: dweight[order[p]] = <dy[order[p] / K], ys[p]> -----------------
// One thread per slot; products in T, accumulated in double in c order (as the Numba kernel).
template <typename T>
__global__ void moe_combine_backward_dweight(const T* dy, const T* ys, const long long* order,
                                             long long S, int K, int d, T* dweight) {
    for (long long p = refmtp_global_id(); p < S; p += refmtp_global_stride()) {
        const long long j = order[p];
        const T* dyn = dy + (j / K) * d;
        const T* ysp = ys + p * d;
        double acc = 0.0;
        for (int c = 0; c < d; ++c) acc = refmtp_add_rn(acc, (double)refmtp_mul_rn(dyn[c], ysp[c]));
        dweight[j] = (T)acc;
    }
}
