// Fused MultiMax attention for CPU: softmax(σ(scale·QKᵀ + bias) + mask)·V, flash-attention style.
//
// Built by hf_multimax/kernels/cpu.py with the system C++ compiler (no Torch headers: it builds in seconds) and
// called through ctypes. Matrix products go to the BLAS `sgemm_` that libtorch_cpu exports (MKL on x86 wheels);
// the element-wise work (σ, its derivative, softmax, dropout, the parameter-gradient sums) is fused into one or two
// vectorised passes over each (block_q × block_k) tile that is still in cache. Nothing larger than a tile of scores
// is ever held: the forward keeps one log-sum-exp per row, the backward recomputes the scores.
//
// Layout conventions (all float32, last dimension contiguous, other strides in elements):
//   q (B, H, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv) with query head h reading key/value head h / (H / Hkv);
//   out and dout (B, Lq, H, Dv) through strides; stats (2, B, H, Lq) contiguous: the row
//   maximum m of σ(s) + mask, then log Σ exp(σ(s) + mask - m); masked scores are -inf (float masks arrive with -inf
//   where masked), and a row with none left has m = -inf: zero output, zero gradients;
//   dq (kv_split, B, H, Lq, D), dk (B, Hkv, Lk, D), dv (B, Hkv, Lk, Dv) contiguous (zeroed here, by their owners);
//   ranges and ts (H, 2N) contiguous; pacc (kv_split, B, H, 4N) float64: Σ dZ·a^n (2N entries) then Σ dZ·a^(n-1);
//   dbias (dbias_b, dbias_h, Lq, Lk) contiguous, dbias_b ∈ {1, B}, dbias_h ∈ {1, H}.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <omp.h>

extern "C" {

typedef void (*sgemm_fn)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                         const int*, const float*, const int*, const float*, float*, const int*);

struct MMArgs {
    const float* q; int64_t q_sb, q_sh, q_sl;
    const float* k; int64_t k_sb, k_sh, k_sl;
    const float* v; int64_t v_sb, v_sh, v_sl;
    const float* bias; int64_t bias_sb, bias_sh, bias_sl;
    const void* mask; int64_t mask_kind, mask_sb, mask_sh, mask_sl;  // kind: 0 none, 1 bool (uint8), 2 float
    const float* ranges; const float* ts; int64_t order;
    float* out; int64_t o_sb, o_sh, o_sl;
    float* stats;
    const float* dout; int64_t do_sb, do_sh, do_sl;
    float* dq; float* dk; float* dv; double* pacc;
    float* dbias; int64_t dbias_b, dbias_h;
    int64_t B, H, Hkv, Lq, Lk, D, Dv;
    double scale; int64_t causal; double dropout; int64_t seed;
    int64_t block_q, block_k, nthreads;
    int64_t kv_split;  // backward: key blocks split over this many tasks, each with its own dq/pacc slice
};

// Output-layer MultiMax + cross-entropy over one chunk of rows (hf_multimax/output_loss.py).
struct CEArgs {
    float* logits; int64_t rows, vocab, ld;  // in: logits s; out (need_grad): dLoss/ds
    const int64_t* labels; int64_t ignore_index;
    const float* ranges; const float* ts; int64_t order;
    double grad_scale; int64_t need_grad;
    float* loss;    // (rows,): logsumexp(σ(s)) - σ(s)[label], 0 for ignored rows
    double* pacc;   // (rows, 4N): Σ dZ·a^n then Σ dZ·a^(n-1), as for attention
    int64_t nthreads;
};

}  // extern "C"

namespace {

sgemm_fn g_sgemm = nullptr;

// One vector is one register of the build target: 16 float lanes with AVX-512, 8 with AVX/AVX2, 4 with NEON or SSE.
// (A vector wider than the registers is split by the compiler into several, which spills in the σ' pass.)
#if defined(__AVX512F__)
#define MM_VEC_BYTES 64
#elif defined(__AVX__)
#define MM_VEC_BYTES 32
#else
#define MM_VEC_BYTES 16
#endif
typedef float vf __attribute__((vector_size(MM_VEC_BYTES)));
typedef int32_t vi __attribute__((vector_size(MM_VEC_BYTES)));
typedef uint32_t vu __attribute__((vector_size(MM_VEC_BYTES)));
constexpr int W = MM_VEC_BYTES / 4;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

inline vf splat(float x) { return vf{} + x; }
inline vf loadu(const float* p) { vf v; __builtin_memcpy(&v, p, sizeof v); return v; }
inline void storeu(float* p, vf v) { __builtin_memcpy(p, &v, sizeof v); }
inline vf load_n(const float* p, int n, float fill) {
    vf v = splat(fill);
    for (int i = 0; i < n; ++i) v[i] = p[i];
    return v;
}
inline void store_n(float* p, vf v, int n) {
    for (int i = 0; i < n; ++i) p[i] = v[i];
}
// Lanes whose bool-mask byte is set (-1) or not (0); `n` valid lanes, the rest read as "masked".
typedef uint8_t vb __attribute__((vector_size(W)));
inline vi load_bool(const uint8_t* p, int n) {
    if (n == W) {
        vb bytes;
        __builtin_memcpy(&bytes, p, sizeof bytes);
        return __builtin_convertvector(bytes, vi) != 0;
    }
    vi m = vi{};
    for (int i = 0; i < n; ++i) m[i] = p[i] ? -1 : 0;
    return m;
}
inline float hsum(vf v) {
    float s = 0.f;
    for (int i = 0; i < W; ++i) s += v[i];
    return s;
}
inline float hmax(vf v) {
    float m = v[0];
    for (int i = 1; i < W; ++i) m = v[i] > m ? v[i] : m;
    return m;
}
inline vf lane_index() {
    vf v;
    for (int i = 0; i < W; ++i) v[i] = (float)i;
    return v;
}

inline vi lane_index_i() {
    vi v;
    for (int i = 0; i < W; ++i) v[i] = i;
    return v;
}

// exp(x) in float32, ~1 ulp (Cephes' expf polynomial); exactly 0 below -87.3 (so exp(finfo.min - m) is 0).
inline vf vexp(vf x) {
    vi under = x < -87.3365447505531f;
    x = x > 88.0f ? splat(88.0f) : x;
    x = x < -87.3365447505531f ? splat(-87.3365447505531f) : x;
    vf n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    vf r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    vf p = splat(1.9875691500E-4f);
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * (r * r) + r + 1.0f;
    vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    vf two_n;
    __builtin_memcpy(&two_n, &e, sizeof two_n);
    vf res = p * two_n;
    return under ? splat(0.f) : res;
}

// Counter-based dropout: keep (b, h, i, j) iff hash(row key ^ j·golden) >> 8 >= threshold. Mirrored bit for bit by
// hf_multimax/kernels/blocked.py so both paths drop the same entries.
inline uint32_t lowbias32(uint32_t x) {
    x ^= x >> 16; x *= 0x7feb352dU; x ^= x >> 15; x *= 0x846ca68bU; x ^= x >> 16;
    return x;
}
inline vu lowbias32v(vu x) {
    x ^= x >> 16; x *= 0x7feb352dU; x ^= x >> 15; x *= 0x846ca68bU; x ^= x >> 16;
    return x;
}
inline uint32_t row_key(uint32_t seed, uint64_t row) { return lowbias32(seed ^ lowbias32((uint32_t)row)); }
inline vf keep_scale(uint32_t key, int64_t j0, uint32_t threshold, float inv_keep) {
    vu j;
    for (int i = 0; i < W; ++i) j[i] = (uint32_t)(j0 + i);
    vu u = lowbias32v(key ^ (j * 0x9E3779B9U));
    vi keep = (vi)((u >> 8) >= threshold);
    return keep ? splat(inv_keep) : splat(0.f);
}

// Row-major C[M×N] = alpha·op(A)[M×K]·op(B)[K×N] + beta·C through the column-major BLAS.
inline void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                 const float* Bm, int64_t ldb, float beta, float* C, int64_t ldc) {
    if (M <= 0 || N <= 0) return;
    const char tA = tb ? 'T' : 'N', tB = ta ? 'T' : 'N';
    const int m = (int)N, n = (int)M, k = (int)K, la = (int)ldb, lb = (int)lda, lc = (int)ldc;
    g_sgemm(&tA, &tB, &m, &n, &k, &alpha, Bm, &la, A, &lb, &beta, C, &lc);
}

// σ with compile-time order ORD (1..4); ORD == 0 is never instantiated.
template <int ORD>
struct Seg {
    float r[2 * ORD], t[2 * ORD];
    explicit Seg(const float* ranges, const float* ts) {
        for (int i = 0; i < 2 * ORD; ++i) { r[i] = ranges[i]; t[i] = ts[i]; }
    }
    inline vf sigma(vf s) const {
        vf z = s;
#pragma GCC unroll 8
        for (int n = 1; n <= ORD; ++n) {
            vf a = r[2 * n - 2] - s, b = s - r[2 * n - 1];
            a = a > 0.f ? a : splat(0.f);
            b = b > 0.f ? b : splat(0.f);
            vf an = a, bn = b;
            for (int p = 1; p < n; ++p) { an *= a; bn *= b; }
            z = z + t[2 * n - 2] * an;
            z = z + t[2 * n - 1] * bn;
        }
        return z;
    }
    // dσ/ds, and the per-coefficient sums Σ dz·a^n (acc[0..2N)) and Σ dz·a^(n-1) (acc[2N..4N)).
    inline vf backward(vf s, vf dz, vf* acc) const {
        vf d = splat(1.f);
#pragma GCC unroll 8
        for (int n = 1; n <= ORD; ++n) {
            vf a = r[2 * n - 2] - s, b = s - r[2 * n - 1];
            vf a1, b1;  // a^(n-1), b^(n-1) (indicators for n = 1)
            if (n == 1) {
                a1 = a > 0.f ? splat(1.f) : splat(0.f);
                b1 = b > 0.f ? splat(1.f) : splat(0.f);
                a = a * a1; b = b * b1;  // relu, without propagating NaN differently
            } else {
                a = a > 0.f ? a : splat(0.f);
                b = b > 0.f ? b : splat(0.f);
                a1 = a; b1 = b;
                for (int p = 2; p < n; ++p) { a1 *= a; b1 *= b; }
            }
            acc[2 * n - 2] += dz * (a1 * a);
            acc[2 * n - 1] += dz * (b1 * b);
            acc[2 * ORD + 2 * n - 2] += dz * a1;
            acc[2 * ORD + 2 * n - 1] += dz * b1;
            d = d + (float)n * (t[2 * n - 1] * b1 - t[2 * n - 2] * a1);
        }
        return d;
    }
};

struct Workspace {
    float* buf = nullptr;
    size_t size = 0;
    float* get(size_t n) {
        if (n > size) {
            std::free(buf);
            buf = static_cast<float*>(std::aligned_alloc(64, ((n * sizeof(float) + 63) / 64) * 64));
            size = n;
        }
        return buf;
    }
    ~Workspace() { std::free(buf); }
};
thread_local Workspace tls_ws;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Number of valid columns of global row i in the key block starting at j0 with nk keys (causal: j <= i).
inline int64_t valid_cols(const MMArgs& a, int64_t i, int64_t j0, int64_t nk) {
    if (!a.causal) return nk;
    int64_t n = i + 1 - j0;
    return n < 0 ? 0 : (n > nk ? nk : n);
}

// σ(s + bias) + mask for one row chunk of `n` <= W lanes; `s` is overwritten with s + bias (what σ saw).
template <int ORD>
inline vf scores_chunk(const Seg<ORD>& seg, const MMArgs& a, vf& s, const float* brow, const void* mrow, int64_t c,
                       int n) {
    if (brow) s = s + (n == W ? loadu(brow + c) : load_n(brow + c, n, 0.f));
    vf z = seg.sigma(s);
    if (a.mask_kind == 1) {
        vi keep = load_bool(static_cast<const uint8_t*>(mrow) + c, n);
        z = keep ? z : splat(NEG_INF);
    } else if (a.mask_kind == 2) {
        const float* mr = static_cast<const float*>(mrow) + c;
        z = z + (n == W ? loadu(mr) : load_n(mr, n, 0.f));
    }
    return z;
}

template <int ORD>
void forward_impl(const MMArgs& a) {
    const int64_t BQ = a.block_q, BK = a.block_k;
    const int64_t nrep = a.H / a.Hkv, nqb = (a.Lq + BQ - 1) / BQ;
    const int64_t ntasks = a.B * a.H * nqb;
    const int64_t ldS = round_up(BK, W);
    const float scale = (float)a.scale;
    const bool drop = a.dropout > 0.0;
    const uint32_t threshold = (uint32_t)std::floor(a.dropout * 16777216.0 + 0.5);
    const float inv_keep = drop ? (float)(1.0 / (1.0 - a.dropout)) : 1.f;

#pragma omp parallel for schedule(dynamic, 1) num_threads((int)a.nthreads)
    for (int64_t task = ntasks - 1; task >= 0; --task) {  // heaviest (last, causal) blocks first
        const int64_t qb = task % nqb, bh = task / nqb, h = bh % a.H, b = bh / a.H, kvh = h / nrep;
        const int64_t i0 = qb * BQ, mq = (a.Lq - i0) < BQ ? (a.Lq - i0) : BQ;
        const int64_t kv_end = a.causal ? ((i0 + mq) < a.Lk ? (i0 + mq) : a.Lk) : a.Lk;
        float* S = tls_ws.get(BQ * ldS + BQ * a.Dv + 2 * BQ);
        float* acc = S + BQ * ldS;
        float* mrow = acc + BQ * a.Dv;
        float* lrow = mrow + BQ;
        std::memset(acc, 0, sizeof(float) * mq * a.Dv);
        for (int64_t r = 0; r < mq; ++r) { mrow[r] = NEG_INF; lrow[r] = 0.f; }
        const Seg<ORD> seg(a.ranges + h * 2 * ORD, a.ts + h * 2 * ORD);
        const float* qp = a.q + b * a.q_sb + h * a.q_sh + i0 * a.q_sl;
        const float* kp = a.k + b * a.k_sb + kvh * a.k_sh;
        const float* vp = a.v + b * a.v_sb + kvh * a.v_sh;

        for (int64_t j0 = 0; j0 < kv_end; j0 += BK) {
            const int64_t nk = (kv_end - j0) < BK ? (kv_end - j0) : BK;
            gemm(false, true, mq, nk, a.D, scale, qp, a.q_sl, kp + j0 * a.k_sl, a.k_sl, 0.f, S, ldS);
            for (int64_t r = 0; r < mq; ++r) {
                const int64_t i = i0 + r, ncol = valid_cols(a, i, j0, nk);
                float* srow = S + r * ldS;
                const float* brow = a.bias ? a.bias + b * a.bias_sb + h * a.bias_sh + i * a.bias_sl + j0 : nullptr;
                const void* mkrow = nullptr;
                if (a.mask_kind == 1)
                    mkrow = static_cast<const uint8_t*>(a.mask) + b * a.mask_sb + h * a.mask_sh + i * a.mask_sl + j0;
                else if (a.mask_kind == 2)
                    mkrow = static_cast<const float*>(a.mask) + b * a.mask_sb + h * a.mask_sh + i * a.mask_sl + j0;
                vf vmax = splat(NEG_INF);
                int64_t c = 0;
                for (; c + W <= ncol; c += W) {
                    vf s = loadu(srow + c);
                    vf z = scores_chunk(seg, a, s, brow, mkrow, c, W);
                    storeu(srow + c, z);
                    vmax = z > vmax ? z : vmax;
                }
                if (c < ncol) {
                    const int n = (int)(ncol - c);
                    vf s = load_n(srow + c, n, 0.f);
                    vf z = scores_chunk(seg, a, s, brow, mkrow, c, n);
                    z = lane_index() < (float)n ? z : splat(NEG_INF);
                    storeu(srow + c, z);  // the row has ldS >= round_up(ncol, W) floats
                    vmax = z > vmax ? z : vmax;
                }
                const float m_old = mrow[r];
                float m_new = hmax(vmax);
                m_new = m_new > m_old ? m_new : m_old;
                const bool empty = m_new == NEG_INF;  // nothing attendable yet (only -inf scores)
                const float alpha = (m_old == NEG_INF) ? 0.f : std::exp(m_old - m_new);
                vf vsum = splat(0.f);
                const vf vm = splat(empty ? 0.f : m_new);
                const uint32_t key = drop ? row_key((uint32_t)a.seed, (uint64_t)((b * a.H + h) * a.Lq + i)) : 0;
                for (c = 0; c < ncol; c += W) {
                    vf p = empty ? splat(0.f) : vexp(loadu(srow + c) - vm);
                    if (c + W > ncol) p = lane_index() < (float)(ncol - c) ? p : splat(0.f);
                    vsum += p;
                    if (drop) p *= keep_scale(key, j0 + c, threshold, inv_keep);
                    storeu(srow + c, p);
                }
                for (c = ncol > 0 ? round_up(ncol, W) : 0; c < nk; ++c) srow[c] = 0.f;
                lrow[r] = lrow[r] * alpha + hsum(vsum);
                mrow[r] = m_new;
                if (alpha != 1.f) {
                    float* ar = acc + r * a.Dv;
                    for (int64_t d = 0; d < a.Dv; ++d) ar[d] *= alpha;
                }
            }
            gemm(false, false, mq, a.Dv, nk, 1.f, S, ldS, vp + j0 * a.v_sl, a.v_sl, 1.f, acc, a.Dv);
        }
        for (int64_t r = 0; r < mq; ++r) {
            const int64_t i = i0 + r;
            float* orow = a.out + b * a.o_sb + h * a.o_sh + i * a.o_sl;
            const float l = lrow[r];
            const float inv = l > 0.f ? 1.f / l : 0.f;
            const float* ar = acc + r * a.Dv;
            for (int64_t d = 0; d < a.Dv; ++d) orow[d] = ar[d] * inv;
            const int64_t row = (b * a.H + h) * a.Lq + i;
            a.stats[row] = l > 0.f ? mrow[r] : NEG_INF;
            a.stats[a.B * a.H * a.Lq + row] = l > 0.f ? std::log(l) : 0.f;
        }
    }
}

template <int ORD>
void backward_impl(const MMArgs& a) {
    const int64_t BQ = a.block_q, BK = a.block_k;
    const int64_t nrep = a.H / a.Hkv;
    const int64_t ldS = round_up(BK, W);
    const float scale = (float)a.scale;
    const bool drop = a.dropout > 0.0;
    const uint32_t threshold = (uint32_t)std::floor(a.dropout * 16777216.0 + 0.5);
    const float inv_keep = drop ? (float)(1.0 / (1.0 - a.dropout)) : 1.f;
    // Partition so that every output element (dk/dv per (b, kv head), dbias per its broadcast slot) has one owner.
    // With few (batch, head) pairs for many threads, the key blocks are split too (each split owns its dk/dv rows and
    // dbias columns, and writes a private dq/pacc slice that the caller sums).
    const bool split_b = !(a.dbias && a.dbias_b == 1), split_h = !(a.dbias && a.dbias_h == 1);
    const int64_t tb = split_b ? a.B : 1, th = split_h ? a.Hkv : 1;
    const int64_t np = 4 * ORD;
    const int64_t nkb = (a.Lk + BK - 1) / BK, nsplit = a.kv_split < 1 ? 1 : a.kv_split;
    const int64_t per_split = (nkb + nsplit - 1) / nsplit;

#pragma omp parallel for schedule(dynamic, 1) num_threads((int)a.nthreads)
    for (int64_t task = 0; task < tb * th * nsplit; ++task) {
        const int64_t split = task % nsplit, bt = task / nsplit / th, ht = task / nsplit % th;
        const int64_t j_begin = split * per_split * BK;
        const int64_t j_end = ((split + 1) * per_split * BK) < a.Lk ? (split + 1) * per_split * BK : a.Lk;
        float* dq_split = a.dq + split * a.B * a.H * a.Lq * a.D;
        double* pacc_split = a.pacc + split * a.B * a.H * np;
        float* S = tls_ws.get(3 * BQ * ldS + a.Lq);
        float* P = S + BQ * ldS;
        float* dP = P + BQ * ldS;
        float* delta = dP + BQ * ldS;  // rowsum(dO ∘ O) of the current head
        for (int64_t b = split_b ? bt : 0; b < (split_b ? bt + 1 : a.B); ++b) {
            for (int64_t kvh = split_h ? ht : 0; kvh < (split_h ? ht + 1 : a.Hkv); ++kvh) {
                const float* kp = a.k + b * a.k_sb + kvh * a.k_sh;
                const float* vp = a.v + b * a.v_sb + kvh * a.v_sh;
                float* dkp = a.dk + (b * a.Hkv + kvh) * a.Lk * a.D;
                float* dvp = a.dv + (b * a.Hkv + kvh) * a.Lk * a.Dv;
                if (j_end > j_begin) {  // first touch by the owner, in parallel
                    std::memset(dkp + j_begin * a.D, 0, sizeof(float) * (j_end - j_begin) * a.D);
                    std::memset(dvp + j_begin * a.Dv, 0, sizeof(float) * (j_end - j_begin) * a.Dv);
                }
                for (int64_t h = kvh * nrep; h < (kvh + 1) * nrep; ++h) {
                    const Seg<ORD> seg(a.ranges + h * 2 * ORD, a.ts + h * 2 * ORD);
                    vf accv[4 * ORD];
                    double pacc[4 * ORD];
                    for (int64_t p = 0; p < np; ++p) pacc[p] = 0.0;
                    const float* qh = a.q + b * a.q_sb + h * a.q_sh;
                    const float* doh = a.dout + b * a.do_sb + h * a.do_sh;
                    float* dqh = dq_split + (b * a.H + h) * a.Lq * a.D;
                    std::memset(dqh, 0, sizeof(float) * a.Lq * a.D);
                    const float* rmax = a.stats + (b * a.H + h) * a.Lq;
                    const float* rlog = rmax + a.B * a.H * a.Lq;
                    for (int64_t i = 0; i < a.Lq; ++i) {
                        const float* o = a.out + b * a.o_sb + h * a.o_sh + i * a.o_sl;
                        const float* g = doh + i * a.do_sl;
                        float d = 0.f;
                        for (int64_t c = 0; c < a.Dv; ++c) d += o[c] * g[c];
                        delta[i] = d;
                    }
                    float* dbh = a.dbias ? a.dbias + ((a.dbias_b == 1 ? 0 : b) * a.dbias_h + (a.dbias_h == 1 ? 0 : h)) * a.Lq * a.Lk
                                         : nullptr;
                    for (int64_t j0 = j_begin; j0 < j_end; j0 += BK) {
                        const int64_t nk = (a.Lk - j0) < BK ? (a.Lk - j0) : BK;
                        const int64_t istart = a.causal ? (j0 / BQ) * BQ : 0;
                        for (int64_t i0 = istart; i0 < a.Lq; i0 += BQ) {
                            const int64_t mq = (a.Lq - i0) < BQ ? (a.Lq - i0) : BQ;
                            const float* qp = qh + i0 * a.q_sl;
                            const float* dop = doh + i0 * a.do_sl;
                            gemm(false, true, mq, nk, a.D, scale, qp, a.q_sl, kp + j0 * a.k_sl, a.k_sl, 0.f, S, ldS);
                            // Pass A: s (+bias) kept in S, P = exp(σ(s) + mask - lse) in P, P∘M (dropout) in dP.
                            for (int64_t r = 0; r < mq; ++r) {
                                const int64_t i = i0 + r, ncol = valid_cols(a, i, j0, nk);
                                float* srow = S + r * ldS;
                                float* prow = P + r * ldS;
                                float* pmrow = dP + r * ldS;
                                const float* brow =
                                    a.bias ? a.bias + b * a.bias_sb + h * a.bias_sh + i * a.bias_sl + j0 : nullptr;
                                const void* mkrow = nullptr;
                                if (a.mask_kind == 1)
                                    mkrow = static_cast<const uint8_t*>(a.mask) + b * a.mask_sb + h * a.mask_sh +
                                            i * a.mask_sl + j0;
                                else if (a.mask_kind == 2)
                                    mkrow = static_cast<const float*>(a.mask) + b * a.mask_sb + h * a.mask_sh +
                                            i * a.mask_sl + j0;
                                const bool empty = rmax[i] == NEG_INF;
                                const vf vm = splat(empty ? 0.f : rmax[i]), vl = splat(rlog[i]);
                                const uint32_t key =
                                    drop ? row_key((uint32_t)a.seed, (uint64_t)((b * a.H + h) * a.Lq + i)) : 0;
                                for (int64_t c = 0; c < ncol; c += W) {
                                    const int n = (int)((ncol - c) < W ? (ncol - c) : W);
                                    vf s = n == W ? loadu(srow + c) : load_n(srow + c, n, 0.f);
                                    vf z = scores_chunk(seg, a, s, brow, mkrow, c, n);
                                    vf p = empty ? splat(0.f) : vexp((z - vm) - vl);
                                    if (n < W) p = lane_index() < (float)n ? p : splat(0.f);
                                    storeu(srow + c, s);
                                    storeu(prow + c, p);
                                    if (drop) storeu(pmrow + c, p * keep_scale(key, j0 + c, threshold, inv_keep));
                                }
                                for (int64_t c = ncol > 0 ? round_up(ncol, W) : 0; c < nk; ++c) {
                                    prow[c] = 0.f;
                                    pmrow[c] = 0.f;
                                }
                            }
                            // dV_j += (P∘M)ᵀ dO_i
                            gemm(true, false, nk, a.Dv, mq, 1.f, drop ? dP : P, ldS, dop, a.do_sl, 1.f,
                                 dvp + j0 * a.Dv, a.Dv);
                            // dP = dO_i V_jᵀ (overwrites P∘M)
                            gemm(false, true, mq, nk, a.Dv, 1.f, dop, a.do_sl, vp + j0 * a.v_sl, a.v_sl, 0.f, dP, ldS);
                            // Pass B: dZ = P (dP∘M - delta), dS = dZ σ'(s), parameter sums; dS overwrites dP.
                            for (int64_t r = 0; r < mq; ++r) {
                                const int64_t i = i0 + r, ncol = valid_cols(a, i, j0, nk);
                                const float* srow = S + r * ldS;
                                const float* prow = P + r * ldS;
                                float* dprow = dP + r * ldS;
                                const uint8_t* bm = a.mask_kind == 1 ? static_cast<const uint8_t*>(a.mask) + b * a.mask_sb +
                                                                           h * a.mask_sh + i * a.mask_sl + j0
                                                                     : nullptr;
                                float* dbrow = dbh ? dbh + i * a.Lk + j0 : nullptr;
                                const vf vd = splat(delta[i]);
                                const uint32_t key =
                                    drop ? row_key((uint32_t)a.seed, (uint64_t)((b * a.H + h) * a.Lq + i)) : 0;
                                for (int64_t p = 0; p < np; ++p) accv[p] = splat(0.f);
                                for (int64_t c = 0; c < ncol; c += W) {
                                    const int n = (int)((ncol - c) < W ? (ncol - c) : W);
                                    vf dp = loadu(dprow + c);
                                    if (drop) dp *= keep_scale(key, j0 + c, threshold, inv_keep);
                                    vf dz = loadu(prow + c) * (dp - vd);
                                    if (bm) dz = load_bool(bm + c, n) ? dz : splat(0.f);
                                    if (n < W) dz = lane_index() < (float)n ? dz : splat(0.f);
                                    vf ds = dz * seg.backward(loadu(srow + c), dz, accv);
                                    if (n < W) {
                                        ds = lane_index() < (float)n ? ds : splat(0.f);
                                        storeu(dprow + c, ds);
                                        if (dbrow) store_n(dbrow + c, load_n(dbrow + c, n, 0.f) + ds, n);
                                    } else {
                                        storeu(dprow + c, ds);
                                        if (dbrow) storeu(dbrow + c, loadu(dbrow + c) + ds);
                                    }
                                }
                                for (int64_t c = ncol > 0 ? round_up(ncol, W) : 0; c < nk; ++c) dprow[c] = 0.f;
                                if (ncol > 0)
                                    for (int64_t p = 0; p < np; ++p) pacc[p] += (double)hsum(accv[p]);
                            }
                            // dQ_i += scale dS K_j ; dK_j += scale dSᵀ Q_i
                            gemm(false, false, mq, a.D, nk, scale, dP, ldS, kp + j0 * a.k_sl, a.k_sl, 1.f,
                                 dqh + i0 * a.D, a.D);
                            gemm(true, false, nk, a.D, mq, scale, dP, ldS, qp, a.q_sl, 1.f, dkp + j0 * a.D, a.D);
                        }
                    }
                    double* out = pacc_split + (b * a.H + h) * np;
                    for (int64_t p = 0; p < np; ++p) out[p] += pacc[p];
                }
            }
        }
    }
}


// One row: loss = logsumexp(σ(s)) - σ(s_label); with need_grad, s is overwritten by dS = dZ·σ'(s) where
// dZ = grad_scale·(softmax(σ(s)) - onehot(label)); σ is recomputed in each of the three passes (cheaper than a copy).
template <int ORD>
void cross_entropy_impl(const CEArgs& a) {
    const int64_t np = 4 * ORD;
    const Seg<ORD> seg(a.ranges, a.ts);
#pragma omp parallel for schedule(static) num_threads((int)a.nthreads)
    for (int64_t r = 0; r < a.rows; ++r) {
        float* row = a.logits + r * a.ld;
        const int64_t V = a.vocab, label = a.labels[r];
        const bool valid = label != a.ignore_index;
        double* pacc = a.pacc + r * np;
        vf vmax = splat(NEG_INF);
        int64_t c = 0;
        for (; c + W <= V; c += W) {
            vf z = seg.sigma(loadu(row + c));
            vmax = z > vmax ? z : vmax;
        }
        const int tail = (int)(V - c);
        if (tail) {
            vf z = seg.sigma(load_n(row + c, tail, 0.f));
            z = lane_index() < (float)tail ? z : splat(NEG_INF);
            vmax = z > vmax ? z : vmax;
        }
        const float m = hmax(vmax);
        vf vsum = splat(0.f);
        for (c = 0; c + W <= V; c += W) vsum += vexp(seg.sigma(loadu(row + c)) - m);
        if (tail) {
            vf p = vexp(seg.sigma(load_n(row + c, tail, 0.f)) - m);
            vsum += lane_index() < (float)tail ? p : splat(0.f);
        }
        const float lse = m + std::log(hsum(vsum));
        const float z_label = valid ? seg.sigma(splat(row[label]))[0] : 0.f;
        a.loss[r] = valid ? lse - z_label : 0.f;
        if (!a.need_grad) continue;
        if (!valid) {
            std::memset(row, 0, sizeof(float) * V);
            continue;
        }
        const float gs = (float)a.grad_scale;
        vf accv[4 * ORD];
        for (int64_t p = 0; p < np; ++p) accv[p] = splat(0.f);
        for (c = 0; c < V; c += W) {
            const int n = (int)((V - c) < W ? (V - c) : W);
            vf s = n == W ? loadu(row + c) : load_n(row + c, n, 0.f);
            vf dz = vexp(seg.sigma(s) - lse) * gs;
            dz = (lane_index_i() + (int32_t)c) == (int32_t)label ? dz - gs : dz;
            if (n < W) dz = lane_index() < (float)n ? dz : splat(0.f);
            vf ds = dz * seg.backward(s, dz, accv);
            if (n == W) storeu(row + c, ds); else store_n(row + c, ds, n);
        }
        for (int64_t p = 0; p < np; ++p) pacc[p] = (double)hsum(accv[p]);
    }
}

}  // namespace

extern "C" {

int mm_set_sgemm(void* fn) {
    g_sgemm = reinterpret_cast<sgemm_fn>(fn);
    return g_sgemm != nullptr;
}

int mm_max_order() { return 4; }

int mm_vector_lanes() { return W; }

int mm_attention_forward(const MMArgs* a) {
    if (!g_sgemm) return -1;
    switch (a->order) {
        case 1: forward_impl<1>(*a); return 0;
        case 2: forward_impl<2>(*a); return 0;
        case 3: forward_impl<3>(*a); return 0;
        case 4: forward_impl<4>(*a); return 0;
        default: return -2;
    }
}

int mm_attention_backward(const MMArgs* a) {
    if (!g_sgemm) return -1;
    switch (a->order) {
        case 1: backward_impl<1>(*a); return 0;
        case 2: backward_impl<2>(*a); return 0;
        case 3: backward_impl<3>(*a); return 0;
        case 4: backward_impl<4>(*a); return 0;
        default: return -2;
    }
}

int mm_seglu_cross_entropy(const CEArgs* a) {
    switch (a->order) {
        case 1: cross_entropy_impl<1>(*a); return 0;
        case 2: cross_entropy_impl<2>(*a); return 0;
        case 3: cross_entropy_impl<3>(*a); return 0;
        case 4: cross_entropy_impl<4>(*a); return 0;
        default: return -2;
    }
}

}  // extern "C"
