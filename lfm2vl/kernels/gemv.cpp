// Fast CPU matrix-vector / small-M matrix products for the decode step of lfm2vl.
//
// y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]), i.e. F.linear(x, W, bias), with fp32 accumulation.
// Weights: bf16, fp32, or int8 with one fp32 scale per output row (symmetric, weight-only).
// Activations x: fp32 or bf16 (dtype code 0 = fp32, 1 = bf16); output y likewise (bf16 rounded to nearest even).
//
// Why: torch's CPU GEMV runs on one core at 15-20 GB/s; a decode step of a 450M model is mostly these products,
// so the step is bound by how fast the weights stream from memory. Here the output rows are cut into chunks that
// the calling thread and pool.h's helper threads claim from one atomic counter. Unlike an OpenMP team barrier,
// the caller never waits for a helper that the OS has descheduled: it takes the remaining chunks itself.
//
// Instruction sets, picked at run time (capped by lfm2vl_set_isa for tests):
//   3 = AVX512-BF16 (_mm512_dpbf16_ps for bf16 x bf16), 2 = AVX512F, 1 = AVX2+FMA, 0 = scalar.
// Each ISA path lives in a function with a target attribute, so the file compiles on any x86-64 gcc.
#include <immintrin.h>
#include "pool.h"
#include "gemv.h"
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <math.h>

#define T_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))
#define T_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define T_AVX2 __attribute__((target("avx2,fma,f16c")))

static int g_isa_cap = 3;

static inline void store_out(void* y, int ydt, int64_t idx, float v) {
    if (ydt == 1) ((uint16_t*)y)[idx] = f32_to_bf16(v);
    else ((float*)y)[idx] = v;
}

static int cpu_isa() {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) {
        if (__builtin_cpu_supports("avx512bf16")) return 3;
        return 2;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
    return 0;
}

static int active_isa() {
    static int isa = -1;
    if (isa < 0) isa = cpu_isa();
    return isa < g_isa_cap ? isa : g_isa_cap;
}

// ---------------------------------------------------------------- scalar reference paths (any CPU)
static void bf16w_scalar(const uint16_t* W, const float* X, void* Y, const float* bias, int64_t M, int64_t n0,
                         int64_t n1, int64_t N, int64_t K, int ydt) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = n0; n < n1; n++) {
            float acc = 0.f;
            const uint16_t* w = W + n * K;
            const float* x = X + m * K;
            for (int64_t k = 0; k < K; k++) acc += bf16_to_f32(w[k]) * x[k];
            store_out(Y, ydt, m * N + n, acc + (bias ? bias[n] : 0.f));
        }
}

static void f32w_scalar(const float* W, const float* X, void* Y, const float* bias, int64_t M, int64_t n0,
                        int64_t n1, int64_t N, int64_t K, int ydt) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = n0; n < n1; n++) {
            float acc = 0.f;
            for (int64_t k = 0; k < K; k++) acc += W[n * K + k] * X[m * K + k];
            store_out(Y, ydt, m * N + n, acc + (bias ? bias[n] : 0.f));
        }
}

static void i8w_scalar(const int8_t* W, const float* S, const float* X, void* Y, const float* bias, int64_t M,
                       int64_t n0, int64_t n1, int64_t N, int64_t K, int ydt) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = n0; n < n1; n++) {
            float acc = 0.f;
            for (int64_t k = 0; k < K; k++) acc += (float)W[n * K + k] * X[m * K + k];
            store_out(Y, ydt, m * N + n, acc * S[n] + (bias ? bias[n] : 0.f));
        }
}

// ---------------------------------------------------------------- AVX2 paths
T_AVX2 static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

T_AVX2 static inline __m256 load8_bf16_avx2(const uint16_t* p) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

T_AVX2 static inline __m256 load8_i8_avx2(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}

// One generic AVX2 body: `kind` 0 = bf16 weights, 1 = fp32 weights, 2 = int8 weights; x is fp32 here.
T_AVX2 static void gemv_avx2(int kind, const void* Wv, const float* S, const float* X, void* Y, const float* bias,
                             int64_t M, int64_t n0, int64_t n1, int64_t N, int64_t K, int ydt) {
    int64_t K8 = K & ~(int64_t)7;
    for (int64_t m = 0; m < M; m++) {
        const float* x = X + m * K;
        for (int64_t n = n0; n < n1; n++) {
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            int64_t k = 0;
            for (; k + 16 <= K8; k += 16) {
                __m256 w0, w1;
                if (kind == 0) {
                    const uint16_t* w = (const uint16_t*)Wv + n * K + k;
                    w0 = load8_bf16_avx2(w); w1 = load8_bf16_avx2(w + 8);
                } else if (kind == 1) {
                    const float* w = (const float*)Wv + n * K + k;
                    w0 = _mm256_loadu_ps(w); w1 = _mm256_loadu_ps(w + 8);
                } else {
                    const int8_t* w = (const int8_t*)Wv + n * K + k;
                    w0 = load8_i8_avx2(w); w1 = load8_i8_avx2(w + 8);
                }
                a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + k), a0);
                a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + k + 8), a1);
            }
            float acc = hsum256(_mm256_add_ps(a0, a1));
            for (; k < K; k++) {
                float w;
                if (kind == 0) w = bf16_to_f32(((const uint16_t*)Wv)[n * K + k]);
                else if (kind == 1) w = ((const float*)Wv)[n * K + k];
                else w = (float)((const int8_t*)Wv)[n * K + k];
                acc += w * x[k];
            }
            if (kind == 2) acc *= S[n];
            store_out(Y, ydt, m * N + n, acc + (bias ? bias[n] : 0.f));
        }
    }
}

// ---------------------------------------------------------------- AVX512 paths
// One weight row at a time, so each thread reads ONE sequential stream (its chunk of rows), with a software prefetch
// PF_BYTES ahead that stops at the chunk's end. Measured on the 2-core Zen 5 against a plain sequential read of the
// same bytes: 1.0-1.1x its speed, where tiles of 4 interleaved row streams reached 0.8x. The k loop is split over
// U accumulators per activation row (U * MR independent dependency chains); a row re-read for the next group of
// activation rows comes from L1.
static const int64_t PF_BYTES = 2048;

static inline void prefetch_line(const char* p, const char* end) {
    if (p < end) _mm_prefetch(p, _MM_HINT_T0);
}

// bf16 weights x bf16 activations with dpbf16 (each step: 32 products summed pairwise into 16 fp32 lanes).
template <int MR>
T_AVX512BF16 static void row_bf16_dp(const uint16_t* w, const uint16_t* X, int64_t K, bool pf, const char* end,
                                     float* out) {
    constexpr int U = MR == 1 ? 4 : MR == 2 ? 2 : 1;
    __m512 acc[MR][U];
    for (int j = 0; j < MR; j++)
        for (int u = 0; u < U; u++) acc[j][u] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 * U <= K; k += 32 * U) {
        if (pf)
            for (int l = 0; l < U; l++) prefetch_line((const char*)(w + k) + PF_BYTES + 64 * l, end);
        for (int u = 0; u < U; u++) {
            __m512bh wv = (__m512bh)_mm512_loadu_si512(w + k + 32 * u);
            for (int j = 0; j < MR; j++)
                acc[j][u] = _mm512_dpbf16_ps(acc[j][u], wv, (__m512bh)_mm512_loadu_si512(X + j * K + k + 32 * u));
        }
    }
    for (; k < K; k += 32) {
        __mmask32 mk = K - k >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << (K - k)) - 1u);
        __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mk, w + k);
        for (int j = 0; j < MR; j++)
            acc[j][0] = _mm512_dpbf16_ps(acc[j][0], wv, (__m512bh)_mm512_maskz_loadu_epi16(mk, X + j * K + k));
    }
    for (int j = 0; j < MR; j++) {
        __m512 t = acc[j][0];
        for (int u = 1; u < U; u++) t = _mm512_add_ps(t, acc[j][u]);
        out[j] = _mm512_reduce_add_ps(t);
    }
}

// 16 weights of any kind widened to fp32 (kind 0 bf16, 1 fp32, 2 int8).
template <int KIND>
T_AVX512 static inline __m512 load_w16(const void* w, int64_t k, __mmask16 mk) {
    if (KIND == 0)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
            _mm256_maskz_loadu_epi16(mk, (const uint16_t*)w + k)), 16));
    if (KIND == 1) return _mm512_maskz_loadu_ps(mk, (const float*)w + k);
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, (const int8_t*)w + k)));
}

// Weights widened to fp32 x fp32 activations; the int8 row scale is applied by the caller.
template <int MR, int KIND>
T_AVX512 static void row_f32(const void* w, const float* X, int64_t K, bool pf, const char* end, float* out) {
    constexpr int U = MR == 1 ? 4 : MR == 2 ? 2 : 1;
    constexpr int ESZ = KIND == 1 ? 4 : KIND == 0 ? 2 : 1;
    __m512 acc[MR][U];
    for (int j = 0; j < MR; j++)
        for (int u = 0; u < U; u++) acc[j][u] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 * U <= K; k += 16 * U) {
        if (pf)
            for (int l = 0; l < (16 * U * ESZ + 63) / 64; l++)
                prefetch_line((const char*)w + k * ESZ + PF_BYTES + 64 * l, end);
        for (int u = 0; u < U; u++) {
            __m512 wv = load_w16<KIND>(w, k + 16 * u, (__mmask16)0xffff);
            for (int j = 0; j < MR; j++)
                acc[j][u] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(X + j * K + k + 16 * u), acc[j][u]);
        }
    }
    for (; k < K; k += 16) {
        __mmask16 mk = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1u);
        __m512 wv = load_w16<KIND>(w, k, mk);
        for (int j = 0; j < MR; j++) acc[j][0] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mk, X + j * K + k), acc[j][0]);
    }
    for (int j = 0; j < MR; j++) {
        __m512 t = acc[j][0];
        for (int u = 1; u < U; u++) t = _mm512_add_ps(t, acc[j][u]);
        out[j] = _mm512_reduce_add_ps(t);
    }
}

// Rows n0..n1-1 for all M activation rows, in groups of 4 / 2 / 1 activation rows per pass over a weight row.
template <typename RowFn>
static inline void rows_generic(RowFn row, const float* S, void* Y, const float* bias, int64_t M, int64_t n0,
                                int64_t n1, int64_t N, int ydt) {
    float out[4];
    for (int64_t n = n0; n < n1; n++) {
        int64_t m = 0;
        while (m < M) {
            const int g = M - m >= 4 ? 4 : M - m >= 2 ? 2 : 1;
            row(n, m, g, m == 0, out);
            for (int j = 0; j < g; j++) {
                float v = out[j];
                if (S) v *= S[n];
                store_out(Y, ydt, (m + j) * N + n, v + (bias ? bias[n] : 0.f));
            }
            m += g;
        }
    }
}

template <int KIND>
T_AVX512 static void rows_f32(const void* W, const float* S, const float* X, void* Y, const float* bias, int64_t M,
                              int64_t n0, int64_t n1, int64_t N, int64_t K, int ydt) {
    constexpr int ESZ = KIND == 1 ? 4 : KIND == 0 ? 2 : 1;
    const char* end = (const char*)W + n1 * K * ESZ;
    rows_generic([&](int64_t n, int64_t m, int g, bool pf, float* out) {
        const void* w = (const char*)W + n * K * ESZ;
        if (g == 4) row_f32<4, KIND>(w, X + m * K, K, pf, end, out);
        else if (g == 2) row_f32<2, KIND>(w, X + m * K, K, pf, end, out);
        else row_f32<1, KIND>(w, X + m * K, K, pf, end, out);
    }, KIND == 2 ? S : nullptr, Y, bias, M, n0, n1, N, ydt);
}

T_AVX512BF16 static void rows_bf16_dp(const uint16_t* W, const uint16_t* X, void* Y, const float* bias, int64_t M,
                                      int64_t n0, int64_t n1, int64_t N, int64_t K, int ydt) {
    const char* end = (const char*)(W + n1 * K);
    rows_generic([&](int64_t n, int64_t m, int g, bool pf, float* out) {
        const uint16_t* w = W + n * K;
        if (g == 4) row_bf16_dp<4>(w, X + m * K, K, pf, end, out);
        else if (g == 2) row_bf16_dp<2>(w, X + m * K, K, pf, end, out);
        else row_bf16_dp<1>(w, X + m * K, K, pf, end, out);
    }, nullptr, Y, bias, M, n0, n1, N, ydt);
}

// ---------------------------------------------------------------- dispatch
// x as fp32 for the widening paths: a bf16 x is widened once (exact) into a scratch buffer.
static float* x_as_f32(const void* X, int xdt, int64_t MK, float** owned) {
    *owned = NULL;
    if (xdt == 0) return (float*)X;
    float* buf = (float*)malloc(sizeof(float) * (size_t)MK);
    const uint16_t* h = (const uint16_t*)X;
    for (int64_t i = 0; i < MK; i++) buf[i] = bf16_to_f32(h[i]);
    *owned = buf;
    return buf;
}

static void linear_chunk(const void* ctx, int64_t chunk) {
    const LinearArgs& a = *(const LinearArgs*)ctx;
    int64_t n0 = chunk * a.rows_per_chunk;
    int64_t n1 = n0 + a.rows_per_chunk < a.N ? n0 + a.rows_per_chunk : a.N;
    if (a.dp) {
        rows_bf16_dp((const uint16_t*)a.W, (const uint16_t*)a.X, a.Y, a.bias, a.M, n0, n1, a.N, a.K, a.ydt);
    } else if (a.isa >= 2) {
        if (a.kind == 0) rows_f32<0>(a.W, a.S, a.Xf, a.Y, a.bias, a.M, n0, n1, a.N, a.K, a.ydt);
        else if (a.kind == 1) rows_f32<1>(a.W, a.S, a.Xf, a.Y, a.bias, a.M, n0, n1, a.N, a.K, a.ydt);
        else rows_f32<2>(a.W, a.S, a.Xf, a.Y, a.bias, a.M, n0, n1, a.N, a.K, a.ydt);
    } else if (a.isa == 1) {
        gemv_avx2(a.kind, a.W, a.S, a.Xf, a.Y, a.bias, a.M, n0, n1, a.N, a.K, a.ydt);
    } else if (a.kind == 0) {
        bf16w_scalar((const uint16_t*)a.W, a.Xf, a.Y, a.bias, a.M, n0, n1, a.N, a.K, a.ydt);
    } else if (a.kind == 1) {
        f32w_scalar((const float*)a.W, a.Xf, a.Y, a.bias, a.M, n0, n1, a.N, a.K, a.ydt);
    } else {
        i8w_scalar((const int8_t*)a.W, a.S, a.Xf, a.Y, a.bias, a.M, n0, n1, a.N, a.K, a.ydt);
    }
}

static int64_t weight_bytes(int kind) { return kind == 1 ? 4 : kind == 0 ? 2 : 1; }

// Fill the dispatch fields of one product. Xf must be x as fp32 unless the bf16 dot-product path is taken.
void linear_setup(LinearArgs& a, int kind, const void* W, const float* S, const void* X, const float* Xf,
                         int xdt, void* Y, int ydt, const float* bias, int64_t M, int64_t N, int64_t K) {
    a.kind = kind; a.isa = active_isa(); a.ydt = ydt;
    a.dp = (kind == 0 && xdt == 1 && a.isa >= 3);
    a.W = W; a.S = S; a.X = X; a.Xf = Xf; a.Y = Y; a.bias = bias; a.M = M; a.N = N; a.K = K;
    // chunks of ~256 KiB of weights: long sequential streams, yet small enough that a descheduled helper holds up
    // little (its unclaimed chunks are taken by the caller)
    int64_t row_bytes = K * weight_bytes(kind) * (M > 1 ? 2 : 1);
    int64_t rows = (int64_t)256 * 1024 / (row_bytes > 0 ? row_bytes : 1);
    a.rows_per_chunk = rows < 4 ? 4 : rows;
    a.chunks = (N + a.rows_per_chunk - 1) / a.rows_per_chunk;
}

// Several independent products (e.g. q, k and v of one token) as ONE pool job: one wake-up and one join for all.
struct MultiArgs {
    const LinearArgs* lin;
    int n;
};

static void multi_chunk(const void* ctx, int64_t chunk) {
    const MultiArgs& m = *(const MultiArgs*)ctx;
    int i = 0;
    while (chunk >= m.lin[i].chunks) chunk -= m.lin[i++].chunks;
    linear_chunk(&m.lin[i], chunk);
}

void linear_many(const LinearArgs* lin, int n, int threads) {
    MultiArgs m{lin, n};
    int64_t chunks = 0, bytes = 0;
    for (int i = 0; i < n; i++) {
        chunks += lin[i].chunks;
        bytes += lin[i].N * lin[i].K * weight_bytes(lin[i].kind);
    }
    pool_run(multi_chunk, &m, chunks, bytes < 64 * 1024 ? 1 : threads);
}

// ---- decode attention: one query per row over a (strided) K/V cache, fp32 math ---------------------------------
// Chunk = one (row, kv head): its G = H / Hkv query heads share every key/value row read.
struct AttnArgs {
    const float* Q;     // (B, H, Dh) fp32, pre-scaled
    const void* K;      // element (b, h, s, d) at b*sb + h*sh + s*ss + d; kvdt 0 fp32, 1 bf16
    const void* V;
    const uint8_t* mask;  // (B, n) 0/1 or NULL
    const int64_t* rows;  // (B,) cache row of each query row, or NULL (row b)
    float* O;           // (B, H, Dh) fp32
    int64_t Hkv, G, n, Dh, sb, sh, ss;
    int kvdt;
    const int64_t* lens;  // (B,) keys 0..lens[b]-1 of row b (instead of n and the mask), or NULL
};

static inline void kv_row(float* dst, const void* p, int dt, int64_t off, int64_t Dh) {
    if (dt == 1) {
        const uint16_t* src = (const uint16_t*)p + off;
        for (int64_t d = 0; d < Dh; d++) dst[d] = bf16_to_f32(src[d]);
    } else {
        memcpy(dst, (const float*)p + off, sizeof(float) * Dh);
    }
}

// dot product with 8 independent partial sums (vectorizes without -ffast-math)
static inline float dot8(const float* a, const float* b, int64_t n) {
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    int64_t d = 0;
    for (; d + 8 <= n; d += 8)
        for (int l = 0; l < 8; l++) acc[l] += a[d + l] * b[d + l];
    float t = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; d < n; d++) t += a[d] * b[d];
    return t;
}

// One key or value row as Dh/16 fp32 vectors (bf16 widened exactly).
T_AVX512 static inline void kv_vecs(__m512* r, const void* p, int dt, int64_t off, int64_t nv) {
    for (int64_t j = 0; j < nv; j++)
        r[j] = dt == 1 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
                             (const __m256i*)((const uint16_t*)p + off + 16 * j))), 16))
                       : _mm512_loadu_ps((const float*)p + off + 16 * j);
}

// scores sc[g * n + s] = q_g . k_s (AVX512, Dh a multiple of 16 up to 256)
T_AVX512 static void attn_scores_avx512(const AttnArgs& a, const float* q, int64_t base, int64_t n, const uint8_t* m,
                                        float* sc) {
    const int64_t nv = a.Dh / 16, G = a.G;
    __m512 kr[16];
    for (int64_t s = 0; s < n; s++) {
        kv_vecs(kr, a.K, a.kvdt, base + s * a.ss, nv);
        for (int64_t g = 0; g < G; g++) {
            __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q + g * a.Dh), kr[0]);
            for (int64_t j = 1; j < nv; j++) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * a.Dh + 16 * j), kr[j], acc);
            sc[g * n + s] = (m && !m[s]) ? -INFINITY : _mm512_reduce_add_ps(acc);
        }
    }
}

// exp(x) for x <= 0 (softmax after subtracting the max), ~1 ulp: 2^n * poly(r), x = n ln2 + r, |r| <= ln2/2.
// libm's expf per score was most of a long-context decode attention.
T_AVX512 static inline __m512 exp_nonpos(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));  // exp(-104) is below the smallest float: 0 after scaling
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 split in two for an exact product
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(p, n);
}

// p[s] = exp(p[s] - mx) over n scores; returns their sum
T_AVX512 static float softmax_exp_avx512(float* p, int64_t n, float mx) {
    const __m512 m = _mm512_set1_ps(mx);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t s = 0; s < n; s += 16) {
        __mmask16 mk = n - s >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - s)) - 1u);
        __m512 e = exp_nonpos(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, p + s), m));
        e = _mm512_maskz_mov_ps(mk, e);
        _mm512_mask_storeu_ps(p + s, mk, e);
        sum = _mm512_add_ps(sum, e);
    }
    return _mm512_reduce_add_ps(sum);
}

// o_g += sum_s p[g * n + s] * v_s (o zeroed by the caller)
T_AVX512 static void attn_values_avx512(const AttnArgs& a, const float* p, int64_t base, int64_t n, float* o) {
    const int64_t nv = a.Dh / 16, G = a.G;
    __m512 vr[16];
    for (int64_t s = 0; s < n; s++) {
        kv_vecs(vr, a.V, a.kvdt, base + s * a.ss, nv);
        for (int64_t g = 0; g < G; g++) {
            const __m512 w = _mm512_set1_ps(p[g * n + s]);
            for (int64_t j = 0; j < nv; j++) {
                float* dst = o + g * a.Dh + 16 * j;
                _mm512_storeu_ps(dst, _mm512_fmadd_ps(w, vr[j], _mm512_loadu_ps(dst)));
            }
        }
    }
}

static void attn_chunk(const void* ctx, int64_t chunk) {
    const AttnArgs& a = *(const AttnArgs*)ctx;
    const int64_t b = chunk / a.Hkv, h = chunk % a.Hkv, G = a.G, Dh = a.Dh;
    const int64_t n = a.lens ? a.lens[b] : a.n;
    const float* q = a.Q + (b * a.Hkv + h) * G * Dh;  // G consecutive query heads
    float* o = a.O + (b * a.Hkv + h) * G * Dh;
    const int64_t base = (a.rows ? a.rows[b] : b) * a.sb + h * a.sh;
    const uint8_t* m = a.mask ? a.mask + b * a.n : NULL;
    const bool vec = active_isa() >= 2 && Dh % 16 == 0 && Dh <= 256;
    float* sc = (float*)malloc(sizeof(float) * (G * n + Dh));
    float* row = sc + G * n;
    if (vec) {
        attn_scores_avx512(a, q, base, n, m, sc);
    } else {
        for (int64_t s = 0; s < n; s++) {
            kv_row(row, a.K, a.kvdt, base + s * a.ss, Dh);
            for (int64_t g = 0; g < G; g++) sc[g * n + s] = (m && !m[s]) ? -INFINITY : dot8(q + g * Dh, row, Dh);
        }
    }
    for (int64_t g = 0; g < G; g++) {
        float* p = sc + g * n;
        float mx = -INFINITY;
        for (int64_t s = 0; s < n; s++) mx = p[s] > mx ? p[s] : mx;
        float sum = 0.f;
        if (vec && mx != -INFINITY) {
            sum = softmax_exp_avx512(p, n, mx);
        } else {
            for (int64_t s = 0; s < n; s++) { p[s] = mx == -INFINITY ? 0.f : expf(p[s] - mx); sum += p[s]; }
        }
        float inv = sum > 0.f ? 1.f / sum : 0.f;
        for (int64_t s = 0; s < n; s++) p[s] *= inv;
        for (int64_t d = 0; d < Dh; d++) o[g * Dh + d] = 0.f;
    }
    if (vec) {
        attn_values_avx512(a, sc, base, n, o);
    } else {
        for (int64_t s = 0; s < n; s++) {
            kv_row(row, a.V, a.kvdt, base + s * a.ss, Dh);
            for (int64_t g = 0; g < G; g++) {
                const float w = sc[g * n + s];
                for (int64_t d = 0; d < Dh; d++) o[g * Dh + d] += w * row[d];
            }
        }
    }
    free(sc);
}

void attn_decode_run(const float* Q, const void* K, const void* V, const uint8_t* mask, const int64_t* rows,
                     const int64_t* lens, float* O, int64_t B, int64_t H, int64_t Hkv, int64_t n, int64_t Dh,
                     int64_t sb, int64_t sh, int64_t ss, int kvdt, int threads) {
    AttnArgs a{Q, K, V, mask, rows, O, Hkv, H / Hkv, n, Dh, sb, sh, ss, kvdt, lens};
    pool_run(attn_chunk, &a, B * Hkv, B * Hkv * n * Dh < 16 * 1024 ? 1 : threads);
}

extern "C" {

int lfm2vl_isa(void) { return active_isa(); }
int lfm2vl_cpu_isa(void) { return cpu_isa(); }
void lfm2vl_set_isa(int cap) { g_isa_cap = cap; }

// kind: 0 bf16 weights, 1 fp32 weights, 2 int8 weights (+ row scales S). xdt/ydt: 0 fp32, 1 bf16.
// threads: how many threads may work on it (the caller passes torch.get_num_threads()).
void lfm2vl_linear(int kind, const void* W, const float* S, const void* X, void* Y, const float* bias, int64_t M,
                   int64_t N, int64_t K, int xdt, int ydt, int threads) {
    LinearArgs a;
    float* owned = NULL;
    bool dp = (kind == 0 && xdt == 1 && active_isa() >= 3);
    const float* Xf = dp ? NULL : x_as_f32(X, xdt, M * K, &owned);
    linear_setup(a, kind, W, S, X, Xf, xdt, Y, ydt, bias, M, N, K);
    linear_many(&a, 1, threads);
    free(owned);
}

// Q (B, H, Dh) fp32 pre-scaled; K/V strided (see AttnArgs); mask (B, n) uint8 or NULL; rows (B,) or NULL;
// O (B, H, Dh) fp32.
void lfm2vl_attn_decode(const float* Q, const void* K, const void* V, const uint8_t* mask, const int64_t* rows,
                        float* O, int64_t B,
                        int64_t H, int64_t Hkv, int64_t n, int64_t Dh, int64_t sb, int64_t sh, int64_t ss, int kvdt,
                        int threads) {
    attn_decode_run(Q, K, V, mask, rows, NULL, O, B, H, Hkv, n, Dh, sb, sh, ss, kvdt, threads);
}

}  // extern "C"
