// int8 and int4 products on AVX512 CPUs with VNNI (Ice Lake, Sapphire Rapids and later Xeons, AMD Zen 4+).
//
// Widening each weight to fp32 costs three or more instructions per 16 weights, enough that the product falls behind
// the memory stream. Here x is quantized once per product (the same formulas as the AVX2 paths, gemv_avx2.cpp) and
// the weights meet it in integer multiply-adds:
//   int8: x to int16 per block of Q16_BLOCK (`quantize_x_q16`: d = amax / 32767); 32 weight bytes are sign-extended
//     at once (VPMOVSXBW) and VPDPWSSD multiplies them into 16 int32 lanes per activation row: two instructions per
//     32 weights, one conversion and one FMA per block. y[n] = S[n] * sum_b d_b * sum_i w[n, i] q_i. A block holds
//     256 products, so even its whole sum is exact in int32 (256 * 127 * 32767 < 2^31).
//   int4: x to int8 per group of 32 (`quantize_x_q8`, laid out four groups to a run); a register holds four groups'
//     bytes, VPDPBUSD multiplies the unsigned nibbles by q (low nibbles with the groups' first halves, high nibbles
//     with their second halves), so each 128-bit lane sums one group: y[n] = sum_g S[n, g] d_g sum_i nibble_i q_i
//     - 8 sum_g S[n, g] d_g sum_i q_i.
// Results differ from the fp32-activation paths by x's rounding: at most 1/65534 (int8) or 1/254 (int4) of the
// block's largest value per element.
#include <immintrin.h>
#include "gemv.h"
#include <stdint.h>

bool cpu_has_vnni() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni");
}

// One activation row's int32 lanes start from zero in each block; a full block's eight steps are unrolled (a loop
// with a run-time trip count per block made the row ~1.7x slower), a shorter last block takes them one by one.
// always_inline: a call per weight row cost ~20% of an L2-resident product. For the same reason the rows functions
// below loop themselves instead of passing a lambda to gemv.h's rows_generic: a lambda does not take the VNNI
// target, so the row could not be inlined into it (and forcing it breaks the build on CPUs without AVX512).
template <int MR>
T_AVX512VNNI static inline __attribute__((always_inline)) void row_q16_vnni(const int8_t* w, const int16_t* Q,
                                                                           const float* D, int64_t K, bool pf,
                                                                           const char* end, float* out) {
    constexpr int NA = 4 / MR;  // int32 accumulators per row: four chains in all, to hide VPDPWSSD's latency
    const int64_t nb = (K + Q16_BLOCK - 1) / Q16_BLOCK;
    __m512 facc[MR];
    for (int j = 0; j < MR; j++) facc[j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const int64_t k0 = b * Q16_BLOCK, len = K - k0 < Q16_BLOCK ? K - k0 : Q16_BLOCK;
        const int8_t* wb = w + k0;
        if (pf)
            for (int l = 0; l < Q16_BLOCK / 64; l++) prefetch_line((const char*)wb + PF_BYTES + 64 * l, end);
        __m512i acc[MR][NA];
        for (int j = 0; j < MR; j++)
            for (int a = 0; a < NA; a++) acc[j][a] = _mm512_setzero_si512();
        if (len == Q16_BLOCK) {
#pragma GCC unroll 8
            for (int i = 0; i < Q16_BLOCK / 32; i++) {
                const __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(wb + 32 * i)));
                for (int j = 0; j < MR; j++)
                    acc[j][i % NA] = _mm512_dpwssd_epi32(acc[j][i % NA], wv,
                                                         _mm512_loadu_si512(Q + j * K + k0 + 32 * i));
            }
        } else {
            for (int64_t i = 0; i < len; i += 32) {
                const __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(wb + i)));
                for (int j = 0; j < MR; j++)
                    acc[j][0] = _mm512_dpwssd_epi32(acc[j][0], wv, _mm512_loadu_si512(Q + j * K + k0 + i));
            }
        }
        for (int j = 0; j < MR; j++) {
            __m512i t = acc[j][0];
            for (int a = 1; a < NA; a++) t = _mm512_add_epi32(t, acc[j][a]);
            facc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_set1_ps(D[j * nb + b]), facc[j]);
        }
    }
    for (int j = 0; j < MR; j++) out[j] = _mm512_reduce_add_ps(facc[j]);
}

// The 128-bit lane i of four groups' scale products: sd[4u + i] in every lane of it.
T_AVX512 static inline __m512 lane_scales(__m512 sd, int u) {
    const __m512i idx = _mm512_add_epi32(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                                         _mm512_set1_epi32(4 * u));
    return _mm512_permutexvar_ps(idx, sd);
}

// The bytes of r (1..4) groups' 16-byte runs.
static inline __mmask64 quad_mask(int r) { return r == 4 ? ~(__mmask64)0 : (((__mmask64)1 << (16 * r)) - 1); }

// r groups' 16 bytes of nibbles as two registers of unsigned bytes: the low nibbles, then the high ones.
T_AVX512 static inline void i4_quad_nibbles(const uint8_t* w, int r, __m512i& lo, __m512i& hi) {
    const __m512i v = _mm512_maskz_loadu_epi8(quad_mask(r), w), m15 = _mm512_set1_epi8(15);
    lo = _mm512_and_si512(v, m15);
    hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m15);
}

// Those groups against their activations (a run of r in quantize_x_q8's layout): 4 int32 lanes per group, in 128-bit
// lane i for group i (the others 0).
T_AVX512VNNI static inline __m512i i4_quad_dot(__m512i lo, __m512i hi, const int8_t* q, int r) {
    const __mmask64 mk = quad_mask(r);
    const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_maskz_loadu_epi8(mk, q));
    return _mm512_dpbusd_epi32(p, hi, _mm512_maskz_loadu_epi8(mk, q + 16 * r));
}

// Groups g + 4u .. g + 4u + r - 1 (r <= 4) of an int4 row into acc[j][u & 1] (u a template argument: the
// accumulators' indices are constants, so they stay in registers; an index known only at run time kept them in
// memory, a store and a load on every update).
template <int MR, int U>
T_AVX512VNNI static inline __attribute__((always_inline)) void i4_quad(const uint8_t* w, const int8_t* Q, int64_t K,
                                                                      int64_t g, int r, const __m512 (&sd)[MR],
                                                                      __m512 (&acc)[MR][2]) {
    __m512i lo, hi;
    i4_quad_nibbles(w + (g + 4 * U) * 16, r, lo, hi);
    for (int j = 0; j < MR; j++) {
        const __m512i p = i4_quad_dot(lo, hi, Q + j * K + (g + 4 * U) * 32, r);
        acc[j][U & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), lane_scales(sd[j], U), acc[j][U & 1]);
    }
}

// Groups g .. g + left - 1 (left <= 16) of an int4 row into acc (two per activation row, alternating by register)
// and the offset's sum into corr. Each register of nibbles is unpacked once for all MR activation rows.
template <int MR>
T_AVX512VNNI static inline __attribute__((always_inline)) void i4_step16(const uint8_t* w, const uint16_t* s,
                                                                        const int8_t* Q, const float* D,
                                                                        const float* QS, int64_t K, int64_t G,
                                                                        int64_t g, int64_t left,
                                                                        __m512 (&acc)[MR][2], __m512 (&corr)[MR]) {
    const __mmask16 mk = tail16(left);
    const __m512 sc = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, s + g));
    __m512 sd[MR];
    for (int j = 0; j < MR; j++) {
        sd[j] = _mm512_mul_ps(sc, _mm512_maskz_loadu_ps(mk, D + j * G + g));  // S[n, g + i] * d_{g + i}
        corr[j] = _mm512_fmadd_ps(sd[j], _mm512_maskz_loadu_ps(mk, QS + j * G + g), corr[j]);
    }
    const int n = (int)left;
    i4_quad<MR, 0>(w, Q, K, g, n >= 4 ? 4 : n, sd, acc);
    if (n > 4) i4_quad<MR, 1>(w, Q, K, g, n >= 8 ? 4 : n - 4, sd, acc);
    if (n > 8) i4_quad<MR, 2>(w, Q, K, g, n >= 12 ? 4 : n - 8, sd, acc);
    if (n > 12) i4_quad<MR, 3>(w, Q, K, g, n - 12, sd, acc);
}

// How far ahead an int4 row's weights are prefetched. A byte of int4 holds two weights and takes ~4x the instructions
// of a bf16 byte, so fewer of the stream's lines are in flight from the loads alone: on an AMD Zen 5 VM gemv.h's
// PF_BYTES left the product below the memory's rate, 8 KB ahead beat 4 KB by 9-12% and 12-16 KB gave less; on an
// Intel Xeon with AMX and on an AMD Zen 4 VM PF_BYTES (2 KB) beat 8 KB and no prefetch at all (docs/cpu.md).
static int64_t pf_i4_bytes() {
    static const bool near = (__builtin_cpu_init(), __builtin_cpu_is("intel") || cpu_zen4());
    return near ? PF_BYTES : 4 * PF_BYTES;
}

// int4 weights (gemv.h's layout) x int8-quantized activations, sixteen groups per step (four registers of four).
template <int MR>
T_AVX512VNNI static inline __attribute__((always_inline)) void row_q4_vnni(const uint8_t* w, const uint16_t* s,
                                                                          const int8_t* Q, const float* D,
                                                                          const float* QS, int64_t K, bool pf,
                                                                          int64_t ahead, const char* end, float* out) {
    __m512 acc[MR][2], corr[MR];
    for (int j = 0; j < MR; j++) acc[j][0] = acc[j][1] = corr[j] = _mm512_setzero_ps();
    const int64_t G = K / I4_GROUP;
    int64_t g = 0;
    for (; g + 16 <= G; g += 16) {
        if (pf)
            for (int l = 0; l < 4; l++) prefetch_line((const char*)(w + g * 16) + ahead + 64 * l, end);
        i4_step16<MR>(w, s, Q, D, QS, K, G, g, 16, acc, corr);
    }
    if (g < G) i4_step16<MR>(w, s, Q, D, QS, K, G, g, G - g, acc, corr);
    for (int j = 0; j < MR; j++)
        out[j] = _mm512_reduce_add_ps(_mm512_add_ps(acc[j][0], acc[j][1])) - 8.0f * _mm512_reduce_add_ps(corr[j]);
}

// Rows n0..n1-1 of an int4 product with x from quantize_x_q8 (runs of 4), 4 / 2 / 1 activation rows per pass.
T_AVX512VNNI void rows_q4_vnni(const uint8_t* W, const float* S, const int8_t* Xq, const float* Xd, const float* Xs,
                               void* Y, const float* bias, int64_t M, int64_t n0, int64_t n1, int64_t N, int64_t K,
                               int ydt) {
    const int64_t G = K / I4_GROUP;
    const char* end = (const char*)(W + n1 * (K / 2));
    const int64_t ahead = pf_i4_bytes();
    float out[4];
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t* w = W + n * (K / 2);
        const uint16_t* s = (const uint16_t*)S + n * G;
        for (int64_t m = 0; m < M;) {
            const int g = M - m >= 4 ? 4 : M - m >= 2 ? 2 : 1;
            const int8_t* q = Xq + m * K;
            const float *d = Xd + m * G, *qs = Xs + m * G;
            if (g == 4) row_q4_vnni<4>(w, s, q, d, qs, K, m == 0, ahead, end, out);
            else if (g == 2) row_q4_vnni<2>(w, s, q, d, qs, K, m == 0, ahead, end, out);
            else row_q4_vnni<1>(w, s, q, d, qs, K, m == 0, ahead, end, out);
            for (int j = 0; j < g; j++) store_out(Y, ydt, (m + j) * N + n, out[j] + (bias ? bias[n] : 0.f));
            m += g;
        }
    }
}

// NS int4 rows against one activation row, their 16-group steps interleaved: NS sequential weight streams per
// thread. Each row's sums are row_q4_vnni<1>'s, in the same order.
template <int NS>
T_AVX512VNNI static inline void q4_rows(const uint8_t* const* w, const uint16_t* const* s, const int8_t* Q,
                                        const float* D, const float* QS, int64_t K, int64_t ahead, const char* end,
                                        float* out) {
    __m512 acc[NS][1][2], corr[NS][1];
    for (int j = 0; j < NS; j++) acc[j][0][0] = acc[j][0][1] = corr[j][0] = _mm512_setzero_ps();
    const int64_t G = K / I4_GROUP;
    int64_t g = 0;
    for (; g + 16 <= G; g += 16)
        for (int j = 0; j < NS; j++) {
            for (int l = 0; l < 4; l++) prefetch_line((const char*)(w[j] + g * 16) + ahead + 64 * l, end);
            i4_step16<1>(w[j], s[j], Q, D, QS, K, G, g, 16, acc[j], corr[j]);
        }
    if (g < G)
        for (int j = 0; j < NS; j++) i4_step16<1>(w[j], s[j], Q, D, QS, K, G, g, G - g, acc[j], corr[j]);
    for (int j = 0; j < NS; j++)
        out[j] = _mm512_reduce_add_ps(_mm512_add_ps(acc[j][0][0], acc[j][0][1])) -
                 8.0f * _mm512_reduce_add_ps(corr[j][0]);
}

// One activation row (a decode step) on the CPUs where several weight streams per thread read faster (gemv.cpp's
// row_streams): two rows at a time. On the Sapphire Rapids VM of 2026-12-04 one stream read ~25 GB/s of a 31.5 GB/s
// memory and two read 28-29 (3B int4 decode 16.9 -> 19.3-19.7 tok/s, 450M 114 -> 135); four gained half as much
// and eight lost 7%: with ~4x a bf16 byte's instructions per int4 byte, more streams wait on the arithmetic.
T_AVX512VNNI void rows_q4_streams(const uint8_t* W, const float* S, const int8_t* Xq, const float* Xd,
                                  const float* Xs, void* Y, const float* bias, int64_t n0, int64_t n1, int64_t K,
                                  int ydt) {
    const int64_t G = K / I4_GROUP, ahead = pf_i4_bytes();
    const char* end = (const char*)(W + n1 * (K / 2));
    by_parts<2>(n0, n1, nullptr, bias, Y, ydt, [&](const int64_t* n, int count, float* out) {
        const uint8_t* w[2];
        const uint16_t* s[2];
        for (int j = 0; j < count; j++) {
            w[j] = W + n[j] * (K / 2);
            s[j] = (const uint16_t*)S + n[j] * G;
        }
        if (count == 2) q4_rows<2>(w, s, Xq, Xd, Xs, K, ahead, end, out);
        else q4_rows<1>(w, s, Xq, Xd, Xs, K, ahead, end, out);
    });
}

// Rows n0..n1-1 of an int8 product with x from quantize_x_q16 (K a multiple of 32), 4 / 2 / 1 activation rows per
// pass over a weight row.
T_AVX512VNNI void rows_q16_vnni(const int8_t* W, const float* S, const int16_t* Xh, const float* Xd, void* Y,
                                const float* bias, int64_t M, int64_t n0, int64_t n1, int64_t N, int64_t K, int ydt) {
    const int64_t nb = (K + Q16_BLOCK - 1) / Q16_BLOCK;
    const char* end = (const char*)(W + n1 * K);
    const bool pf = weight_prefetch();
    float out[4];
    for (int64_t n = n0; n < n1; n++) {
        for (int64_t m = 0; m < M;) {
            const int g = M - m >= 4 ? 4 : M - m >= 2 ? 2 : 1;
            const int16_t* q = Xh + m * K;
            const float* d = Xd + m * nb;
            if (g == 4) row_q16_vnni<4>(W + n * K, q, d, K, pf && m == 0, end, out);
            else if (g == 2) row_q16_vnni<2>(W + n * K, q, d, K, pf && m == 0, end, out);
            else row_q16_vnni<1>(W + n * K, q, d, K, pf && m == 0, end, out);
            for (int j = 0; j < g; j++) store_out(Y, ydt, (m + j) * N + n, out[j] * S[n] + (bias ? bias[n] : 0.f));
            m += g;
        }
    }
}
