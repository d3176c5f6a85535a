// The weight-only int8 and int4 formats of quant.py (Int8Linear / Int4Linear; int4 layout in gemv.h):
// - quantization at load, one row block at a time (the Python side drops the float pages block by block), with
//   exactly the torch formula's arithmetic: fp32 division by the scale, round half to even, clamp;
// - dequantization for prefill-size products: the weight is expanded once into a reused buffer, then multiplied by
//   torch's GEMM. Each value is the fp32 product of the level and its scale, rounded once to the output dtype.
// Rows run on pool.cpp's threads.
#include <immintrin.h>
#include "pool.h"
#include "gemv.h"
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

// One expansion job: q is int8 (N, K) with row scales s (N,), or packed int4 (N, K/2) with fp16 group scales s
// (N, K/32).
struct DequantArgs {
    int bits;
    const void* q;
    const float* s;
    void* out;
    int64_t N, K, rows_per_chunk;
    int odt;
};

// int8: out[n, k] = q[n, k] * s[n] in fp32, rounded once to out's dtype
T_AVX512 static void int8_rows_avx512(const DequantArgs& a, int64_t n0, int64_t n1) {
    const int8_t* q = (const int8_t*)a.q;
    for (int64_t n = n0; n < n1; n++) {
        const __m512 sc = _mm512_set1_ps(a.s[n]);
        for (int64_t k = 0; k < a.K; k += 16) {
            const __mmask16 mk = tail16(a.K - k);
            __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, q + n * a.K + k)));
            store16(a.out, a.odt, n * a.K + k, _mm512_mul_ps(w, sc), mk);
        }
    }
}

// int4: out[n, 32g+i] = (nibble - 8) * s[n, g] in fp32, rounded once to out's dtype
T_AVX512 static void int4_rows_avx512(const DequantArgs& a, int64_t n0, int64_t n1) {
    const uint8_t* q = (const uint8_t*)a.q;
    const int64_t G = a.K / I4_GROUP;
    float sf[16];
    for (int64_t n = n0; n < n1; n++) {
        const float* s = (const float*)((const uint16_t*)a.s + n * G);  // the row's fp16 scales
        for (int64_t g = 0; g < G; g++) {
            if ((g & 15) == 0) i4_scales16(s, g, G, sf);
            __m512 lo, hi;
            i4_group(q + n * (a.K / 2) + g * 16, lo, hi);
            const __m512 sc = _mm512_set1_ps(sf[g & 15]);
            store16(a.out, a.odt, n * a.K + g * I4_GROUP, _mm512_mul_ps(lo, sc), 0xffff);
            store16(a.out, a.odt, n * a.K + g * I4_GROUP + 16, _mm512_mul_ps(hi, sc), 0xffff);
        }
    }
}

// The same rows with AVX2, 8 values at a time (the output rows of a prefill on CPUs without AVX512). fp32 out is the
// common case there (cpu/gemm.py multiplies in fp32); bf16 out is rounded to nearest even as f32_to_bf16.
T_AVX2 static inline void store8(void* out, int odt, int64_t idx, __m256 v) {
    if (odt == 1) {
        __m256i u = _mm256_castps_si256(v);
        const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
        const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
        _mm_storeu_si128((__m128i*)((uint16_t*)out + idx), h);
    } else {
        _mm256_storeu_ps((float*)out + idx, v);
    }
}

T_AVX2 static void int8_rows_avx2(const DequantArgs& a, int64_t n0, int64_t n1) {
    const int8_t* q = (const int8_t*)a.q;
    const int64_t K8 = a.K & ~(int64_t)7;
    for (int64_t n = n0; n < n1; n++) {
        const __m256 sc = _mm256_set1_ps(a.s[n]);
        int64_t k = 0;
        for (; k < K8; k += 8) {
            const __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(q + n * a.K + k))));
            store8(a.out, a.odt, n * a.K + k, _mm256_mul_ps(w, sc));
        }
        for (; k < a.K; k++) store_out(a.out, a.odt, n * a.K + k, (float)q[n * a.K + k] * a.s[n]);
    }
}

T_AVX2 static void int4_rows_avx2(const DequantArgs& a, int64_t n0, int64_t n1) {
    const uint8_t* q = (const uint8_t*)a.q;
    const int64_t G = a.K / I4_GROUP;
    const __m256i low = _mm256_set1_epi32(15);
    const __m256 eight = _mm256_set1_ps(8.f);
    for (int64_t n = n0; n < n1; n++) {
        const uint16_t* s = (const uint16_t*)a.s + n * G;
        for (int64_t g = 0; g < G; g++) {
            const __m256 sc = _mm256_set1_ps(_cvtsh_ss(s[g]));
            const uint8_t* b = q + n * (a.K / 2) + g * 16;
            for (int h = 0; h < 2; h++) {  // bytes 0..7, then 8..15: elements h*8.. (low) and 16+h*8.. (high)
                const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(b + 8 * h)));
                const __m256 lo = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, low)), eight);
                const __m256 hi = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), eight);
                const int64_t base = n * a.K + g * I4_GROUP + 8 * h;
                store8(a.out, a.odt, base, _mm256_mul_ps(lo, sc));
                store8(a.out, a.odt, base + 16, _mm256_mul_ps(hi, sc));
            }
        }
    }
}

static float level(const DequantArgs& a, int64_t n, int64_t k) {
    if (a.bits == 8) return (float)((const int8_t*)a.q)[n * a.K + k] * a.s[n];
    return i4_at((const uint8_t*)a.q + n * (a.K / 2), k) * i4_scale(a.s, n * (a.K / I4_GROUP) + k / I4_GROUP);
}

static void dequant_chunk(const void* ctx, int64_t chunk) {
    const DequantArgs& a = *(const DequantArgs*)ctx;
    int64_t n0, n1;
    chunk_rows(chunk, a.rows_per_chunk, a.N, &n0, &n1);
    const int isa = active_isa();
    void (*rows)(const DequantArgs&, int64_t, int64_t) =
        isa >= 2 ? (a.bits == 8 ? int8_rows_avx512 : int4_rows_avx512)
        : isa == 1 ? (a.bits == 8 ? int8_rows_avx2 : int4_rows_avx2) : NULL;
    if (rows) {
        rows(a, n0, n1);
        return;
    }
    for (int64_t n = n0; n < n1; n++)
        for (int64_t k = 0; k < a.K; k++) store_out(a.out, a.odt, n * a.K + k, level(a, n, k));
}

static void dequant(int bits, const void* q, const float* s, void* out, int64_t N, int64_t K, int odt, int threads) {
    int64_t rows = (int64_t)256 * 1024 / (K > 0 ? K : 1);
    DequantArgs a{bits, q, s, out, N, K, rows < 1 ? 1 : rows, odt};
    pool_run(dequant_chunk, &a, (N + a.rows_per_chunk - 1) / a.rows_per_chunk, threads, false);
}

// ---- quantization. w row-major (N, K), fp32 (wdt 0) or bf16 (wdt 1).
struct QuantArgs {
    int bits, wdt;
    const void* w;
    void* q;
    float* s;
    int64_t N, K, rows_per_chunk;
};

static inline float weight_at(const QuantArgs& a, int64_t i) {
    return a.wdt == 1 ? bf16_to_f32(((const uint16_t*)a.w)[i]) : ((const float*)a.w)[i];
}

// int8, per row: s = amax / 127 (1 for an all-zero row), q = clamp(round(w / s), -127, 127)
static void quantize_int8_row(const QuantArgs& a, int64_t n, float* buf) {
    float amax = 0.f;
    for (int64_t k = 0; k < a.K; k++) {
        buf[k] = weight_at(a, n * a.K + k);
        amax = fmaxf(amax, fabsf(buf[k]));
    }
    const float s = amax > 0.f ? amax / 127.0f : 1.0f;
    int8_t* q = (int8_t*)a.q + n * a.K;
    for (int64_t k = 0; k < a.K; k++) q[k] = (int8_t)fminf(fmaxf(nearbyintf(buf[k] / s), -127.f), 127.f);
    a.s[n] = s;
}

// int4, per group of 32: d = (the first weight of largest magnitude) / -8 (1 for an all-zero group),
// q = clamp(round(w / d), -8, 7) + 8, packed as gemv.h describes
static void quantize_int4_row(const QuantArgs& a, int64_t n, float* buf) {
    const int64_t G = a.K / I4_GROUP;
    uint8_t* row = (uint8_t*)a.q + n * (a.K / 2);
    for (int64_t g = 0; g < G; g++) {
        float ext = 0.f, mag = -1.f;
        for (int64_t i = 0; i < I4_GROUP; i++) {
            buf[i] = weight_at(a, n * a.K + g * I4_GROUP + i);
            if (fabsf(buf[i]) > mag) { mag = fabsf(buf[i]); ext = buf[i]; }
        }
        const float d = ext != 0.f ? ext / -8.0f : 1.0f;
        uint8_t lv[I4_GROUP];
        for (int64_t i = 0; i < I4_GROUP; i++) lv[i] = (uint8_t)(fminf(fmaxf(nearbyintf(buf[i] / d), -8.f), 7.f) + 8.f);
        for (int64_t j = 0; j < I4_GROUP / 2; j++) row[g * 16 + j] = (uint8_t)(lv[j] | (lv[j + 16] << 4));
        ((uint16_t*)a.s)[n * G + g] = f2h(d);  // the levels come from the fp32 d, as llama.cpp's Q4_0
    }
}

// The same rows with AVX512: IEEE division and round-half-even (roundscale) as in the scalar code and torch.
T_AVX512 static inline __m512 load16_f32(const QuantArgs& a, int64_t i) {
    if (a.wdt == 1) return from_bf16x16((const uint16_t*)a.w + i);
    return _mm512_loadu_ps((const float*)a.w + i);
}

T_AVX512 static inline __m512i levels(__m512 w, __m512 d, float lo, float hi) {
    __m512 r = _mm512_roundscale_ps(_mm512_div_ps(w, d), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(r, _mm512_set1_ps(lo)), _mm512_set1_ps(hi)));
}

T_AVX512 static void quantize_int8_row_avx512(const QuantArgs& a, int64_t n) {
    __m512 amax = _mm512_setzero_ps();
    for (int64_t k = 0; k < a.K; k += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(load16_f32(a, n * a.K + k)));
    const float m = _mm512_reduce_max_ps(amax);
    const float s = m > 0.f ? m / 127.0f : 1.0f;
    const __m512 d = _mm512_set1_ps(s);
    int8_t* q = (int8_t*)a.q + n * a.K;
    for (int64_t k = 0; k < a.K; k += 16)
        _mm_storeu_si128((__m128i*)(q + k), _mm512_cvtepi32_epi8(levels(load16_f32(a, n * a.K + k), d, -127.f, 127.f)));
    a.s[n] = s;
}

T_AVX512 static void quantize_int4_row_avx512(const QuantArgs& a, int64_t n) {
    const int64_t G = a.K / I4_GROUP;
    uint8_t* row = (uint8_t*)a.q + n * (a.K / 2);
    for (int64_t g = 0; g < G; g++) {
        const __m512 w0 = load16_f32(a, n * a.K + g * I4_GROUP), w1 = load16_f32(a, n * a.K + g * I4_GROUP + 16);
        const __m512 m0 = _mm512_abs_ps(w0), m1 = _mm512_abs_ps(w1);
        const float mag = _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
        // the first element of that magnitude (torch's argmax), and its sign
        const uint32_t hit = (uint32_t)_mm512_cmp_ps_mask(m0, _mm512_set1_ps(mag), _CMP_EQ_OQ)
                             | ((uint32_t)_mm512_cmp_ps_mask(m1, _mm512_set1_ps(mag), _CMP_EQ_OQ) << 16);
        const int i = __builtin_ctz(hit);
        const float ext = weight_at(a, n * a.K + g * I4_GROUP + i);
        const float dv = ext != 0.f ? ext / -8.0f : 1.0f;
        const __m512 d = _mm512_set1_ps(dv);
        const __m128i lo = _mm512_cvtepi32_epi8(_mm512_add_epi32(levels(w0, d, -8.f, 7.f), _mm512_set1_epi32(8)));
        const __m128i hi = _mm512_cvtepi32_epi8(_mm512_add_epi32(levels(w1, d, -8.f, 7.f), _mm512_set1_epi32(8)));
        _mm_storeu_si128((__m128i*)(row + g * 16), _mm_or_si128(lo, _mm_slli_epi16(hi, 4)));
        ((uint16_t*)a.s)[n * G + g] = f2h(dv);
    }
}

// The same rows with AVX2 (8 values at a time), the same arithmetic.
T_AVX2 static inline __m256 load8_f32(const QuantArgs& a, int64_t i) {
    return a.wdt == 1 ? load8_bf16((const uint16_t*)a.w + i) : _mm256_loadu_ps((const float*)a.w + i);
}

T_AVX2 static inline __m256i levels8(__m256 w, __m256 d, float lo, float hi) {
    const __m256 r = _mm256_round_ps(_mm256_div_ps(w, d), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, _mm256_set1_ps(lo)), _mm256_set1_ps(hi)));
}

// 8 int32 lanes in [-128, 127] -> 8 bytes, in order, in the low half of the result
T_AVX2 static inline __m128i bytes8(__m256i v) {
    const __m128i h = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    return _mm_packs_epi16(h, h);
}

T_AVX2 static void quantize_int8_row_avx2(const QuantArgs& a, int64_t n) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 amax = _mm256_setzero_ps();
    for (int64_t k = 0; k < a.K; k += 8) amax = _mm256_max_ps(amax, _mm256_and_ps(load8_f32(a, n * a.K + k), absmask));
    const float m = hmax8(amax);
    const float s = m > 0.f ? m / 127.0f : 1.0f;
    const __m256 d = _mm256_set1_ps(s);
    int8_t* q = (int8_t*)a.q + n * a.K;
    for (int64_t k = 0; k < a.K; k += 8)
        _mm_storel_epi64((__m128i*)(q + k), bytes8(levels8(load8_f32(a, n * a.K + k), d, -127.f, 127.f)));
    a.s[n] = s;
}

T_AVX2 static void quantize_int4_row_avx2(const QuantArgs& a, int64_t n) {
    const int64_t G = a.K / I4_GROUP;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    uint8_t* row = (uint8_t*)a.q + n * (a.K / 2);
    for (int64_t g = 0; g < G; g++) {
        __m256 w[4], m[4];
        for (int j = 0; j < 4; j++) {
            w[j] = load8_f32(a, n * a.K + g * I4_GROUP + 8 * j);
            m[j] = _mm256_and_ps(w[j], absmask);
        }
        const float mag = hmax8(_mm256_max_ps(_mm256_max_ps(m[0], m[1]), _mm256_max_ps(m[2], m[3])));
        uint32_t hit = 0;  // the first element of that magnitude (torch's argmax), and its sign
        for (int j = 0; j < 4; j++)
            hit |= (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(m[j], _mm256_set1_ps(mag), _CMP_EQ_OQ)) << (8 * j);
        const float ext = weight_at(a, n * a.K + g * I4_GROUP + __builtin_ctz(hit));
        const float dv = ext != 0.f ? ext / -8.0f : 1.0f;
        const __m256 d = _mm256_set1_ps(dv);
        __m128i b[4];
        for (int j = 0; j < 4; j++) b[j] = bytes8(_mm256_add_epi32(levels8(w[j], d, -8.f, 7.f), _mm256_set1_epi32(8)));
        const __m128i lo = _mm_unpacklo_epi64(b[0], b[1]), hi = _mm_unpacklo_epi64(b[2], b[3]);
        _mm_storeu_si128((__m128i*)(row + g * 16), _mm_or_si128(lo, _mm_slli_epi16(hi, 4)));
        ((uint16_t*)a.s)[n * G + g] = f2h(dv);
    }
}

static void quantize_chunk(const void* ctx, int64_t chunk) {
    const QuantArgs& a = *(const QuantArgs*)ctx;
    int64_t n0, n1;
    chunk_rows(chunk, a.rows_per_chunk, a.N, &n0, &n1);
    const int isa = active_isa();  // vector rows need whole vectors: 16 values (AVX512) or 8 (AVX2) per step
    void (*row)(const QuantArgs&, int64_t) =
        isa >= 2 && a.K % 16 == 0 ? (a.bits == 8 ? quantize_int8_row_avx512 : quantize_int4_row_avx512)
        : isa == 1 && a.K % 8 == 0 ? (a.bits == 8 ? quantize_int8_row_avx2 : quantize_int4_row_avx2) : NULL;
    if (row) {
        for (int64_t n = n0; n < n1; n++) row(a, n);
        return;
    }
    float* buf = (float*)malloc(sizeof(float) * (size_t)a.K);
    for (int64_t n = n0; n < n1; n++) {
        if (a.bits == 8) quantize_int8_row(a, n, buf);
        else quantize_int4_row(a, n, buf);
    }
    free(buf);
}

extern "C" {

// w (N, K) fp32 (wdt 0) or bf16 (wdt 1) -> int8 q (N, K) + s (N,), or (bits 4) packed q (N, K/2) + s (N, K/32)
void lfm2vl_quantize(int bits, const void* w, int wdt, void* q, float* s, int64_t N, int64_t K, int threads) {
    int64_t rows = (int64_t)64 * 1024 / (K > 0 ? K : 1);
    QuantArgs a{bits, wdt, w, q, s, N, K, rows < 1 ? 1 : rows};
    pool_run(quantize_chunk, &a, (N + a.rows_per_chunk - 1) / a.rows_per_chunk, threads);
}

// q (N, K) int8, s (N,) fp32 -> out (N, K) fp32 (odt 0) or bf16 (odt 1)
void lfm2vl_dequant_int8(const int8_t* q, const float* s, void* out, int64_t N, int64_t K, int odt, int threads) {
    dequant(8, q, s, out, N, K, odt, threads);
}

// q (N, K/2) packed int4, s (N, K/32) fp32 -> out (N, K) fp32 (odt 0) or bf16 (odt 1)
void lfm2vl_dequant_int4(const uint8_t* q, const float* s, void* out, int64_t N, int64_t K, int odt, int threads) {
    dequant(4, q, s, out, N, K, odt, threads);
}

}  // extern "C"
