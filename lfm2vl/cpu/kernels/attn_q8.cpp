// attn_many's int8 scores: q k^T for the int8 vision tower on AVX512-VNNI (VPDPBUSD: 64 byte products into 16 int32
// lanes, twice the multiply-adds of AVX512-BF16's VDPBF16PS per instruction). The value sums stay bf16: probabilities
// rounded to 8 bits would drop every key under 1/510 of the row's largest weight, which many small weights add up
// to in a flat attention row.
//
// Rounding: each key (less its head column's mean over the keys) and each query to int8 with their own scale; the
// exact int32 dot product times both scales. The outputs stay within 0.03 of float32 math on unit-variance inputs
// (tests/test_kernels.py); the int8 tower's image features keep their cosine to the bf16 tower's (`lfm2vl bench
// --int8-vision` prints it). A 1024-patch layer's attention on an AMD Zen 4 VM: 9.2-9.7 ms with bf16 scores, 7.6 ms.
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "attn_q8.h"
#include "gemv.h"

namespace {

// n (<= 128) bf16 values as fp32 into v (its tail zero), their largest magnitude returned.
T_AVX512 float load_row(const uint16_t* p, int64_t n, const float* sub, float* v) {
    __m512 mx = _mm512_setzero_ps();
    for (int64_t d = 0; d < n; d += 16) {
        const __mmask16 mk = tail16(n - d);
        __m512 x = from_bf16x16(p + d, mk);
        if (sub) x = _mm512_maskz_sub_ps(mk, x, _mm512_loadu_ps(sub + d));
        _mm512_storeu_ps(v + d, x);
        mx = _mm512_max_ps(mx, _mm512_abs_ps(x));
    }
    return _mm512_reduce_max_ps(mx);
}

// v (n values, whole vectors of 16 read) times inv, rounded to nearest even and offset by `off`, as bytes into b
// (n rounded up to 4; the padding holds `off`); the sum of the rounded values (before the offset) returned.
T_AVX512 int32_t round_row(const float* v, int64_t n, float inv, int off, uint8_t* b) {
    __m512i sum = _mm512_setzero_si512();
    for (int64_t d = 0; d < n; d += 16) {
        const __mmask16 mk = tail16(n - d);
        const __m512i r = _mm512_maskz_cvtps_epi32(mk, _mm512_mul_ps(_mm512_loadu_ps(v + d), _mm512_set1_ps(inv)));
        sum = _mm512_add_epi32(sum, r);
        _mm_mask_storeu_epi8(b + d, mk, _mm512_cvtepi32_epi8(_mm512_add_epi32(r, _mm512_set1_epi32(off))));
    }
    for (int64_t d = n; d % 4; d++) b[d] = (uint8_t)off;
    return _mm512_reduce_add_epi32(sum);
}

}  // namespace

T_AVX512 void q8_keys(const uint16_t* k, int64_t rs, int64_t S, int64_t Dh, int64_t Lp, int64_t Ls, uint32_t* kq,
                      float* ksc, int32_t* kcorr) {
    const int64_t Pq = q8_words(Dh);
    alignas(64) float mean[128 + 16] = {}, v[128 + 16];
    for (int64_t j = 0; j < S; j++)
        for (int64_t d = 0; d < Dh; d += 16) {
            const __mmask16 mk = tail16(Dh - d);
            _mm512_storeu_ps(mean + d, _mm512_add_ps(_mm512_loadu_ps(mean + d), from_bf16x16(k + j * rs + d, mk)));
        }
    for (int64_t d = 0; d < Dh; d++) mean[d] /= (float)S;
    alignas(64) uint32_t tile[16][32 + 1];  // 16 keys' words (Dh <= 128: at most 32)
    for (int64_t j0 = 0; j0 < Lp; j0 += 16) {
        for (int64_t j = 0; j < 16; j++) {
            memset(tile[j], 0, sizeof(tile[j]));
            if (j0 + j >= S) {
                ksc[j0 + j] = 0.f;
                kcorr[j0 + j] = 0;
                continue;
            }
            const float amax = load_row(k + (j0 + j) * rs, Dh, mean, v);
            const float inv = amax > 0.f ? 127.f / amax : 0.f;
            kcorr[j0 + j] = 128 * round_row(v, Dh, inv, 0, (uint8_t*)tile[j]);
            ksc[j0 + j] = amax / 127.f;
        }
        for (int64_t p = 0; p < Pq; p++)
            for (int64_t j = 0; j < 16; j++) kq[p * Ls + j0 + j] = tile[j][p];
    }
}

T_AVX512VNNI void q8_scores(const uint16_t* q, int64_t rs, int rows, int64_t Dh, const uint32_t* kq, const float* ksc,
                            const int32_t* kcorr, int64_t Lb, int64_t Ls, float c, float* s) {
    const int64_t Pq = q8_words(Dh);
    alignas(64) uint32_t qw[Q8_ROWS][32 + 1];  // each query's words of 4 unsigned bytes
    alignas(64) float v[128 + 16];
    float qc[Q8_ROWS];  // each query's scale times c
    for (int r = 0; r < Q8_ROWS; r++) {
        if (r >= rows) {
            memset(qw[r], 0, sizeof(qw[r]));
            qc[r] = 0.f;
            continue;
        }
        const float amax = load_row(q + r * rs, Dh, nullptr, v);
        round_row(v, Dh, amax > 0.f ? 127.f / amax : 0.f, 128, (uint8_t*)qw[r]);
        qc[r] = amax / 127.f * c;
    }
    for (int64_t j = 0; j < Lb; j += 32) {
        __m512i acc[Q8_ROWS][2];
        for (int r = 0; r < Q8_ROWS; r++) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
        for (int64_t p = 0; p < Pq; p++) {
            const __m512i k0 = _mm512_loadu_si512(kq + p * Ls + j), k1 = _mm512_loadu_si512(kq + p * Ls + j + 16);
            for (int r = 0; r < Q8_ROWS; r++) {
                const __m512i qb = _mm512_set1_epi32((int)qw[r][p]);
                acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], qb, k0);
                acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], qb, k1);
            }
        }
        for (int h = 0; h < 2; h++) {
            const __m512i corr = _mm512_loadu_si512(kcorr + j + 16 * h);
            const __m512 ks = _mm512_loadu_ps(ksc + j + 16 * h);
            for (int r = 0; r < Q8_ROWS; r++) {
                const __m512 d = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][h], corr));
                _mm512_store_ps(s + r * Ls + j + 16 * h, _mm512_mul_ps(_mm512_mul_ps(d, ks), _mm512_set1_ps(qc[r])));
            }
        }
    }
}
