// Fast CPU matrix-vector / small-M matrix products for the decode step of lfm2vl.
//
// y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]), i.e. F.linear(x, W, bias), with fp32 accumulation.
// Weights: bf16, fp32, int8 with one fp32 scale per output row, or int4 with one fp16 scale per 32 weights of a row
// (symmetric, weight-only; layout at I4_GROUP in gemv.h).
// Activations x: fp32 or bf16 (dtype code 0 = fp32, 1 = bf16); output y likewise (bf16 rounded to nearest even).
//
// Why: torch's CPU GEMV runs on one core; a decode step of a 450M model is mostly these products,
// so the step is bound by how fast the weights stream from memory. Here the output rows are cut into chunks that
// the calling thread and pool.cpp's helper threads claim from one atomic counter. Unlike an OpenMP team barrier,
// the caller never waits for a helper that the OS has descheduled: it takes the remaining chunks itself.
//
// Instruction sets, picked at run time (capped by lfm2vl_set_isa for tests):
//   3 = AVX512-BF16 (_mm512_dpbf16_ps for bf16 x bf16), 2 = AVX512F, 1 = AVX2+FMA (gemv_avx2.cpp), 0 = scalar.
// On AVX512 CPUs with VNNI int8 / int4 weights meet a quantized x in integer dot products (gemv_vnni.cpp), and
// products of one activation row read several weight rows at once on Intel CPUs (bf16 eight, int8 four,
// gemv_streams.cpp; int4 two, gemv_vnni.cpp; packed bf16 two, packed.cpp).
// Each ISA path lives in a function with a target attribute (gemv.h), so the file compiles on any x86-64 gcc.
#include <immintrin.h>
#include "pool.h"
#include "gemv.h"
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <math.h>


static int g_isa_cap = 3;
static int g_streams = -1;  // several weight streams for one activation row: -1 by vendor, 0 off, 1 on (tests)
static int g_prefetch = -1;  // software prefetch of the one-stream rows' weights: -1 by CPU, 0 off, 1 on (tests)

// Whether one activation row reads several weight rows at once (bf16 eight, int8 four, int4 and packed two). On
// Intel: a Sapphire Rapids VM's core keeps too few reads in flight on one stream (450M decode bf16 +28%, int8 +35%,
// int4 +19%, packed +6%). On AMD a single stream with its software prefetch is the faster one: on a Zen 5 VM eight
// streams read 37 GB/s where one reads 45-46.
static bool row_streams() {
    if (g_streams >= 0) return g_streams;
    static const bool intel = (__builtin_cpu_init(), __builtin_cpu_is("intel"));
    return intel;
}

// AMD Zen 4: family 19h with AVX512 (Zen 3, the same family, has no AVX512).
bool cpu_zen4() {
    static const bool zen4 = (__builtin_cpu_init(), __builtin_cpu_is("amdfam19h") && __builtin_cpu_supports("avx512f"));
    return zen4;
}

// Whether the one-stream rows of bf16, fp32, int8 and packed weights prefetch them PF_BYTES ahead. Not on AMD Zen 4:
// its hardware prefetchers keep a plain sequential stream ahead on their own and the prefetch instructions cost
// reads, so those products stream faster without them (docs/cpu.md has the figures). Elsewhere they pay. int4's
// integer-dot rows, with ~4x the instructions per byte, keep theirs (on AVX512: gemv_vnni.cpp's pf_i4_bytes).
bool weight_prefetch() {
    if (g_prefetch >= 0) return g_prefetch;
    return !cpu_zen4();
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

int active_isa() {
    static int isa = -1;
    if (isa < 0) isa = cpu_isa();
    return isa < g_isa_cap ? isa : g_isa_cap;
}

// ---------------------------------------------------------------- AVX512 paths
// One weight row at a time, so each thread reads ONE sequential stream (its chunk of rows), with a software prefetch
// PF_BYTES ahead that stops at the chunk's end: one stream per thread keeps pace with a plain sequential read of the
// same bytes, where tiles of interleaved row streams fall behind it. The k loop is split over
// U accumulators per activation row (U * MR independent dependency chains); a row re-read for the next group of
// activation rows comes from L1. (PF_BYTES and prefetch_line live in gemv.h, shared with the AVX2 rows.)

// bf16 weights x bf16 activations with dpbf16 (each step: 32 products summed pairwise into 16 fp32 lanes).
template <int MR>
T_AVX512BF16 static void row_bf16_dp(const uint16_t* w, const uint16_t* X, int64_t K, bool pf, const char* end,
                                     float* out) {
    constexpr int U = MR == 1 ? 4 : MR == 2 ? 2 : 1;
    __m512 acc[MR][U] = {};
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
    sum_accumulators<MR, U>(acc, out);
}

// 16 weights of any kind widened to fp32 (kind 0 bf16, 1 fp32, 2 int8).
template <int KIND>
T_AVX512 static inline __m512 load_w16(const void* w, int64_t k, __mmask16 mk) {
    if (KIND == 0) return from_bf16x16((const uint16_t*)w + k, mk);
    if (KIND == 1) return _mm512_maskz_loadu_ps(mk, (const float*)w + k);
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, (const int8_t*)w + k)));
}

// Weights widened to fp32 x fp32 activations; the int8 row scale is applied by the caller.
template <int MR, int KIND>
T_AVX512 static void row_f32(const void* w, const float* X, int64_t K, bool pf, const char* end, float* out) {
    constexpr int U = MR == 1 ? 4 : MR == 2 ? 2 : 1;
    constexpr int ESZ = KIND == 1 ? 4 : KIND == 0 ? 2 : 1;
    __m512 acc[MR][U] = {};
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
        const __mmask16 mk = tail16(K - k);
        __m512 wv = load_w16<KIND>(w, k, mk);
        for (int j = 0; j < MR; j++) acc[j][0] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mk, X + j * K + k), acc[j][0]);
    }
    sum_accumulators<MR, U>(acc, out);
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

// Four weight rows x four activation rows (a server batch's step): each 32-element step loads 4 + 4 vectors for 16
// dot products, where one weight row at a time loads 1 + 4 for 4 and spends more of the loop on bookkeeping. One
// accumulator per (row, activation row) over k in order, reduced as row_bf16_dp<4> reduces them: the same sums.
T_AVX512BF16 static void block_bf16_dp(const uint16_t* w, const uint16_t* X, int64_t K, bool pf, const char* end,
                                       float (&out)[4][4]) {
    __m512 acc[4][4] = {};
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        if (pf)
            for (int r = 0; r < 4; r++) prefetch_line((const char*)(w + r * K + k) + PF_BYTES, end);
        __m512bh xv[4];
        for (int j = 0; j < 4; j++) xv[j] = (__m512bh)_mm512_loadu_si512(X + j * K + k);
        for (int r = 0; r < 4; r++) {
            const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + r * K + k);
            for (int j = 0; j < 4; j++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], wv, xv[j]);
        }
    }
    if (k < K) {
        const __mmask32 mk = (__mmask32)((1u << (K - k)) - 1u);
        for (int r = 0; r < 4; r++) {
            const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mk, w + r * K + k);
            for (int j = 0; j < 4; j++)
                acc[r][j] = _mm512_dpbf16_ps(acc[r][j], wv, (__m512bh)_mm512_maskz_loadu_epi16(mk, X + j * K + k));
        }
    }
    for (int r = 0; r < 4; r++)
        for (int j = 0; j < 4; j++) out[r][j] = _mm512_reduce_add_ps(acc[r][j]);
}

// Weight rows n..n+3 (at w, K apart) times all M activation rows: activation rows in blocks of 4 (block_bf16_dp),
// then 2 / 1. Also the products of packed.cpp, over four rows it unpacked (pf false: nothing to prefetch there).
T_AVX512BF16 void four_rows_bf16_dp(const uint16_t* w, const uint16_t* X, void* Y, const float* bias, int64_t M,
                                    int64_t n, int64_t N, int64_t K, int ydt, bool pf, const char* end) {
    const int64_t mb = M / 4 * 4;
    float out[4][4], o[4];
    for (int64_t m = 0; m < mb; m += 4) {
        block_bf16_dp(w, X + m * K, K, pf && m == 0, end, out);
        for (int r = 0; r < 4; r++)
            for (int j = 0; j < 4; j++)
                store_out(Y, ydt, (m + j) * N + n + r, out[r][j] + (bias ? bias[n + r] : 0.f));
    }
    for (int r = 0; r < 4; r++)
        for (int64_t m = mb; m < M;) {
            const int g = M - m >= 2 ? 2 : 1;
            if (g == 2) row_bf16_dp<2>(w + r * K, X + m * K, K, false, end, o);
            else row_bf16_dp<1>(w + r * K, X + m * K, K, false, end, o);
            for (int j = 0; j < g; j++) store_out(Y, ydt, (m + j) * N + n + r, o[j] + (bias ? bias[n + r] : 0.f));
            m += g;
        }
}

T_AVX512BF16 static void rows_bf16_dp(const uint16_t* W, const uint16_t* X, void* Y, const float* bias, int64_t M,
                                      int64_t n0, int64_t n1, int64_t N, int64_t K, int ydt) {
    const char* end = (const char*)(W + n1 * K);
    if (M >= BLOCK_ROWS) {  // weight rows in blocks of 4
        const int64_t nb = n0 + (n1 - n0) / 4 * 4;
        const bool pf = weight_prefetch();
        for (int64_t n = n0; n < nb; n += 4) four_rows_bf16_dp(W + n * K, X, Y, bias, M, n, N, K, ydt, pf, end);
        n0 = nb;
    }
    rows_generic([&](int64_t n, int64_t m, int g, bool pf, float* out) {
        const uint16_t* w = W + n * K;
        if (g == 4) row_bf16_dp<4>(w, X + m * K, K, pf, end, out);
        else if (g == 2) row_bf16_dp<2>(w, X + m * K, K, pf, end, out);
        else row_bf16_dp<1>(w, X + m * K, K, pf, end, out);
    }, nullptr, Y, bias, M, n0, n1, N, ydt);
}

// Group g's 32 products with each of the MR activation rows, into accumulators u (elements 0..15) and u + 1.
template <int MR>
T_AVX512 static inline void i4_group_fma(const uint8_t* w, float scale, const float* X, int64_t K, int64_t g,
                                         __m512 (&acc)[MR][4], int u) {
    const __m512 levels = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(w + g * 16)));
    const __m512 table = _mm512_mul_ps(levels, _mm512_set1_ps(scale));
    const __m512 lo = _mm512_permutexvar_ps(b, table), hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
    for (int j = 0; j < MR; j++) {
        const float* x = X + j * K + g * I4_GROUP;
        acc[j][u] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x), acc[j][u]);
        acc[j][u + 1] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + 16), acc[j][u + 1]);
    }
}

// int4 weights x fp32 activations. Each group's 16 weight levels (q - 8) * scale are one vector, and the nibbles
// index it with a permute (VPERMPS reads only an index's low 4 bits, so the low nibble needs no masking): fewer
// instructions per weight than widening, subtracting and scaling each nibble (the kernel is compute-bound here).
// Two groups per iteration on four accumulators per row, so no chain waits on one FMA latency per group.
template <int MR>
T_AVX512 static void row_i4(const uint8_t* w, const float* s, const float* X, int64_t K, bool pf, const char* end,
                            float* out) {
    __m512 acc[MR][4] = {};
    const int64_t G = K / I4_GROUP;
    float sf[16];  // scales g & ~15 .. +15 (g advances by 2 from 0, so it meets every multiple of 16)
    int64_t g = 0;
    for (; g + 2 <= G; g += 2) {
        if ((g & 15) == 0) i4_scales16(s, g, G, sf);
        if (pf && (g & 3) == 0) prefetch_line((const char*)(w + g * 16) + PF_BYTES, end);
        i4_group_fma<MR>(w, sf[g & 15], X, K, g, acc, 0);
        i4_group_fma<MR>(w, sf[(g + 1) & 15], X, K, g + 1, acc, 2);
    }
    if (g < G) {
        if ((g & 15) == 0) i4_scales16(s, g, G, sf);
        i4_group_fma<MR>(w, sf[g & 15], X, K, g, acc, 0);
    }
    sum_accumulators<MR, 4>(acc, out);
}

T_AVX512 static void rows_i4(const uint8_t* W, const float* S, const float* X, void* Y, const float* bias, int64_t M,
                             int64_t n0, int64_t n1, int64_t N, int64_t K, int ydt) {
    const int64_t G = K / I4_GROUP;
    const char* end = (const char*)(W + n1 * (K / 2));
    rows_generic([&](int64_t n, int64_t m, int g, bool pf, float* out) {
        const uint8_t* w = W + n * (K / 2);
        const float* s = (const float*)((const uint16_t*)S + n * G);  // fp16 scales, read by i4_scale
        if (g == 4) row_i4<4>(w, s, X + m * K, K, pf, end, out);
        else if (g == 2) row_i4<2>(w, s, X + m * K, K, pf, end, out);
        else row_i4<1>(w, s, X + m * K, K, pf, end, out);
    }, nullptr, Y, bias, M, n0, n1, N, ydt);
}

// ---------------------------------------------------------------- dispatch
// Whether products of this weight kind quantize x for integer dot products on instruction set `isa`: int8 and
// int4 on AVX2 and on AVX512 with VNNI (elsewhere the weights are widened to meet an fp32 x).
static bool quantizes_x(int isa, int kind) {
    static const bool vnni = cpu_has_vnni();
    return (kind == 2 || kind == 3) && (isa == 1 || (isa >= 2 && vnni));
}

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
    int64_t n0, n1;
    chunk_rows(chunk, a.rows_per_chunk, a.N, &n0, &n1);
    if (a.kind == 4) {
        p12_rows(a.W, (const uint16_t*)a.X, a.Xf, a.Y, a.bias, a.M, n0, n1, a.N, a.K, a.ydt, a.streams);
    } else if (a.dp && a.streams) {
        rows_bf16_streams((const uint16_t*)a.W, (const uint16_t*)a.X, a.Y, a.bias, n0, n1, a.K, a.ydt);
    } else if (a.dp) {
        rows_bf16_dp((const uint16_t*)a.W, (const uint16_t*)a.X, a.Y, a.bias, a.M, n0, n1, a.N, a.K, a.ydt);
    } else if (a.Xp) {
        rows_bf16_avx2((const uint16_t*)a.W, a.Xp, a.Y, a.bias, a.M, n0, n1, a.N, a.K, a.ydt);
    } else if (a.Xh && a.isa >= 2 && a.streams) {
        rows_q16_streams((const int8_t*)a.W, a.S, a.Xh, a.Xd, a.Y, a.bias, n0, n1, a.K, a.ydt);
    } else if (a.Xh && a.isa >= 2) {
        rows_q16_vnni((const int8_t*)a.W, a.S, a.Xh, a.Xd, a.Y, a.bias, a.M, n0, n1, a.N, a.K, a.ydt);
    } else if (a.Xq && a.isa >= 2 && a.streams) {
        rows_q4_streams((const uint8_t*)a.W, a.S, a.Xq, a.Xd, a.Xs, a.Y, a.bias, n0, n1, a.K, a.ydt);
    } else if (a.Xq && a.isa >= 2) {
        rows_q4_vnni((const uint8_t*)a.W, a.S, a.Xq, a.Xd, a.Xs, a.Y, a.bias, a.M, n0, n1, a.N, a.K, a.ydt);
    } else if (a.Xq || a.Xh) {
        rows_q_avx2(a.kind, a.W, a.S, a.Xh, a.Xq, a.Xd, a.Xs, a.Y, a.bias, a.M, n0, n1, a.N, a.K, a.ydt);
    } else if (a.kind == 3) {
        const uint8_t* W = (const uint8_t*)a.W;
        if (a.isa >= 2) rows_i4(W, a.S, a.Xf, a.Y, a.bias, a.M, n0, n1, a.N, a.K, a.ydt);
        else i4w_scalar(W, a.S, a.Xf, a.Y, a.bias, a.M, n0, n1, a.N, a.K, a.ydt);
    } else if (a.isa >= 2) {
        if (a.kind == 0) rows_f32<0>(a.W, a.S, a.Xf, a.Y, a.bias, a.M, n0, n1, a.N, a.K, a.ydt);
        else if (a.kind == 1) rows_f32<1>(a.W, a.S, a.Xf, a.Y, a.bias, a.M, n0, n1, a.N, a.K, a.ydt);
        else rows_f32<2>(a.W, a.S, a.Xf, a.Y, a.bias, a.M, n0, n1, a.N, a.K, a.ydt);
    } else if (a.isa == 1) {
        rows_f32_avx2(a.kind, a.W, a.S, a.Xf, a.Y, a.bias, a.M, n0, n1, a.N, a.K, a.ydt);
    } else if (a.kind == 0) {
        bf16w_scalar((const uint16_t*)a.W, a.Xf, a.Y, a.bias, a.M, n0, n1, a.N, a.K, a.ydt);
    } else if (a.kind == 1) {
        f32w_scalar((const float*)a.W, a.Xf, a.Y, a.bias, a.M, n0, n1, a.N, a.K, a.ydt);
    } else {
        i8w_scalar((const int8_t*)a.W, a.S, a.Xf, a.Y, a.bias, a.M, n0, n1, a.N, a.K, a.ydt);
    }
}

// Bytes of one weight row (int4: the packed nibbles and the row's group scales).
static int64_t row_weight_bytes(int kind, int64_t K) {
    return kind == 4 ? K / 2 * 3 : kind == 3 ? K / 2 + K / I4_GROUP * 2 : K * (kind == 1 ? 4 : kind == 0 ? 2 : 1);
}

// Fill the dispatch fields of one product. Xf must be x as fp32 unless the bf16 dot-product path is taken.
void linear_setup(LinearArgs& a, int kind, const void* W, const float* S, const void* X, const float* Xf,
                         int xdt, void* Y, int ydt, const float* bias, int64_t M, int64_t N, int64_t K) {
    a.kind = kind; a.isa = active_isa(); a.ydt = ydt;
    a.dp = (kind == 0 && xdt == 1 && a.isa >= 3);
    a.streams = M == 1 && row_streams();
    a.W = W; a.S = S; a.X = X; a.Xf = Xf; a.Y = Y; a.bias = bias; a.M = M; a.N = N; a.K = K;
    if (kind == 4 && !(xdt == 1 && p12_fast())) a.X = NULL;  // packed rows take bf16 x on the AVX512 path only
    a.Xh = NULL; a.Xq = NULL; a.Xd = NULL; a.Xs = NULL; a.Xp = NULL;
    if (a.isa == 1 && kind == 0 && K % 32 == 0 && Xf) {  // AVX2 bf16: x split by parity (gemv_avx2.cpp)
        a.xp.resize(M * K);
        split_x_even_odd(Xf, M, K, a.xp.data());
        a.Xp = a.xp.data();
    }
    if (kind == 2 && K % 32 == 0 && Xf && quantizes_x(a.isa, kind)) {  // integer dot products (gemv_avx2.cpp, _vnni)
        a.xh.resize(M * K); a.xd.resize(M * ((K + Q16_BLOCK - 1) / Q16_BLOCK));
        quantize_x_q16(Xf, M, K, a.xh.data(), a.xd.data());
        a.Xh = a.xh.data(); a.Xd = a.xd.data();
    }
    if (kind == 3 && K % 32 == 0 && Xf && quantizes_x(a.isa, kind)) {
        a.xq.resize(M * K); a.xd.resize(M * K / 32); a.xs.resize(M * K / 32);
        quantize_x_q8(Xf, M, K, a.xq.data(), a.xd.data(), a.xs.data(), a.isa >= 2 ? 4 : 2);
        a.Xq = a.xq.data(); a.Xd = a.xd.data(); a.Xs = a.xs.data();
    }
    // chunks of ~256 KiB of weights: long sequential streams, yet small enough that a descheduled helper holds up
    // little (its unclaimed chunks are taken by the caller)
    int64_t row_bytes = row_weight_bytes(kind, K) * (M > 1 ? 2 : 1);
    int64_t rows = (int64_t)256 * 1024 / (row_bytes > 0 ? row_bytes : 1);
    a.rows_per_chunk = rows < 8 ? 8 : rows / 8 * 8;  // whole steps of gemv_streams.cpp's eight rows
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

void linear_many(const LinearArgs* lin, int n, int threads, bool linger) {
    MultiArgs m{lin, n};
    int64_t chunks = 0, bytes = 0;
    for (int i = 0; i < n; i++) {
        chunks += lin[i].chunks;
        bytes += lin[i].N * row_weight_bytes(lin[i].kind, lin[i].K);
    }
    pool_run(multi_chunk, &m, chunks, bytes < 64 * 1024 ? 1 : threads, linger);
}

extern "C" {

int lfm2vl_isa(void) { return active_isa(); }

int lfm2vl_cpu_isa(void) { return cpu_isa(); }
// Whether products of weight kind `kind` (2 int8, 3 int4) quantize x on the active instruction set (rows whose
// length K is a multiple of 32).
int lfm2vl_quantizes_x(int kind) { return quantizes_x(active_isa(), kind); }
void lfm2vl_set_isa(int cap) { g_isa_cap = cap; }
// Several weight streams for one activation row: -1 as the CPU's vendor says (row_streams), 0 never, 1 always.
void lfm2vl_set_streams(int mode) { g_streams = mode; }
// Software prefetch of the one-stream rows' weights: -1 as the CPU says (weight_prefetch), 0 never, 1 always.
void lfm2vl_set_prefetch(int mode) { g_prefetch = mode; }

// kind: 0 bf16 weights, 1 fp32 weights, 2 int8 weights (+ row scales S), 3 int4 weights (+ group scales S; K is
// the unpacked width), 4 bf16 weights packed in 12 bits (packed.cpp; W is the packed buffer). xdt/ydt: 0 fp32, 1 bf16.
// threads: how many threads may work on it (the caller passes torch.get_num_threads()).
void lfm2vl_linear(int kind, const void* W, const float* S, const void* X, void* Y, const float* bias, int64_t M,
                   int64_t N, int64_t K, int xdt, int ydt, int threads) {
    LinearArgs a;
    float* owned = NULL;
    bool dp = xdt == 1 && ((kind == 0 && active_isa() >= 3) || (kind == 4 && p12_fast()));
    const float* Xf = dp ? NULL : x_as_f32(X, xdt, M * K, &owned);
    linear_setup(a, kind, W, S, X, Xf, xdt, Y, ydt, bias, M, N, K);
    linear_many(&a, 1, threads, false);
    free(owned);
}

}  // extern "C"
