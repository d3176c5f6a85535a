// The passes around an int8 product of many rows (cpu/int8mm.py: prefill, and the vision tower with int8 vision):
// the activations quantized per row before torch._int_mm (oneDNN's int8 GEMM), the int32 result scaled after it.
//
// lfm2vl_quantize_rows: x (M, K) fp32/bf16 -> q (M, K) int8 and one fp32 scale per row, symmetric:
//   s = amax / 127 (1 for an all-zero row), q = clamp(rint(x / s), -127, 127): an IEEE division and round half to
//   even, the values of torch's `(x.float() / s).round().clamp(-127, 127)`.
// lfm2vl_int8_epilogue: y[m, n] = act(float(acc[m, n]) * xs[m] * ws[n] + bias[n]) + residual[m, n], in fp32 in that
//   order (no fused multiply-adds), rounded once to y's dtype; act is none or GELU's tanh approximation
//   (0.5 v (1 + tanh(sqrt(2/pi) (v + 0.044715 v^3)))).
// lfm2vl_int4_to_int8: int4 weights widened to int8 rows, so int4 prefills run int8 compute too.
// lfm2vl_swiglu_int8: the gate of an int8 SwiGLU MLP in one pass: both products' epilogues (bf16), silu(gate) * up
//   with prefill.cpp's swiglu roundings, and the result quantized per row for the down projection: the values of
//   int8_epilogue -> swiglu -> quantize_rows without writing and reading back three (M, N) tensors.
// All run on the pool's threads, AVX512 where the CPU has it, plain loops otherwise.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "gemv.h"
#include "int8mm.h"
#include "pool.h"

namespace {

const int64_t SPAN = 16384;  // elements per chunk of work

struct QuantArgs {
    const void* x;
    int xdt;  // 0 fp32, 1 bf16
    int8_t* q;
    float* s;
    int64_t M, K, per;
};

inline float x_at(const QuantArgs& a, int64_t i) {
    return a.xdt ? bf16_to_f32(((const uint16_t*)a.x)[i]) : ((const float*)a.x)[i];
}

T_AVX512 inline __m512 x16(const QuantArgs& a, int64_t i, __mmask16 mk) {
    return a.xdt ? from_bf16x16((const uint16_t*)a.x + i, mk) : _mm512_maskz_loadu_ps(mk, (const float*)a.x + i);
}

T_AVX512 void quantize_rows_avx512(const QuantArgs& a, int64_t r) {
    const int64_t K = a.K, base = r * K;
    __m512 m = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) m = _mm512_max_ps(m, _mm512_abs_ps(x16(a, base + k, tail16(K - k))));
    const float amax = _mm512_reduce_max_ps(m);
    const float s = amax > 0 ? amax / 127.0f : 1.0f;
    a.s[r] = s;
    // x / s correctly rounded without a division per value (one holds the divider ~16 cycles; this pass was ~9% of
    // an int8 first token with an image): q = x r with r = RN(1 / s), then q + (x - q s) r, which Markstein's
    // theorem shows is RN(x / s) (r within half an ulp of 1 / s, q within one ulp of x / s, x - q s exact by FMA)
    const __m512 sv = _mm512_set1_ps(s), rv = _mm512_set1_ps(1.0f / s);
    const __m512 lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
    for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 mk = tail16(K - k);
        const __m512 x = x16(a, base + k, mk), q = _mm512_mul_ps(x, rv);
        __m512 v = _mm512_roundscale_ps(_mm512_fmadd_ps(_mm512_fnmadd_ps(q, sv, x), rv, q),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
        _mm_mask_storeu_epi8(a.q + base + k, mk, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
    }
}

void quantize_rows_plain(const QuantArgs& a, int64_t r) {
    const int64_t K = a.K, base = r * K;
    float amax = 0;
    for (int64_t k = 0; k < K; k++) amax = fmaxf(amax, fabsf(x_at(a, base + k)));
    const float s = amax > 0 ? amax / 127.0f : 1.0f;
    a.s[r] = s;
    for (int64_t k = 0; k < K; k++) a.q[base + k] = (int8_t)fminf(fmaxf(rintf(x_at(a, base + k) / s), -127.f), 127.f);
}

void quantize_rows(const void* ctx, int64_t c) {
    const QuantArgs& a = *(const QuantArgs*)ctx;
    int64_t r0, r1;
    chunk_rows(c, a.per, a.M, &r0, &r1);
    const bool wide = active_isa() >= 2;
    for (int64_t r = r0; r < r1; r++) wide ? quantize_rows_avx512(a, r) : quantize_rows_plain(a, r);
}

struct EpiArgs {
    const int32_t* acc;
    const float *xs, *ws, *bias;  // bias (N) or NULL
    const void* res;              // (M, N) in y's dtype, or NULL
    void* y;
    int ydt, gelu;
    int64_t M, N, per;
};

float gelu_tanh(float v) { return 0.5f * v * (1.0f + tanhf(GELU_C * (v + 0.044715f * v * v * v))); }

T_AVX512 void epilogue_avx512(const EpiArgs& a, int64_t m) {
    const Epilogue e{a.xs, a.ws, a.bias, a.res, a.y, a.ydt, a.gelu, a.N};
    for (int64_t n = 0; n < a.N; n += 16) epilogue16(e, a.acc + m * a.N + n, m, n, tail16(a.N - n));
}

void epilogue_plain(const EpiArgs& a, int64_t m) {
    for (int64_t n = 0; n < a.N; n++) {
        const int64_t i = m * a.N + n;
        float v = (float)a.acc[i] * a.xs[m] * a.ws[n];
        if (a.bias) v += a.bias[n];
        if (a.gelu) v = gelu_tanh(v);
        if (a.res) v += a.ydt ? bf16_to_f32(((const uint16_t*)a.res)[i]) : ((const float*)a.res)[i];
        store_out(a.y, a.ydt, i, v);
    }
}

void epilogue(const void* ctx, int64_t c) {
    const EpiArgs& a = *(const EpiArgs*)ctx;
    int64_t r0, r1;
    chunk_rows(c, a.per, a.M, &r0, &r1);
    const bool wide = active_isa() >= 2;
    for (int64_t m = r0; m < r1; m++) wide ? epilogue_avx512(a, m) : epilogue_plain(a, m);
}

struct GateArgs {
    const int32_t *a1, *a3;  // (M, N) products of the gate (w1) and up (w3) projections
    const float *xs, *s1, *s3, *b1, *b3;  // x's row scales (M); the weights' row scales and biases (N; biases NULL)
    int8_t* q;  // (M, N) out
    float* s;   // (M) out
    int64_t M, N, per;
};

T_AVX512 void gate_rows(const void* ctx, int64_t c) {
    const GateArgs& a = *(const GateArgs*)ctx;
    int64_t r0, r1;
    chunk_rows(c, a.per, a.M, &r0, &r1);
    float* h = (float*)aligned_alloc(64, sizeof(float) * ((a.N + 15) / 16 * 16));  // one row of silu(gate) * up
    const Gate g{a.xs, a.s1, a.s3, a.b1, a.b3};
    for (int64_t m = r0; m < r1; m++) {
        for (int64_t n = 0; n < a.N; n += 16) {
            const __mmask16 mk = tail16(a.N - n);
            _mm512_mask_storeu_ps(h + n, mk, gate16(g, a.a1 + m * a.N + n, a.a3 + m * a.N + n, m, n, mk));
        }
        quantize_rows_avx512(QuantArgs{h, 0, a.q + m * a.N, a.s + m, 1, a.N, 1}, 0);
    }
    free(h);
}

int64_t rows_per_chunk(int64_t width) { return width >= SPAN ? 1 : SPAN / width; }

struct WidenArgs {
    const uint8_t* q4;  // (N, K/2) packed int4, gemv.h's layout
    const uint16_t* s;  // (N, K/32) fp16 group scales
    int8_t* q8;         // (N, K)
    float* srow;        // (N)
    int64_t N, K, per;
};

// row n's scale: the largest level an int4 group reaches (8 |s_g|) over 127, 1 for an all-zero row; f[g] = s_g / it
float widen_scales(const WidenArgs& a, int64_t n, float* f) {
    const int64_t G = a.K / I4_GROUP;
    float top = 0;
    for (int64_t g = 0; g < G; g++) top = fmaxf(top, fabsf(h2f(a.s[n * G + g])));
    const float sr = top > 0 ? top * 8.0f / 127.0f : 1.0f;
    for (int64_t g = 0; g < G; g++) f[g] = h2f(a.s[n * G + g]) / sr;
    return sr;
}

// The same, 16 groups a step (VCVTPH2PS converts fp16 exactly, max and the fp32 quotient are the scalar ones).
T_AVX512 float widen_scales_avx512(const WidenArgs& a, int64_t n, float* f) {
    const int64_t G = a.K / I4_GROUP;
    const uint16_t* s = a.s + n * G;
    __m512 top = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g += 16)
        top = _mm512_max_ps(top, _mm512_abs_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(tail16(G - g), s + g))));
    const float t = _mm512_reduce_max_ps(top);
    const float sr = t > 0 ? t * 8.0f / 127.0f : 1.0f;
    const __m512 d = _mm512_set1_ps(sr);
    for (int64_t g = 0; g < G; g += 16) {
        const __mmask16 mk = tail16(G - g);
        _mm512_mask_storeu_ps(f + g, mk, _mm512_div_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, s + g)), d));
    }
    return sr;
}

// The 16 int8 values group g's levels become: clamp(rint((i - 8) * f), -127, 127) for nibble i = 0..15.
T_AVX512 static inline __m128i widen_table(float f) {
    const __m512 levels = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    const __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(levels, _mm512_set1_ps(f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 c = _mm512_min_ps(_mm512_max_ps(r, _mm512_set1_ps(-127.f)), _mm512_set1_ps(127.f));
    return _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(c));
}

// One int4 row as int8: each group's 16 possible values go into a table once, then every nibble looks its value up
// (VPSHUFB, a 16-entry table per 128-bit lane: four groups per register). The values are the formula's for every
// weight, in a third of the instructions of computing them weight by weight.
T_AVX512 void widen_row_avx512(const WidenArgs& a, int64_t n, const float* f) {
    const int64_t G = a.K / I4_GROUP;
    const uint8_t* w = a.q4 + n * (a.K / 2);
    int8_t* o = a.q8 + n * a.K;
    const __m512i m15 = _mm512_set1_epi8(15);
    // group u's 32 outputs are its 16 low-nibble values then its 16 high-nibble ones
    const __m512i first = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11);
    const __m512i second = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
    int64_t g = 0;
    for (; g + 4 <= G; g += 4) {
        __m512i t = _mm512_castsi128_si512(widen_table(f[g]));
        t = _mm512_inserti32x4(t, widen_table(f[g + 1]), 1);
        t = _mm512_inserti32x4(t, widen_table(f[g + 2]), 2);
        t = _mm512_inserti32x4(t, widen_table(f[g + 3]), 3);
        const __m512i v = _mm512_loadu_si512(w + g * 16);
        const __m512i lo = _mm512_shuffle_epi8(t, _mm512_and_si512(v, m15));
        const __m512i hi = _mm512_shuffle_epi8(t, _mm512_and_si512(_mm512_srli_epi16(v, 4), m15));
        _mm512_storeu_si512(o + g * I4_GROUP, _mm512_permutex2var_epi64(lo, first, hi));
        _mm512_storeu_si512(o + g * I4_GROUP + 64, _mm512_permutex2var_epi64(lo, second, hi));
    }
    for (; g < G; g++) {
        const __m128i t = widen_table(f[g]), v = _mm_loadu_si128((const __m128i*)(w + g * 16)), m = _mm_set1_epi8(15);
        _mm_storeu_si128((__m128i*)(o + g * I4_GROUP), _mm_shuffle_epi8(t, _mm_and_si128(v, m)));
        _mm_storeu_si128((__m128i*)(o + g * I4_GROUP + 16),
                         _mm_shuffle_epi8(t, _mm_and_si128(_mm_srli_epi16(v, 4), m)));
    }
}

void widen_rows(const void* ctx, int64_t c) {
    const WidenArgs& a = *(const WidenArgs*)ctx;
    int64_t r0, r1;
    chunk_rows(c, a.per, a.N, &r0, &r1);
    float* f = (float*)malloc(sizeof(float) * (a.K / I4_GROUP));
    const bool wide = active_isa() >= 2;
    for (int64_t n = r0; n < r1; n++) {
        a.srow[n] = wide ? widen_scales_avx512(a, n, f) : widen_scales(a, n, f);
        if (wide) {
            widen_row_avx512(a, n, f);
            continue;
        }
        for (int64_t k = 0; k < a.K; k++)
            a.q8[n * a.K + k] = (int8_t)fminf(fmaxf(rintf(i4_at(a.q4 + n * (a.K / 2), k) * f[k / I4_GROUP]), -127.f),
                                              127.f);
    }
    free(f);
}

}  // namespace

extern "C" {

// q (M, K) int8 and s (M) fp32 <- x (M, K), xdt 0 fp32 / 1 bf16 (see the top of this file).
void lfm2vl_quantize_rows(const void* x, int xdt, int8_t* q, float* s, int64_t M, int64_t K, int threads) {
    QuantArgs a{x, xdt, q, s, M, K, rows_per_chunk(K)};
    pool_run(quantize_rows, &a, (M + a.per - 1) / a.per, threads, false);
}

// y (M, N), ydt 0 fp32 / 1 bf16 <- acc (M, N) int32 scaled by xs (M) and ws (N), plus bias (N, fp32) or NULL, GELU
// (tanh) when gelu != 0, plus residual (M, N, y's dtype) or NULL (see the top of this file).
void lfm2vl_int8_epilogue(const int32_t* acc, const float* xs, const float* ws, const float* bias, const void* res,
                          void* y, int ydt, int gelu, int64_t M, int64_t N, int threads) {
    EpiArgs a{acc, xs, ws, bias, res, y, ydt, gelu, M, N, rows_per_chunk(N)};
    pool_run(epilogue, &a, (M + a.per - 1) / a.per, threads, false);
}

// int4 weights (quant.py's format) as int8 rows for int8 compute: srow[n] = 8 max_g |s[n, g]| / 127 (1 for an
// all-zero row) and q8[n, k] = clamp(rint(q4[n, k] * (s[n, g] / srow[n])), -127, 127), the fp32 quotient first. K is
// a multiple of 32. Each int4 level moves by at most half an int8 step, 1/32 of its group's largest step.
void lfm2vl_int4_to_int8(const uint8_t* q4, const uint16_t* s, int8_t* q8, float* srow, int64_t N, int64_t K,
                         int threads) {
    WidenArgs a{q4, s, q8, srow, N, K, rows_per_chunk(K)};
    pool_run(widen_rows, &a, (N + a.per - 1) / a.per, threads, false);
}

// q (M, N) int8 and s (M) fp32 <- silu(bf16 gate) * bf16 up, quantized per row, where gate and up are the int8
// products a1, a3 (M, N) int32 scaled by xs (M) and s1 / s3 (N) plus b1 / b3 (N, fp32) or NULL (see the top of this
// file). Returns 0, or -1 without AVX512 (the caller runs the three passes).
int lfm2vl_swiglu_int8(const int32_t* a1, const int32_t* a3, const float* xs, const float* s1, const float* s3,
                       const float* b1, const float* b3, int8_t* q, float* s, int64_t M, int64_t N, int threads) {
    if (active_isa() < 2) return -1;
    GateArgs a{a1, a3, xs, s1, s3, b1, b3, q, s, M, N, rows_per_chunk(N)};
    pool_run(gate_rows, &a, (M + a.per - 1) / a.per, threads, false);
    return 0;
}

}  // extern "C"
