// Decode attention for lfm2vl: one query per row over a (strided) K/V cache, fp32 math, on the GEMV pool's threads.
//
// Why native: torch's flash-attention kernel for a single query spends far longer than its math (an OpenMP region
// that stalls beside the pool's threads). AVX512 scores / exp / value sums when the head size is a multiple of 16,
// plain loops otherwise.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gemv.h"
#include "pool.h"

// ---- decode attention: one query per row over a (strided) K/V cache, fp32 math ---------------------------------
// Chunk = one (row, kv head): its G = H / Hkv query heads share every key/value row read.
struct AttnArgs {
    const float* Q;     // (B, H, Dh) fp32, pre-scaled
    const void* K;      // element (b, h, s, d) at b*sb + h*sh + s*ss + d; kvdt 0 fp32, 1 bf16
    const void* V;
    const uint8_t* mask;  // (B, n) 0/1 or NULL
    const int64_t* rows;  // (B,) cache row of each query row, or NULL (row b)
    float* O;           // (B, H, Dh) fp32
    int64_t Hkv, G, n, Dh, sb, sh, ss;
    int kvdt;
    const int64_t* lens;  // (B,) keys 0..lens[b]-1 of row b (instead of n and the mask), or NULL
};

static inline void kv_row(float* dst, const void* p, int dt, int64_t off, int64_t Dh) {
    if (dt == 1) {
        const uint16_t* src = (const uint16_t*)p + off;
        for (int64_t d = 0; d < Dh; d++) dst[d] = bf16_to_f32(src[d]);
    } else {
        memcpy(dst, (const float*)p + off, sizeof(float) * Dh);
    }
}

// dot product with 8 independent partial sums (vectorizes without -ffast-math)
static inline float dot8(const float* a, const float* b, int64_t n) {
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    int64_t d = 0;
    for (; d + 8 <= n; d += 8)
        for (int l = 0; l < 8; l++) acc[l] += a[d + l] * b[d + l];
    float t = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; d < n; d++) t += a[d] * b[d];
    return t;
}

// One key or value row as Dh/16 fp32 vectors (bf16 widened exactly).
T_AVX512 static inline void kv_vecs(__m512* r, const void* p, int dt, int64_t off, int64_t nv) {
    for (int64_t j = 0; j < nv; j++)
        r[j] = dt == 1 ? from_bf16x16((const uint16_t*)p + off + 16 * j) : _mm512_loadu_ps((const float*)p + off + 16 * j);
}

// r[i] = the sum of v[i]'s 16 lanes, for 16 vectors at once (a transposing tree of 45 operations where 16
// horizontal sums take ~8 each): pairs of vectors interleave and add within 128-bit lanes, then the lanes' sums add.
T_AVX512 static inline __m512 sum16x16(const __m512* v) {
    __m512 s2[8], s4[4];
    for (int i = 0; i < 8; i++)
        s2[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {  // 128-bit lane k of s4[i]: the sums of v[4i..4i+3] over their lane k
        const __m512d a = _mm512_castps_pd(s2[2 * i]), b = _mm512_castps_pd(s2[2 * i + 1]);
        s4[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    __m512 u[2];
    for (int i = 0; i < 2; i++)
        u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s4[2 * i], s4[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(s4[2 * i], s4[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// scores sc[g * n + s] = q_g . k_s (AVX512, Dh = 16 nv up to 256; NV = nv, or 0 where nv is known at run time only).
// Blocks of 16 keys are widened to fp32 once into kf and serve every query head of the group; the 16 dot products of
// a head end in one sum16x16.
template <int NV>
T_AVX512 static void scores_blocks(const AttnArgs& a, const float* q, int64_t base, int64_t n, const uint8_t* m,
                                   float* sc) {
    const int64_t nv = NV ? NV : a.Dh / 16, G = a.G;
    __m512 kr[16];
    alignas(64) float kf[16 * 256];
    int64_t s = 0;
    for (; s + 16 <= n; s += 16) {
        for (int i = 0; i < 16; i++) {
            kv_vecs(kr, a.K, a.kvdt, base + (s + i) * a.ss, nv);
            for (int64_t j = 0; j < nv; j++) _mm512_store_ps(kf + (i * nv + j) * 16, kr[j]);
        }
        __mmask16 keep = 0xffff;
        if (m)
            for (int i = 0; i < 16; i++) keep = m[s + i] ? keep : (__mmask16)(keep & ~(1u << i));
        for (int64_t g = 0; g < G; g++) {
            for (int64_t j = 0; j < nv; j++) kr[j] = _mm512_loadu_ps(q + g * a.Dh + 16 * j);
            __m512 acc[16];
#pragma GCC unroll 16
            for (int i = 0; i < 16; i++) {
                acc[i] = _mm512_mul_ps(kr[0], _mm512_load_ps(kf + i * nv * 16));
                for (int64_t j = 1; j < nv; j++)
                    acc[i] = _mm512_fmadd_ps(kr[j], _mm512_load_ps(kf + (i * nv + j) * 16), acc[i]);
            }
            _mm512_storeu_ps(sc + g * n + s, _mm512_mask_blend_ps(keep, _mm512_set1_ps(-INFINITY), sum16x16(acc)));
        }
    }
    for (; s < n; s++) {
        kv_vecs(kr, a.K, a.kvdt, base + s * a.ss, nv);
        for (int64_t g = 0; g < G; g++) {
            __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q + g * a.Dh), kr[0]);
            for (int64_t j = 1; j < nv; j++) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * a.Dh + 16 * j), kr[j], acc);
            sc[g * n + s] = (m && !m[s]) ? -INFINITY : _mm512_reduce_add_ps(acc);
        }
    }
}

T_AVX512 static void attn_scores_avx512(const AttnArgs& a, const float* q, int64_t base, int64_t n, const uint8_t* m,
                                        float* sc) {
    if (a.Dh == 64) return scores_blocks<4>(a, q, base, n, m, sc);
    if (a.Dh == 128) return scores_blocks<8>(a, q, base, n, m, sc);
    scores_blocks<0>(a, q, base, n, m, sc);
}

// p[s] = exp(p[s] - mx) over n scores; returns their sum
T_AVX512 static float softmax_exp_avx512(float* p, int64_t n, float mx) {
    const __m512 m = _mm512_set1_ps(mx);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t s = 0; s < n; s += 16) {
        const __mmask16 mk = tail16(n - s);
        __m512 e = exp_nonpos(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, p + s), m));
        e = _mm512_maskz_mov_ps(mk, e);
        _mm512_mask_storeu_ps(p + s, mk, e);
        sum = _mm512_add_ps(sum, e);
    }
    return _mm512_reduce_add_ps(sum);
}

// o_g = sum_s p[g * n + s] * v_s for NG query heads from g0 with Dh = 16 NV: the sums stay in registers over all
// keys (one FMA per value vector and head, the same order as the loop below).
template <int NV, int NG>
T_AVX512 static void values_in_registers(const AttnArgs& a, const float* p, int64_t base, int64_t n, int64_t g0,
                                         float* o) {
    __m512 acc[NG][NV], vr[16];
    for (int g = 0; g < NG; g++)
        for (int j = 0; j < NV; j++) acc[g][j] = _mm512_setzero_ps();
    for (int64_t s = 0; s < n; s++) {
        kv_vecs(vr, a.V, a.kvdt, base + s * a.ss, NV);
        for (int g = 0; g < NG; g++) {
            const __m512 w = _mm512_set1_ps(p[(g0 + g) * n + s]);
            for (int j = 0; j < NV; j++) acc[g][j] = _mm512_fmadd_ps(w, vr[j], acc[g][j]);
        }
    }
    for (int g = 0; g < NG; g++)
        for (int j = 0; j < NV; j++) _mm512_storeu_ps(o + (g0 + g) * a.Dh + 16 * j, acc[g][j]);
}

// All G heads in passes of up to P = 16 / NV heads (16 registers of sums), each value row widened once per pass.
// (The `P < k ? P : k` only keeps passes wider than P from being compiled; r never exceeds P.)
template <int NV>
T_AVX512 static void values_passes(const AttnArgs& a, const float* p, int64_t base, int64_t n, float* o) {
    constexpr int P = 16 / NV;
    for (int64_t g = 0; g < a.G;) {
        const int64_t r = a.G - g < P ? a.G - g : P;
        if (r == 4) values_in_registers<NV, P < 4 ? P : 4>(a, p, base, n, g, o);
        else if (r == 3) values_in_registers<NV, P < 3 ? P : 3>(a, p, base, n, g, o);
        else if (r == 2) values_in_registers<NV, P < 2 ? P : 2>(a, p, base, n, g, o);
        else values_in_registers<NV, 1>(a, p, base, n, g, o);
        g += r;
    }
}

// o_g += sum_s p[g * n + s] * v_s (o zeroed by the caller)
T_AVX512 static void attn_values_avx512(const AttnArgs& a, const float* p, int64_t base, int64_t n, float* o) {
    const int64_t nv = a.Dh / 16, G = a.G;
    if (nv == 4) return values_passes<4>(a, p, base, n, o);
    if (nv == 8) return values_passes<8>(a, p, base, n, o);
    __m512 vr[16];
    for (int64_t s = 0; s < n; s++) {
        kv_vecs(vr, a.V, a.kvdt, base + s * a.ss, nv);
        for (int64_t g = 0; g < G; g++) {
            const __m512 w = _mm512_set1_ps(p[g * n + s]);
            for (int64_t j = 0; j < nv; j++) {
                float* dst = o + g * a.Dh + 16 * j;
                _mm512_storeu_ps(dst, _mm512_fmadd_ps(w, vr[j], _mm512_loadu_ps(dst)));
            }
        }
    }
}

static void attn_chunk(const void* ctx, int64_t chunk) {
    const AttnArgs& a = *(const AttnArgs*)ctx;
    const int64_t b = chunk / a.Hkv, h = chunk % a.Hkv, G = a.G, Dh = a.Dh;
    const int64_t n = a.lens ? a.lens[b] : a.n;
    const float* q = a.Q + (b * a.Hkv + h) * G * Dh;  // G consecutive query heads
    float* o = a.O + (b * a.Hkv + h) * G * Dh;
    const int64_t base = (a.rows ? a.rows[b] : b) * a.sb + h * a.sh;
    const uint8_t* m = a.mask ? a.mask + b * a.n : NULL;
    const bool vec = lfm2vl_isa() >= 2 && Dh % 16 == 0 && Dh <= 256;
    float* sc = (float*)malloc(sizeof(float) * (G * n + Dh));
    float* row = sc + G * n;
    if (vec) {
        attn_scores_avx512(a, q, base, n, m, sc);
    } else {
        for (int64_t s = 0; s < n; s++) {
            kv_row(row, a.K, a.kvdt, base + s * a.ss, Dh);
            for (int64_t g = 0; g < G; g++) sc[g * n + s] = (m && !m[s]) ? -INFINITY : dot8(q + g * Dh, row, Dh);
        }
    }
    for (int64_t g = 0; g < G; g++) {
        float* p = sc + g * n;
        float mx = -INFINITY;
        for (int64_t s = 0; s < n; s++) mx = p[s] > mx ? p[s] : mx;
        float sum = 0.f;
        if (vec && mx != -INFINITY) {
            sum = softmax_exp_avx512(p, n, mx);
        } else {
            for (int64_t s = 0; s < n; s++) { p[s] = mx == -INFINITY ? 0.f : expf(p[s] - mx); sum += p[s]; }
        }
        float inv = sum > 0.f ? 1.f / sum : 0.f;
        for (int64_t s = 0; s < n; s++) p[s] *= inv;
        for (int64_t d = 0; d < Dh; d++) o[g * Dh + d] = 0.f;
    }
    if (vec) {
        attn_values_avx512(a, sc, base, n, o);
    } else {
        for (int64_t s = 0; s < n; s++) {
            kv_row(row, a.V, a.kvdt, base + s * a.ss, Dh);
            for (int64_t g = 0; g < G; g++) {
                const float w = sc[g * n + s];
                for (int64_t d = 0; d < Dh; d++) o[g * Dh + d] += w * row[d];
            }
        }
    }
    free(sc);
}

void attn_decode_run(const float* Q, const void* K, const void* V, const uint8_t* mask, const int64_t* rows,
                     const int64_t* lens, float* O, int64_t B, int64_t H, int64_t Hkv, int64_t n, int64_t Dh,
                     int64_t sb, int64_t sh, int64_t ss, int kvdt, int threads) {
    AttnArgs a{Q, K, V, mask, rows, O, Hkv, H / Hkv, n, Dh, sb, sh, ss, kvdt, lens};
    pool_run(attn_chunk, &a, B * Hkv, B * Hkv * n * Dh < 16 * 1024 ? 1 : threads);
}

extern "C" {

// Q (B, H, Dh) fp32 pre-scaled; K/V strided (see AttnArgs); mask (B, n) uint8 or NULL; rows (B,) or NULL;
// O (B, H, Dh) fp32.
void lfm2vl_attn_decode(const float* Q, const void* K, const void* V, const uint8_t* mask, const int64_t* rows,
                        float* O, int64_t B,
                        int64_t H, int64_t Hkv, int64_t n, int64_t Dh, int64_t sb, int64_t sh, int64_t ss, int kvdt,
                        int threads) {
    attn_decode_run(Q, K, V, mask, rows, NULL, O, B, H, Hkv, n, Dh, sb, sh, ss, kvdt, threads);
}

}  // extern "C"
