// The AVX2 + FMA products of gemv.cpp (CPUs without AVX512: AMD Zen 1-3, most laptops before 2021).
//
// bf16 / fp32 weights: widened to fp32 and multiplied with FMA (the same math as the other ISAs).
// int8 / int4 weights: AVX2 has no instruction that widens a byte to fp32 in one step, so widening costs three
// instructions per 8 weights and the product is bound by them, not by memory. Here x is quantized once per product
// and the weights meet it in integer multiply-adds:
//   int8: x to int16 per block of 256 (`quantize_x_q16`: d = amax / 32767, q = round(x / d)); each weight byte is
//     sign-extended to 16 bits and VPMADDWD sums w * q pairs into int32 lanes that hold a whole block exactly, so one
//     conversion and one FMA per 256 weights remain: y[n] = S[n] * sum_b d_b * sum_i w[n, i] q_i.
//   int4: x to int8 per block of 32 (`quantize_x_q8`, as llama.cpp's Q8_0: d = amax / 127), VPMADDUBSW multiplies
//     the unsigned nibbles by q, two groups per register:
//     y[n] = sum_g S[n, g] * d_g * sum_i nibble_i q_i - 8 sum_g S[n, g] * d_g * sum_i q_i.
// So results differ from the fp32-activation paths by x's rounding in each block: at most 1/65534 (int8) or 1/254
// (int4) of the block's largest value per element, below the weights' own rounding (1/254 int8, 1/16 int4).
#include <immintrin.h>
#include "gemv.h"
#include <math.h>
#include <stdint.h>

T_AVX2 static inline __m256 load8_i8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}

// ---------------------------------------------------------------- fp32 activations (any weight kind)
// `kind` 0 = bf16 weights, 1 = fp32 weights, 2 = int8 weights (x times the row scale S[n]).
T_AVX2 void rows_f32_avx2(int kind, const void* Wv, const float* S, const float* X, void* Y, const float* bias,
                          int64_t M, int64_t n0, int64_t n1, int64_t N, int64_t K, int ydt) {
    const int64_t K8 = K & ~(int64_t)7;
    const int esz = kind == 1 ? 4 : kind == 0 ? 2 : 1;
    const char* end = (const char*)Wv + n1 * K * esz;
    const bool pf = weight_prefetch();
    for (int64_t m = 0; m < M; m++) {
        const float* x = X + m * K;
        for (int64_t n = n0; n < n1; n++) {
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
                   a3 = _mm256_setzero_ps();
            int64_t k = 0;
            for (; k + 32 <= K8; k += 32) {
                __m256 w0, w1, w2, w3;
                if (pf && m == 0)
                    for (int l = 0; l < esz / 2 + (esz == 1); l++)
                        prefetch_line((const char*)Wv + (n * K + k) * esz + PF_BYTES + 64 * l, end);
                if (kind == 0) {
                    const uint16_t* w = (const uint16_t*)Wv + n * K + k;
                    w0 = load8_bf16(w); w1 = load8_bf16(w + 8); w2 = load8_bf16(w + 16); w3 = load8_bf16(w + 24);
                } else if (kind == 1) {
                    const float* w = (const float*)Wv + n * K + k;
                    w0 = _mm256_loadu_ps(w); w1 = _mm256_loadu_ps(w + 8);
                    w2 = _mm256_loadu_ps(w + 16); w3 = _mm256_loadu_ps(w + 24);
                } else {
                    const int8_t* w = (const int8_t*)Wv + n * K + k;
                    w0 = load8_i8(w); w1 = load8_i8(w + 8); w2 = load8_i8(w + 16); w3 = load8_i8(w + 24);
                }
                a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + k), a0);
                a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + k + 8), a1);
                a2 = _mm256_fmadd_ps(w2, _mm256_loadu_ps(x + k + 16), a2);
                a3 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(x + k + 24), a3);
            }
            for (; k < K8; k += 8) {
                __m256 w0;
                if (kind == 0) w0 = load8_bf16((const uint16_t*)Wv + n * K + k);
                else if (kind == 1) w0 = _mm256_loadu_ps((const float*)Wv + n * K + k);
                else w0 = load8_i8((const int8_t*)Wv + n * K + k);
                a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + k), a0);
            }
            float acc = hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
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

// ---------------------------------------------------------------- bf16 weights, x split by parity
// A 32-bit lane of bf16 weights holds elements 2i (low half) and 2i + 1 (high half): a shift widens the even one
// and a mask the odd one, two instructions per 16 weights (widening 8 at a time takes two per 8). x is laid out to
// match once per product: each block of 16 as its 8 even-indexed values, then its 8 odd-indexed ones.
T_AVX2 void split_x_even_odd(const float* X, int64_t M, int64_t K, float* out) {
    const __m256i idx = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    for (int64_t i = 0; i < M * K; i += 16) {
        const __m256 a = _mm256_permutevar8x32_ps(_mm256_loadu_ps(X + i), idx);      // x0 x2 x4 x6 | x1 x3 x5 x7
        const __m256 b = _mm256_permutevar8x32_ps(_mm256_loadu_ps(X + i + 8), idx);  // x8 .. x14 | x9 .. x15
        _mm256_storeu_ps(out + i, _mm256_permute2f128_ps(a, b, 0x20));
        _mm256_storeu_ps(out + i + 8, _mm256_permute2f128_ps(a, b, 0x31));
    }
}

template <int MR>
T_AVX2 static void row_bf16_eo(const uint16_t* w, const float* Xp, int64_t K, bool pf, const char* end, float* out) {
    constexpr int U = MR == 1 ? 2 : 1;  // 16-weight blocks per step, each on its own pair of accumulators
    __m256 acc[MR][2 * U];
    for (int j = 0; j < MR; j++)
        for (int u = 0; u < 2 * U; u++) acc[j][u] = _mm256_setzero_ps();
    const __m256i hi = _mm256_set1_epi32((int)0xffff0000u);
    for (int64_t k = 0; k < K; k += 16 * U) {
        if (pf)
            prefetch_line((const char*)(w + k) + PF_BYTES, end);
        for (int u = 0; u < U; u++) {
            const __m256i v = _mm256_loadu_si256((const __m256i*)(w + k + 16 * u));
            const __m256 e = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), o = _mm256_castsi256_ps(_mm256_and_si256(v, hi));
            for (int j = 0; j < MR; j++) {
                const float* x = Xp + j * K + k + 16 * u;
                acc[j][2 * u] = _mm256_fmadd_ps(e, _mm256_loadu_ps(x), acc[j][2 * u]);
                acc[j][2 * u + 1] = _mm256_fmadd_ps(o, _mm256_loadu_ps(x + 8), acc[j][2 * u + 1]);
            }
        }
    }
    for (int j = 0; j < MR; j++) {
        __m256 t = acc[j][0];
        for (int u = 1; u < 2 * U; u++) t = _mm256_add_ps(t, acc[j][u]);
        out[j] = hsum256(t);
    }
}

// Rows n0..n1-1 of a bf16-weight product with x split by parity (K a multiple of 32), 4 / 2 / 1 activation rows per
// pass over a weight row.
T_AVX2 void rows_bf16_avx2(const uint16_t* W, const float* Xp, void* Y, const float* bias, int64_t M, int64_t n0,
                           int64_t n1, int64_t N, int64_t K, int ydt) {
    const char* end = (const char*)(W + n1 * K);
    const bool pf = weight_prefetch();
    float out[4];
    for (int64_t n = n0; n < n1; n++) {
        for (int64_t m = 0; m < M;) {
            const int g = M - m >= 4 ? 4 : M - m >= 2 ? 2 : 1;
            if (g == 4) row_bf16_eo<4>(W + n * K, Xp + m * K, K, pf && m == 0, end, out);
            else if (g == 2) row_bf16_eo<2>(W + n * K, Xp + m * K, K, pf && m == 0, end, out);
            else row_bf16_eo<1>(W + n * K, Xp + m * K, K, pf && m == 0, end, out);
            for (int j = 0; j < g; j++) store_out(Y, ydt, (m + j) * N + n, out[j] + (bias ? bias[n] : 0.f));
            m += g;
        }
    }
}

// ---------------------------------------------------------------- int8-quantized activations
// x (M, K) fp32 -> q (M, K) int8 and d (M, K/32): per block of 32, d = amax / 127 and q = round(x * (1 / d)) to
// nearest even (d = 0 and q = 0 for an all-zero block); qsum (M, K/32) = the sum of each block's q (as fp32).
// q is laid out for int4 rows that take P groups per register (row_q4: 2, gemv_vnni.cpp: 4): each run of P blocks
// of a row (fewer at its end) is stored as the first halves of its blocks, then their second halves.
T_AVX2 void quantize_x_q8(const float* X, int64_t M, int64_t K, int8_t* q, float* d, float* qsum, int P) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int64_t b = 0; b < M * K / 32; b++) {
        const float* x = X + b * 32;
        __m256 v[4], mx = _mm256_setzero_ps();
        for (int j = 0; j < 4; j++) {
            v[j] = _mm256_loadu_ps(x + 8 * j);
            mx = _mm256_max_ps(mx, _mm256_and_ps(v[j], absmask));
        }
        const float amax = hmax8(mx);
        const float db = amax / 127.0f, id = db > 0.f ? 1.0f / db : 0.f;
        d[b] = db;
        __m256i i32[4];
        for (int j = 0; j < 4; j++)
            i32[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], _mm256_set1_ps(id)),
                                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        __m256i s = _mm256_add_epi32(_mm256_add_epi32(i32[0], i32[1]), _mm256_add_epi32(i32[2], i32[3]));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
        qsum[b] = (float)_mm_cvtsi128_si32(s4);  // |qsum| <= 32 * 127: exact
        // int32 -> int16 -> int8 with saturation keeps the order within 128-bit lanes: undo it with a permute
        const __m256i p16a = _mm256_packs_epi32(i32[0], i32[1]), p16b = _mm256_packs_epi32(i32[2], i32[3]);
        const __m256i p8 = _mm256_packs_epi16(p16a, p16b);
        const __m256i qb = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        const int64_t G = K / 32, m = b / G, g = b % G, run = g - g % P, r = G - run < P ? G - run : P;
        int8_t* base = q + m * K + run * 32 + (g - run) * 16;
        _mm_storeu_si128((__m128i*)base, _mm256_castsi256_si128(qb));
        _mm_storeu_si128((__m128i*)(base + 16 * r), _mm256_extracti128_si256(qb, 1));
    }
}

// x (M, K) fp32 -> q (M, K) int16 and d (M, ceil(K / Q16_BLOCK)): per block of Q16_BLOCK (the last one may be
// shorter), d = amax / 32767 and q = round(x * (1 / d)) to nearest even (d = 0 and q = 0 for an all-zero block).
// K is a multiple of 32.
T_AVX2 void quantize_x_q16(const float* X, int64_t M, int64_t K, int16_t* q, float* d) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const int64_t nb = (K + Q16_BLOCK - 1) / Q16_BLOCK;
    for (int64_t m = 0; m < M; m++) {
        const float* x = X + m * K;
        for (int64_t b = 0; b < nb; b++) {
            const int64_t k0 = b * Q16_BLOCK, k1 = k0 + Q16_BLOCK < K ? k0 + Q16_BLOCK : K;
            __m256 mx = _mm256_setzero_ps();
            for (int64_t k = k0; k < k1; k += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(x + k), absmask));
            const float db = hmax8(mx) / 32767.0f, id = db > 0.f ? 1.0f / db : 0.f;
            d[m * nb + b] = db;
            const __m256 vid = _mm256_set1_ps(id);
            for (int64_t k = k0; k < k1; k += 16) {
                const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), vid));  // nearest even
                const __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8), vid));
                // packs interleaves 128-bit lanes (a0-3 c0-3 | a4-7 c4-7): a 64-bit permute restores the order
                _mm256_storeu_si256((__m256i*)(q + m * K + k),
                                    _mm256_permute4x64_epi64(_mm256_packs_epi32(a, c), 0xd8));
            }
        }
    }
}

// int8 weights x int16-quantized activations, MR activation rows per pass over a weight row. Each 8 weight bytes are
// sign-extended once (VPMOVSXBW, 128-bit: one instruction on every AVX2 core) and multiplied into int32 lanes per
// row; a block's lanes then go to fp32 with the block's scale. A block holds 256 products, so even their whole
// sum is exact in int32 (256 * 127 * 32767 < 2^31).
template <int MR>
T_AVX2 static void row_q16(const int8_t* w, const int16_t* Q, const float* D, int64_t K, bool pf, const char* end,
                           float* out) {
    constexpr int NA = MR == 1 ? 4 : 2;  // int32 accumulators per row: enough to keep VPMADDWD's latency hidden
    const int64_t nb = (K + Q16_BLOCK - 1) / Q16_BLOCK;
    __m128 facc[MR];
    for (int j = 0; j < MR; j++) facc[j] = _mm_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const int64_t k0 = b * Q16_BLOCK, k1 = k0 + Q16_BLOCK < K ? k0 + Q16_BLOCK : K;
        __m128i acc[MR][NA];
        for (int j = 0; j < MR; j++)
            for (int a = 0; a < NA; a++) acc[j][a] = _mm_setzero_si128();
        for (int64_t k = k0; k < k1; k += 32) {
            if (pf) prefetch_line((const char*)(w + k) + PF_BYTES, end);
            for (int i = 0; i < 4; i++) {
                const __m128i wv = _mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i*)(w + k + 8 * i)));
                for (int j = 0; j < MR; j++)
                    acc[j][i % NA] = _mm_add_epi32(acc[j][i % NA], _mm_madd_epi16(
                        wv, _mm_loadu_si128((const __m128i*)(Q + j * K + k + 8 * i))));
            }
        }
        for (int j = 0; j < MR; j++) {
            __m128i t = acc[j][0];
            for (int a = 1; a < NA; a++) t = _mm_add_epi32(t, acc[j][a]);
            facc[j] = _mm_fmadd_ps(_mm_cvtepi32_ps(t), _mm_set1_ps(D[j * nb + b]), facc[j]);
        }
    }
    for (int j = 0; j < MR; j++) out[j] = hsum128(facc[j]);
}

// Groups g and g + 1 of an int4 row (their 32 bytes) against their activations laid out as quantize_x_q8 pairs them:
// the low nibbles (elements 0..15 of each group) meet the first halves, the high nibbles (16..31) the second halves.
// Two VPMADDUBSW products of unsigned nibbles (<= 15) and |q| <= 127 add in int16 without overflow (<= 4 * 15 * 127),
// so one VPMADDWD gives 8 int32 lanes: 4 per group.
T_AVX2 static inline __m256i i4_pair_dot(__m256i v, const int8_t* q) {
    const __m256i m15 = _mm256_set1_epi8(15);
    const __m256i lo = _mm256_and_si256(v, m15), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m15);
    const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i*)q)),
                                       _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i*)(q + 32))));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

// A last unpaired group: its 16 bytes as 32 nibbles (the low ones, elements 0..15, in the low half).
T_AVX2 static inline __m256i i4_single_dot(const uint8_t* w, const int8_t* q) {
    const __m128i b = _mm_loadu_si128((const __m128i*)w);
    const __m256i nib = _mm256_and_si256(_mm256_inserti128_si256(_mm256_castsi128_si256(b), _mm_srli_epi16(b, 4), 1),
                                         _mm256_set1_epi8(15));
    return _mm256_madd_epi16(_mm256_maddubs_epi16(nib, _mm256_loadu_si256((const __m256i*)q)), _mm256_set1_epi16(1));
}

// int4 weights (gemv.h's layout) x int8-quantized activations. Per group: sum nibble * q in integers, times
// S[n, g] * d_g; the -8 offset is taken off once per row as 8 * sum_g S[n, g] * d_g * qsum_g. Eight groups' scale
// products are formed at a time; two groups share a register; two accumulators per activation row alternate.
template <int MR>
T_AVX2 static void row_q4(const uint8_t* w, const uint16_t* s, const int8_t* Q, const float* D, const float* QS,
                          int64_t K, bool pf, const char* end, float* out) {
    __m256 acc[MR][2], corr[MR];
    for (int j = 0; j < MR; j++) acc[j][0] = acc[j][1] = corr[j] = _mm256_setzero_ps();
    const int64_t G = K / I4_GROUP;
    int64_t g = 0;
    for (; g + 8 <= G; g += 8) {
        const __m256 sc = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(s + g)));
        __m256 sd[MR];  // S[n, g + i] * d_{g + i} for the 8 groups
        for (int j = 0; j < MR; j++) {
            sd[j] = _mm256_mul_ps(sc, _mm256_loadu_ps(D + j * G + g));
            corr[j] = _mm256_fmadd_ps(sd[j], _mm256_loadu_ps(QS + j * G + g), corr[j]);
        }
        if (pf) {
            prefetch_line((const char*)(w + g * 16) + PF_BYTES, end);
            prefetch_line((const char*)(w + g * 16) + PF_BYTES + 64, end);
        }
        for (int u = 0; u < 8; u += 2) {
            const __m256i v = _mm256_loadu_si256((const __m256i*)(w + (g + u) * 16));
            // lanes 0-3 take group u's scale, lanes 4-7 group u + 1's
            const __m256i pick = _mm256_setr_epi32(u, u, u, u, u + 1, u + 1, u + 1, u + 1);
            for (int j = 0; j < MR; j++) {
                const __m256i p = i4_pair_dot(v, Q + j * K + (g + u) * 32);
                acc[j][(u >> 1) & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_permutevar8x32_ps(sd[j], pick),
                                                       acc[j][(u >> 1) & 1]);
            }
        }
    }
    float tail[MR] = {};
    for (; g + 2 <= G; g += 2) {  // the last pairs
        const float s0 = _cvtsh_ss(s[g]), s1 = _cvtsh_ss(s[g + 1]);
        const __m256i v = _mm256_loadu_si256((const __m256i*)(w + g * 16));
        for (int j = 0; j < MR; j++) {
            const float sd0 = s0 * D[j * G + g], sd1 = s1 * D[j * G + g + 1];
            const __m256i p = i4_pair_dot(v, Q + j * K + g * 32);
            acc[j][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set_m128(_mm_set1_ps(sd1), _mm_set1_ps(sd0)),
                                        acc[j][0]);
            tail[j] += sd0 * QS[j * G + g] + sd1 * QS[j * G + g + 1];
        }
    }
    if (g < G) {  // an odd group count's last group
        const float s0 = _cvtsh_ss(s[g]);
        for (int j = 0; j < MR; j++) {
            const float sd0 = s0 * D[j * G + g];
            const __m256i p = i4_single_dot(w + g * 16, Q + j * K + g * 32);
            acc[j][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(sd0), acc[j][0]);
            tail[j] += sd0 * QS[j * G + g];
        }
    }
    for (int j = 0; j < MR; j++)
        out[j] = hsum256(_mm256_add_ps(acc[j][0], acc[j][1])) - 8.0f * (hsum256(corr[j]) + tail[j]);
}

// Rows n0..n1-1 of an int8 (kind 2: Xh, Xd from quantize_x_q16) or int4 (kind 3: Xq, Xd, Xs from quantize_x_q8)
// product for all M rows, in groups of 4 / 2 / 1 activation rows per pass over a weight row.
T_AVX2 void rows_q_avx2(int kind, const void* W, const float* S, const int16_t* Xh, const int8_t* Xq, const float* Xd,
                        const float* Xs, void* Y, const float* bias, int64_t M, int64_t n0, int64_t n1, int64_t N,
                        int64_t K, int ydt) {
    const int64_t nb = kind == 2 ? (K + Q16_BLOCK - 1) / Q16_BLOCK : K / 32, row_bytes = kind == 2 ? K : K / 2;
    const char* end = (const char*)W + n1 * row_bytes;
    const bool pf = weight_prefetch();
    float out[4];
    for (int64_t n = n0; n < n1; n++) {
        const void* w = (const char*)W + n * row_bytes;
        for (int64_t m = 0; m < M;) {
            const int g = M - m >= 4 ? 4 : M - m >= 2 ? 2 : 1;
            const float* d = Xd + m * nb;
            if (kind == 2) {
                const int8_t* wr = (const int8_t*)w;
                const int16_t* q = Xh + m * K;
                if (g == 4) row_q16<4>(wr, q, d, K, pf && m == 0, end, out);
                else if (g == 2) row_q16<2>(wr, q, d, K, pf && m == 0, end, out);
                else row_q16<1>(wr, q, d, K, pf && m == 0, end, out);
            } else {
                const int8_t* q = Xq + m * K;
                const uint8_t* wr = (const uint8_t*)w;
                const uint16_t* sr = (const uint16_t*)S + n * nb;
                const float* qs = Xs + m * nb;
                if (g == 4) row_q4<4>(wr, sr, q, d, qs, K, m == 0, end, out);
                else if (g == 2) row_q4<2>(wr, sr, q, d, qs, K, m == 0, end, out);
                else row_q4<1>(wr, sr, q, d, qs, K, m == 0, end, out);
            }
            for (int j = 0; j < g; j++) {
                const float v = kind == 2 ? out[j] * S[n] : out[j];
                store_out(Y, ydt, (m + j) * N + n, v + (bias ? bias[n] : 0.f));
            }
            m += g;
        }
    }
}
