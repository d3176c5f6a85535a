// The AVX2 + FMA products of gemv.cpp (CPUs without AVX512: AMD Zen 2/3, most laptops before 2021).
//
// bf16 / fp32 weights: widened to fp32 and multiplied with FMA (the same math as the other ISAs).
// int8 / int4 weights: AVX2 has no instruction that widens a byte to fp32 in one step, so widening costs three
// instructions per 8 weights and the product is bound by them, not by memory. Here x is quantized to int8 in blocks
// of 32 (`quantize_x_q8`, as llama.cpp's Q8_0: d = amax / 127, q = round(x / d)) and each block's 32 products are
// summed in integers by VPMADDUBSW + VPMADDWD (3 to 5 instructions per 32 weights), then scaled in fp32:
//   int8: y[n] = S[n] * sum_b d_b * sum_i w[n, i] q_i
//   int4: y[n] = sum_g S[n, g] * d_g * sum_i nibble_i q_i - 8 sum_g S[n, g] * d_g * sum_i q_i
// so results differ from the fp32-activation paths by x's rounding to 8 bits in each block (a relative error of at
// most 1/254 of the block's largest value per element; the weights' own rounding is 1/254 (int8) or 1/16 (int4)).
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
    for (int64_t m = 0; m < M; m++) {
        const float* x = X + m * K;
        for (int64_t n = n0; n < n1; n++) {
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
                   a3 = _mm256_setzero_ps();
            int64_t k = 0;
            for (; k + 32 <= K8; k += 32) {
                __m256 w0, w1, w2, w3;
                if (m == 0)
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
    float out[4];
    for (int64_t n = n0; n < n1; n++) {
        for (int64_t m = 0; m < M;) {
            const int g = M - m >= 4 ? 4 : M - m >= 2 ? 2 : 1;
            if (g == 4) row_bf16_eo<4>(W + n * K, Xp + m * K, K, m == 0, end, out);
            else if (g == 2) row_bf16_eo<2>(W + n * K, Xp + m * K, K, m == 0, end, out);
            else row_bf16_eo<1>(W + n * K, Xp + m * K, K, m == 0, end, out);
            for (int j = 0; j < g; j++) store_out(Y, ydt, (m + j) * N + n, out[j] + (bias ? bias[n] : 0.f));
            m += g;
        }
    }
}

// ---------------------------------------------------------------- int8-quantized activations
// x (M, K) fp32 -> q (M, K) int8 and d (M, K/32): per block of 32, d = amax / 127 and q = round(x * (1 / d)) to
// nearest even (d = 0 and q = 0 for an all-zero block); qsum (M, K/32) = the sum of each block's q (as fp32).
T_AVX2 void quantize_x_q8(const float* X, int64_t M, int64_t K, int8_t* q, float* d, float* qsum) {
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
        _mm256_storeu_si256((__m256i*)(q + b * 32),
                            _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    }
}

// 8 int32 lanes summing the 32 products of int8 weights w with int8 activations q (|w| <= 127: a VPSIGNB pair
// makes the unsigned x signed operands VPMADDUBSW needs; 2 * 127 * 127 fits its int16 pairs).
T_AVX2 static inline __m256i dot32_i8(__m256i w, __m256i q) {
    const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(q, w));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

// int8 weights x int8-quantized activations, MR activation rows per pass over a weight row. Two accumulators per
// activation row, alternating by block, so consecutive blocks do not wait on each other's FMA.
template <int MR>
T_AVX2 static void row_q8(const int8_t* w, const int8_t* Q, const float* D, int64_t K, bool pf, const char* end,
                          float* out) {
    __m256 acc[MR][2];
    for (int j = 0; j < MR; j++) acc[j][0] = acc[j][1] = _mm256_setzero_ps();
    const int64_t nb = K / 32;
    for (int64_t b = 0; b < nb; b++) {
        if (pf) prefetch_line((const char*)(w + b * 32) + PF_BYTES, end);
        const __m256i wv = _mm256_loadu_si256((const __m256i*)(w + b * 32));
        for (int j = 0; j < MR; j++) {
            const __m256i s = dot32_i8(wv, _mm256_loadu_si256((const __m256i*)(Q + j * K + b * 32)));
            acc[j][b & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_broadcast_ss(D + j * nb + b), acc[j][b & 1]);
        }
    }
    for (int j = 0; j < MR; j++) out[j] = hsum256(_mm256_add_ps(acc[j][0], acc[j][1]));
}

// Group g of an int4 row: its 16 bytes as 32 nibbles 0..15 in one register (the low nibbles, elements 0..15, in the
// low half; the high ones in the upper half): VPMADDUBSW's unsigned operand as they are.
T_AVX2 static inline __m256i i4_nibbles(const uint8_t* w, int64_t g) {
    const __m128i b = _mm_loadu_si128((const __m128i*)(w + g * 16));
    return _mm256_and_si256(_mm256_inserti128_si256(_mm256_castsi128_si256(b), _mm_srli_epi16(b, 4), 1),
                            _mm256_set1_epi8(15));
}

// int4 weights (gemv.h's layout) x int8-quantized activations. Per group: sum nibble * q in integers, times
// S[n, g] * d_g; the -8 offset is taken off once per row as 8 * sum_g S[n, g] * d_g * qsum_g. Eight groups' scale
// products are formed at a time; two accumulators per activation row alternate by group.
template <int MR>
T_AVX2 static void row_q4(const uint8_t* w, const uint16_t* s, const int8_t* Q, const float* D, const float* QS,
                          int64_t K, bool pf, const char* end, float* out) {
    __m256 acc[MR][2], corr[MR];
    for (int j = 0; j < MR; j++) acc[j][0] = acc[j][1] = corr[j] = _mm256_setzero_ps();
    const int64_t G = K / I4_GROUP;
    const __m256i ones = _mm256_set1_epi16(1);
    alignas(32) float sd[MR][8];
    int64_t g = 0;
    for (; g + 8 <= G; g += 8) {
        const __m256 sc = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(s + g)));
        for (int j = 0; j < MR; j++) {
            const __m256 p = _mm256_mul_ps(sc, _mm256_loadu_ps(D + j * G + g));
            corr[j] = _mm256_fmadd_ps(p, _mm256_loadu_ps(QS + j * G + g), corr[j]);
            _mm256_store_ps(sd[j], p);
        }
        if (pf) {
            prefetch_line((const char*)(w + g * 16) + PF_BYTES, end);
            prefetch_line((const char*)(w + g * 16) + PF_BYTES + 64, end);
        }
        for (int u = 0; u < 8; u++) {
            const __m256i nib = i4_nibbles(w, g + u);
            for (int j = 0; j < MR; j++) {
                const __m256i p = _mm256_madd_epi16(
                    _mm256_maddubs_epi16(nib, _mm256_loadu_si256((const __m256i*)(Q + j * K + (g + u) * 32))), ones);
                acc[j][u & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcast_ss(&sd[j][u]), acc[j][u & 1]);
            }
        }
    }
    float tail[MR] = {};
    for (; g < G; g++) {
        const __m256i nib = i4_nibbles(w, g);
        const float sg = _cvtsh_ss(s[g]);
        for (int j = 0; j < MR; j++) {
            const __m256i p = _mm256_madd_epi16(
                _mm256_maddubs_epi16(nib, _mm256_loadu_si256((const __m256i*)(Q + j * K + g * 32))), ones);
            const float sdg = sg * D[j * G + g];
            acc[j][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(sdg), acc[j][0]);
            tail[j] += sdg * QS[j * G + g];
        }
    }
    for (int j = 0; j < MR; j++)
        out[j] = hsum256(_mm256_add_ps(acc[j][0], acc[j][1])) - 8.0f * (hsum256(corr[j]) + tail[j]);
}

// Rows n0..n1-1 of an int8 (kind 2) or int4 (kind 3) product with x quantized (Xq, Xd, Xs: quantize_x_q8's outputs
// for all M rows), in groups of 4 / 2 / 1 activation rows per pass over a weight row.
T_AVX2 void rows_q_avx2(int kind, const void* W, const float* S, const int8_t* Xq, const float* Xd,
                        const float* Xs, void* Y, const float* bias, int64_t M, int64_t n0, int64_t n1, int64_t N,
                        int64_t K, int ydt) {
    const int64_t nb = K / 32, row_bytes = kind == 2 ? K : K / 2;
    const char* end = (const char*)W + n1 * row_bytes;
    float out[4];
    for (int64_t n = n0; n < n1; n++) {
        const void* w = (const char*)W + n * row_bytes;
        for (int64_t m = 0; m < M;) {
            const int g = M - m >= 4 ? 4 : M - m >= 2 ? 2 : 1;
            const int8_t* q = Xq + m * K;
            const float* d = Xd + m * nb;
            if (kind == 2) {
                const int8_t* wr = (const int8_t*)w;
                if (g == 4) row_q8<4>(wr, q, d, K, m == 0, end, out);
                else if (g == 2) row_q8<2>(wr, q, d, K, m == 0, end, out);
                else row_q8<1>(wr, q, d, K, m == 0, end, out);
            } else {
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
