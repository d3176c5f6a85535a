// Dequantization of int8 and int4 weights for prefill-size products (quant.py's Int8Linear / Int4Linear): the weight
// is expanded once into a reused buffer, then multiplied by torch's GEMM. Each value is the fp32 product of the level
// and its scale, rounded once to the output dtype, exactly as quant.py's torch formula. Rows run on pool.cpp's threads.
#include <immintrin.h>
#include "pool.h"
#include "gemv.h"
#include <stdint.h>

// One expansion job: q is int8 (N, K) with row scales s (N,), or packed int4 (N, K/2) with group scales s (N, K/32).
struct DequantArgs {
    int bits;
    const void* q;
    const float* s;
    void* out;
    int64_t N, K, rows_per_chunk;
    int odt;
};

// 16 values (those under mask mk) at out[idx], as fp32 (odt 0) or the top 16 bits of the bf16-rounded value (odt 1).
T_AVX512 static inline void store16(void* out, int odt, int64_t idx, __m512 v, __mmask16 mk) {
    if (odt == 1) _mm256_mask_storeu_epi16((uint16_t*)out + idx, mk, _mm512_cvtepi32_epi16(
        _mm512_srli_epi32(_mm512_castps_si512(round_bf16(v)), 16)));
    else _mm512_mask_storeu_ps((float*)out + idx, mk, v);
}

// int8: out[n, k] = q[n, k] * s[n] in fp32, rounded once to out's dtype
T_AVX512 static void int8_rows_avx512(const DequantArgs& a, int64_t n0, int64_t n1) {
    const int8_t* q = (const int8_t*)a.q;
    for (int64_t n = n0; n < n1; n++) {
        const __m512 sc = _mm512_set1_ps(a.s[n]);
        for (int64_t k = 0; k < a.K; k += 16) {
            __mmask16 mk = a.K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (a.K - k)) - 1u);
            __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, q + n * a.K + k)));
            store16(a.out, a.odt, n * a.K + k, _mm512_mul_ps(w, sc), mk);
        }
    }
}

// int4: out[n, 32g+i] = (nibble - 8) * s[n, g] in fp32, rounded once to out's dtype
T_AVX512 static void int4_rows_avx512(const DequantArgs& a, int64_t n0, int64_t n1) {
    const uint8_t* q = (const uint8_t*)a.q;
    const int64_t G = a.K / I4_GROUP;
    for (int64_t n = n0; n < n1; n++)
        for (int64_t g = 0; g < G; g++) {
            __m512 lo, hi;
            i4_group(q + n * (a.K / 2) + g * 16, lo, hi);
            const __m512 sc = _mm512_set1_ps(a.s[n * G + g]);
            store16(a.out, a.odt, n * a.K + g * I4_GROUP, _mm512_mul_ps(lo, sc), 0xffff);
            store16(a.out, a.odt, n * a.K + g * I4_GROUP + 16, _mm512_mul_ps(hi, sc), 0xffff);
        }
}

static float level(const DequantArgs& a, int64_t n, int64_t k) {
    if (a.bits == 8) return (float)((const int8_t*)a.q)[n * a.K + k] * a.s[n];
    return i4_at((const uint8_t*)a.q + n * (a.K / 2), k) * a.s[n * (a.K / I4_GROUP) + k / I4_GROUP];
}

static void dequant_chunk(const void* ctx, int64_t chunk) {
    const DequantArgs& a = *(const DequantArgs*)ctx;
    const int64_t n0 = chunk * a.rows_per_chunk, n1 = n0 + a.rows_per_chunk < a.N ? n0 + a.rows_per_chunk : a.N;
    if (active_isa() >= 2) {
        if (a.bits == 8) int8_rows_avx512(a, n0, n1);
        else int4_rows_avx512(a, n0, n1);
        return;
    }
    for (int64_t n = n0; n < n1; n++)
        for (int64_t k = 0; k < a.K; k++) store_out(a.out, a.odt, n * a.K + k, level(a, n, k));
}

static void dequant(int bits, const void* q, const float* s, void* out, int64_t N, int64_t K, int odt, int threads) {
    int64_t rows = (int64_t)256 * 1024 / (K > 0 ? K : 1);
    DequantArgs a{bits, q, s, out, N, K, rows < 1 ? 1 : rows, odt};
    pool_run(dequant_chunk, &a, (N + a.rows_per_chunk - 1) / a.rows_per_chunk, threads);
}

extern "C" {

// q (N, K) int8, s (N,) fp32 -> out (N, K) fp32 (odt 0) or bf16 (odt 1)
void lfm2vl_dequant_int8(const int8_t* q, const float* s, void* out, int64_t N, int64_t K, int odt, int threads) {
    dequant(8, q, s, out, N, K, odt, threads);
}

// q (N, K/2) packed int4, s (N, K/32) fp32 -> out (N, K) fp32 (odt 0) or bf16 (odt 1)
void lfm2vl_dequant_int4(const uint8_t* q, const float* s, void* out, int64_t N, int64_t K, int odt, int threads) {
    dequant(4, q, s, out, N, K, odt, threads);
}

}  // extern "C"
