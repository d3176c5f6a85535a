// The small ops of the native decode step (decode.cpp) between its products, 16 lanes at a time on AVX512 CPUs:
// the same operations, in the same order and with the same roundings, as decode.cpp's scalar loops.
#pragma once
#include "gemv.h"

#include <math.h>
#include <string.h>

// a[i] = silu(a[i]) * b[i] with torch's roundings (silu rounded, then the product)
T_AVX512 static void silu_mul_avx512(float* a, const float* b, int64_t n, bool bf16) {
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 mk = tail16(n - i);
        __m512 s = silu16(_mm512_maskz_loadu_ps(mk, a + i));
        if (bf16) s = round_bf16(s);
        __m512 y = _mm512_mul_ps(s, _mm512_maskz_loadu_ps(mk, b + i));
        if (bf16) y = round_bf16(y);
        _mm512_mask_storeu_ps(a + i, mk, y);
    }
}

// out[i] = x[i] rounded to bf16 (nearest even), as bf16 bits
T_AVX512 static void bf16_bits_avx512(const float* x, uint16_t* out, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 mk = tail16(n - i);
        _mm256_mask_storeu_epi16(out + i, mk, to_bf16x16(_mm512_maskz_loadu_ps(mk, x + i)));
    }
}

// y[i] = round_bf16(y[i])
T_AVX512 static void round_avx512(float* y, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 mk = tail16(n - i);
        _mm512_mask_storeu_ps(y + i, mk, round_bf16(_mm512_maskz_loadu_ps(mk, y + i)));
    }
}

// h[i] = h[i] + b[i], rounded to bf16 when bf16
T_AVX512 static void add_avx512(float* h, const float* b, int64_t n, bool bf16) {
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 mk = tail16(n - i);
        __m512 y = _mm512_add_ps(_mm512_maskz_loadu_ps(mk, h + i), _mm512_maskz_loadu_ps(mk, b + i));
        _mm512_mask_storeu_ps(h + i, mk, bf16 ? round_bf16(y) : y);
    }
}

// One RMSNorm row: the sum of squares in double (each square exact, as the scalar loop), then w * (x * inv) with
// the activation dtype's roundings.
T_AVX512 static void rmsnorm_avx512(const float* x, const void* w, float* out, int64_t n, float eps, bool bf16) {
    __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
    for (int64_t i = 0; i < n; i += 16) {
        const __m512 v = _mm512_maskz_loadu_ps(tail16(n - i), x + i);
        const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
        const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
        s0 = _mm512_fmadd_pd(lo, lo, s0);
        s1 = _mm512_fmadd_pd(hi, hi, s1);
    }
    const double ss = _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
    const __m512 inv = _mm512_set1_ps(1.0f / sqrtf((float)(ss / n) + eps));
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 mk = tail16(n - i);
        __m512 t = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, x + i), inv);
        const __m512 wv = load16(w, bf16, i, mk);
        if (bf16) t = round_bf16(t);
        __m512 y = _mm512_mul_ps(wv, t);
        _mm512_mask_storeu_ps(out + i, mk, bf16 ? round_bf16(y) : y);
    }
}

// NeoX RoPE of one head t (Dh values) in place: t*cos + rotate_half(t)*sin, each op rounded when bf16.
T_AVX512 static void rope_avx512(float* t, const float* c, const float* sn, int64_t Dh, bool bf16) {
    const int64_t half = Dh / 2;
    float tmp[512];
    for (int part = 0; part < 2; part++) {  // first half: rot = -t[i + half]; second: rot = t[i - half]
        for (int64_t i = 0; i < half; i += 16) {
            const __mmask16 mk = tail16(half - i);
            const __m512 cv = _mm512_maskz_loadu_ps(mk, c + i), sv = _mm512_maskz_loadu_ps(mk, sn + i);
            const __m512 x = _mm512_maskz_loadu_ps(mk, t + part * half + i);
            __m512 rot = _mm512_maskz_loadu_ps(mk, t + (1 - part) * half + i);
            if (part == 0) rot = _mm512_sub_ps(_mm512_setzero_ps(), rot);
            __m512 a = _mm512_mul_ps(x, cv), b = _mm512_mul_ps(rot, sv);
            if (bf16) { a = round_bf16(a); b = round_bf16(b); }
            __m512 y = _mm512_add_ps(a, b);
            _mm512_mask_storeu_ps(tmp + part * half + i, mk, bf16 ? round_bf16(y) : y);
        }
    }
    memcpy(t, tmp, sizeof(float) * Dh);
}

// n values of x stored at p + off in the activation dtype
T_AVX512 static void store_avx512(void* p, int64_t off, const float* x, int64_t n, bool bf16) {
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 mk = tail16(n - i);
        store16(p, bf16, off + i, _mm512_maskz_loadu_ps(mk, x + i), mk);
    }
}

// n (<= 16 * 16) values at p + off in the activation dtype as fp32 into out
T_AVX512 static void load_act_avx512(const void* p, int64_t off, int64_t n, float* out, bool bf16) {
    for (int64_t i = 0; i < n; i += 16) {
        _mm512_storeu_ps(out + i, load16(p, bf16, off + i, tail16(n - i)));
    }
}

// One row's gated short convolution over channels d0.. of 16 at a time (Kc <= 16 taps): p = in_proj's (3D) output
// (B gate, C gate, x), state (D, Kc-1) of this row in the activation dtype (read unless fresh, then shifted by one),
// xo (D) = C * conv(B * x); the scalar loop's operations in its order. The strided state and taps are copied to the
// stack first and gathered from there.
T_AVX512 static void conv_avx512(const float* p, void* state, const void* cw, const void* cb, float* xo, int64_t D,
                                 int64_t Kc, bool fresh, bool bf16) {
    float st[16 * 15], wt[16 * 16];  // (Kc - 1) and Kc values of 16 channels
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i is = _mm512_mullo_epi32(lane, _mm512_set1_epi32((int)(Kc - 1)));
    const __m512i iw = _mm512_mullo_epi32(lane, _mm512_set1_epi32((int)Kc));
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
        const int64_t n = D - d0 < 16 ? D - d0 : 16;
        const __mmask16 mk = tail16(n);
        if (fresh) load_act_avx512(state, d0 * (Kc - 1), n * (Kc - 1), st, bf16);
        load_act_avx512(cw, d0 * Kc, n * Kc, wt, bf16);
        __m512 u = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, p + d0), _mm512_maskz_loadu_ps(mk, p + 2 * D + d0));
        if (bf16) u = round_bf16(u);  // u = B * x, the newest tap
        __m512 y = _mm512_setzero_ps();
        for (int64_t j = 0; j < Kc; j++) {
            const __m512 e = j == Kc - 1 ? u
                             : fresh ? _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mk,
                                                                _mm512_add_epi32(is, _mm512_set1_epi32((int)j)), st, 4)
                                     : _mm512_setzero_ps();
            const __m512 t = _mm512_mul_ps(e, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mk,
                                                                       _mm512_add_epi32(iw, _mm512_set1_epi32((int)j)),
                                                                       wt, 4));
            y = j == 0 ? t : _mm512_add_ps(y, t);
            if (j > 0)  // the state shifts by one: tap j moves to slot j - 1
                _mm512_mask_i32scatter_ps(st, mk, _mm512_add_epi32(is, _mm512_set1_epi32((int)(j - 1))), e, 4);
        }
        if (cb) y = _mm512_add_ps(y, load16(cb, bf16, d0, mk));
        if (bf16) y = round_bf16(y);
        __m512 o = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, p + D + d0), y);
        _mm512_mask_storeu_ps(xo + d0, mk, bf16 ? round_bf16(o) : o);
        store_avx512(state, d0 * (Kc - 1), st, n * (Kc - 1), bf16);
    }
}
