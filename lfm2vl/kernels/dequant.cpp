// Dequantization of int8 and int4 weights for prefill-size products (quant.py's Int8Linear / Int4Linear): the weight
// is expanded once into a reused buffer, then multiplied by torch's GEMM. Each value is the fp32 product of the level
// and its scale, rounded once to the output dtype, exactly as quant.py's torch formula. Rows run on pool.cpp's threads.
#include <immintrin.h>
#include "pool.h"
#include "gemv.h"
#include <stdint.h>

// ---- int8: out[n, k] = q[n, k] * s[n] in fp32, rounded once to out's dtype
struct DequantArgs {
    const int8_t* q;
    const float* s;
    void* out;
    int64_t N, K, rows_per_chunk;
    int odt;
};

T_AVX512 static void dequant_rows_avx512(const DequantArgs& a, int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++) {
        const __m512 sc = _mm512_set1_ps(a.s[n]);
        for (int64_t k = 0; k < a.K; k += 16) {
            __mmask16 mk = a.K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (a.K - k)) - 1u);
            __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                _mm_maskz_loadu_epi8(mk, a.q + n * a.K + k))), sc);
            if (a.odt == 1) {  // the top 16 bits of the bf16-rounded value
                _mm256_mask_storeu_epi16((uint16_t*)a.out + n * a.K + k, mk, _mm512_cvtepi32_epi16(
                    _mm512_srli_epi32(_mm512_castps_si512(round_bf16(v)), 16)));
            } else {
                _mm512_mask_storeu_ps((float*)a.out + n * a.K + k, mk, v);
            }
        }
    }
}

static void dequant_chunk(const void* ctx, int64_t chunk) {
    const DequantArgs& a = *(const DequantArgs*)ctx;
    const int64_t n0 = chunk * a.rows_per_chunk, n1 = n0 + a.rows_per_chunk < a.N ? n0 + a.rows_per_chunk : a.N;
    if (active_isa() >= 2) {
        dequant_rows_avx512(a, n0, n1);
        return;
    }
    for (int64_t n = n0; n < n1; n++)
        for (int64_t k = 0; k < a.K; k++) store_out(a.out, a.odt, n * a.K + k, (float)a.q[n * a.K + k] * a.s[n]);
}

// ---- int4 dequantization: out[n, 32g+i] = (nibble - 8) * s[n, g] in fp32, rounded once to out's dtype
struct DequantI4Args {
    const uint8_t* q;
    const float* s;
    void* out;
    int64_t N, K, rows_per_chunk;
    int odt;
};

T_AVX512 static inline void store16(void* out, int odt, int64_t idx, __m512 v) {
    if (odt == 1) _mm256_storeu_si256((__m256i*)((uint16_t*)out + idx), _mm512_cvtepi32_epi16(
        _mm512_srli_epi32(_mm512_castps_si512(round_bf16(v)), 16)));
    else _mm512_storeu_ps((float*)out + idx, v);
}

T_AVX512 static void dequant_i4_rows_avx512(const DequantI4Args& a, int64_t n0, int64_t n1) {
    const int64_t G = a.K / I4_GROUP;
    for (int64_t n = n0; n < n1; n++)
        for (int64_t g = 0; g < G; g++) {
            __m512 lo, hi;
            i4_group(a.q + n * (a.K / 2) + g * 16, lo, hi);
            const __m512 sc = _mm512_set1_ps(a.s[n * G + g]);
            store16(a.out, a.odt, n * a.K + g * I4_GROUP, _mm512_mul_ps(lo, sc));
            store16(a.out, a.odt, n * a.K + g * I4_GROUP + 16, _mm512_mul_ps(hi, sc));
        }
}

static void dequant_i4_chunk(const void* ctx, int64_t chunk) {
    const DequantI4Args& a = *(const DequantI4Args*)ctx;
    const int64_t n0 = chunk * a.rows_per_chunk, n1 = n0 + a.rows_per_chunk < a.N ? n0 + a.rows_per_chunk : a.N;
    if (active_isa() >= 2) {
        dequant_i4_rows_avx512(a, n0, n1);
        return;
    }
    const int64_t G = a.K / I4_GROUP;
    for (int64_t n = n0; n < n1; n++)
        for (int64_t k = 0; k < a.K; k++)
            store_out(a.out, a.odt, n * a.K + k, i4_at(a.q + n * (a.K / 2), k) * a.s[n * G + k / I4_GROUP]);
}

extern "C" {

// q (N, K/2) packed int4, s (N, K/32) fp32 -> out (N, K) fp32 (odt 0) or bf16 (odt 1)
void lfm2vl_dequant_int4(const uint8_t* q, const float* s, void* out, int64_t N, int64_t K, int odt, int threads) {
    int64_t rows = (int64_t)256 * 1024 / (K > 0 ? K : 1);
    DequantI4Args a{q, s, out, N, K, rows < 1 ? 1 : rows, odt};
    pool_run(dequant_i4_chunk, &a, (N + a.rows_per_chunk - 1) / a.rows_per_chunk, threads);
}


// q (N, K) int8, s (N,) fp32 -> out (N, K) fp32 (odt 0) or bf16 (odt 1)
void lfm2vl_dequant_int8(const int8_t* q, const float* s, void* out, int64_t N, int64_t K, int odt, int threads) {
    int64_t rows = (int64_t)256 * 1024 / (K > 0 ? K : 1);
    DequantArgs a{q, s, out, N, K, rows < 1 ? 1 : rows, odt};
    pool_run(dequant_chunk, &a, (N + a.rows_per_chunk - 1) / a.rows_per_chunk, threads);
}

}  // extern "C"
