// RNG-v1 speculative-decoding acceptance for N requests (docs/speculative-decoding.md §2.2).
//
// CUDA twin of refmtp.inference.acceptance.verify_drafts_batch_ref (wrapper: backends/cupy_accept.py).
// One thread per request, grid-stride over requests. Each thread runs the rule sequentially in
// float64 (inputs of type T are upcast element by element) and sums the CDF in index order, so
// its decisions are bit-identical to the numpy reference (numpy's cumsum is sequential too); a
// parallel scan would round differently. No fast-math, and no a*b+c expression exists in this
// file, so FMA contraction cannot change a decision.
//
// Layout (C-contiguous):
//   p       (N, K+1, V) T    processed target probabilities
//   q       (N, K, V)   T    draft distributions; ignored when has_q == 0 (one-hot drafts)
//   drafts  (N, K)      int64
//   u_accept(N, K)      double, u_sample (N,) double
//   greedy  (N,)        bool
//   scores  (N, K+1, V) L    logits (or p) for the greedy argmax of R1
// Outputs: num_accepted (N,) int64, tokens (N, K+1) int64 (-1 padded), residual_fallback (N,),
// is_bonus (N,) bool. Inputs are validated on the host (refmtp.inference.acceptance.verify_drafts_batch).
//
// verify_one<T, L> is __host__ __device__ so tests can run the exact same code on the CPU
// (tests/test_accept_kernels.py compiles a host harness with nvcc).

#include "refmtp_common.cuh"

#define REFMTP_W_P 0         // w = p_j (bonus row or the residual fallback)
#define REFMTP_W_RESIDUAL 1  // w = max(p_j - q_j, 0)
#define REFMTP_W_ONEHOT 2    // w = p_j with w[d_j] = 0 (q = None)

template <typename T>
__host__ __device__ inline double refmtp_weight(const T* p_row, const T* q_row, long long i,
                                                long long d, int mode) {
    double p_i = (double)p_row[i];
    if (mode == REFMTP_W_RESIDUAL) {
        double r = p_i - (double)q_row[i];
        return r > 0.0 ? r : 0.0;
    }
    if (mode == REFMTP_W_ONEHOT && i == d) {
        return 0.0;
    }
    return p_i;
}

// R5: smallest i with w_i > 0 and cumsum_i > u*S (strict), else the largest i with w_i > 0,
// else -1 (no positive weight).
template <typename T>
__host__ __device__ long long refmtp_icdf(const T* p_row, const T* q_row, long long V,
                                          long long d, int mode, double u) {
    double S = 0.0;
    for (long long i = 0; i < V; ++i) {
        S += refmtp_weight(p_row, q_row, i, d, mode);
    }
    const double t = u * S;
    double c = 0.0;
    long long last_positive = -1;
    for (long long i = 0; i < V; ++i) {
        const double w = refmtp_weight(p_row, q_row, i, d, mode);
        c += w;
        if (w > 0.0) {
            if (c > t) {
                return i;
            }
            last_positive = i;
        }
    }
    return last_positive;
}

template <typename T, typename L>
__host__ __device__ void verify_one(const T* __restrict__ p, const T* __restrict__ q, int has_q,
                                    const long long* __restrict__ drafts,
                                    const double* __restrict__ u_accept,
                                    const double* __restrict__ u_sample,
                                    const bool* __restrict__ greedy, const L* __restrict__ scores,
                                    long long n, int K, int V, long long* num_accepted,
                                    long long* tokens, bool* residual_fallback, bool* is_bonus) {
    const long long K1 = (long long)K + 1;
    const long long Vl = (long long)V;
    long long* tok = tokens + n * K1;  // (K+1,)
    const long long* dr = drafts + n * (long long)K;  // (K,)
    for (long long k = 0; k < K1; ++k) {
        tok[k] = -1;
    }
    residual_fallback[n] = false;
    long long A = K;
    if (greedy[n]) {  // R1: argmax of the scores, first index on ties
        for (long long k = 0; k < K1; ++k) {
            const L* s = scores + (n * K1 + k) * Vl;
            long long g = 0;
            for (long long i = 1; i < Vl; ++i) {
                if (s[i] > s[g]) {
                    g = i;
                }
            }
            tok[k] = g;
            if (k < K && dr[k] == g) {
                continue;
            }
            A = k;
            break;
        }
        num_accepted[n] = A;
        is_bonus[n] = (A == K);
        return;
    }
    for (long long k = 0; k < K; ++k) {  // R2 accept test
        const long long d = dr[k];
        const double p_d = (double)p[(n * K1 + k) * Vl + d];
        const double q_d = has_q ? (double)q[(n * (long long)K + k) * Vl + d] : 1.0;
        const double uq = u_accept[n * (long long)K + k] * q_d;
        if (p_d > 0.0 && uq <= p_d) {
            tok[k] = d;
            continue;
        }
        A = k;
        break;
    }
    const T* p_row = p + (n * K1 + A) * Vl;  // (V,) p_j, or the bonus row when A == K
    long long y;
    if (A < K) {  // R3 residual at the first rejection
        const T* q_row = has_q ? q + (n * (long long)K + A) * Vl : p_row;
        const int mode = has_q ? REFMTP_W_RESIDUAL : REFMTP_W_ONEHOT;
        y = refmtp_icdf(p_row, q_row, Vl, dr[A], mode, u_sample[n]);
        if (y < 0) {  // residual all zero (rounding only): fallback to p_j
            residual_fallback[n] = true;
            y = refmtp_icdf(p_row, p_row, Vl, -1, REFMTP_W_P, u_sample[n]);
        }
    } else {  // R4 bonus
        y = refmtp_icdf(p_row, p_row, Vl, -1, REFMTP_W_P, u_sample[n]);
    }
    tok[A] = y;
    num_accepted[n] = A;
    is_bonus[n] = (A == K);
}

template <typename T, typename L>
__global__ void verify_drafts_batch(const T* __restrict__ p, const T* __restrict__ q, int has_q,
                                    const long long* __restrict__ drafts,
                                    const double* __restrict__ u_accept,
                                    const double* __restrict__ u_sample,
                                    const bool* __restrict__ greedy, const L* __restrict__ scores,
                                    int N, int K, int V, long long* num_accepted,
                                    long long* tokens, bool* residual_fallback, bool* is_bonus) {
    for (long long n = (long long)blockIdx.x * blockDim.x + threadIdx.x; n < N;
         n += (long long)blockDim.x * gridDim.x) {
        verify_one<T, L>(p, q, has_q, drafts, u_accept, u_sample, greedy, scores, n, K, V,
                         num_accepted, tokens, residual_fallback, is_bonus);
    }
}
