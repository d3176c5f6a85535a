// Bidirectional attention of the vision encoder (no mask, no causality), bf16 in and out, on the pool's threads.
//
// Why native: torch's CPU flash-attention kernel reaches ~170-190 GFLOP/s at the tower's shapes (1024 patches,
// head size 64 or 72), a third of what its linears reach, and was half of the vision time. Here scores and value
// sums are AVX512-BF16 dot products (_mm512_dpbf16_ps: bf16 pairs, fp32 accumulation) over re-laid-out K and V,
// with a whole-row fp32 softmax. Rounding as torch's flash kernel: fp32 scores and exponentials, the unnormalized
// probabilities rounded to bf16 for the value sums, the fp32 sum divided out at the end, one bf16 rounding of the
// output.
//
// Layout: q, k, v, out are (n*L, H*Dh) row-major bf16 (the projections' outputs: unit u, position l, head h at
// row u*L + l, columns h*Dh ...). Dh even and at most 128.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gemv.h"
#include "pool.h"

namespace {

const int QB = 8;  // query rows per block: 8 x 2 key blocks of 16 = 16 score accumulators

struct EncArgs {
    const uint16_t *q, *k, *v;
    uint16_t* out;
    int64_t n, H, L, Dh, Lp, Dp;  // Lp: L rounded up to 32 (padded keys); Dp: Dh rounded up to 16
    float scale;
    uint32_t* kp;  // per (unit, head): (Dh/2, Lp) key pairs, the pair (k[j][2p], k[j][2p+1]) at [p][j]
    uint32_t* vp;  // per (unit, head): (Lp/2, Dp) value pairs, the pair (v[2i][d], v[2i+1][d]) at [i][d]
    int64_t qblocks;
};

inline uint16_t at(const uint16_t* t, const EncArgs& a, int64_t u, int64_t l, int64_t h, int64_t d) {
    return t[(u * a.L + l) * (a.H * a.Dh) + h * a.Dh + d];
}

// pass 1, one chunk per (unit, head): K and V into pair layouts (padded keys and head columns are zero)
void relayout(const void* ctx, int64_t c) {
    const EncArgs& a = *(const EncArgs*)ctx;
    const int64_t u = c / a.H, h = c % a.H;
    uint32_t* kp = a.kp + c * (a.Dh / 2) * a.Lp;
    uint32_t* vp = a.vp + c * (a.Lp / 2) * a.Dp;
    for (int64_t p = 0; p < a.Dh / 2; p++)
        for (int64_t j = 0; j < a.Lp; j++)
            kp[p * a.Lp + j] = j < a.L ? (uint32_t)at(a.k, a, u, j, h, 2 * p) | (uint32_t)at(a.k, a, u, j, h, 2 * p + 1) << 16
                                       : 0u;
    for (int64_t i = 0; i < a.Lp / 2; i++)
        for (int64_t d = 0; d < a.Dp; d++) {
            const uint32_t lo = (2 * i < a.L && d < a.Dh) ? at(a.v, a, u, 2 * i, h, d) : 0;
            const uint32_t hi = (2 * i + 1 < a.L && d < a.Dh) ? at(a.v, a, u, 2 * i + 1, h, d) : 0;
            vp[i * a.Dp + d] = lo | hi << 16;
        }
}

// pass 2, one chunk per (unit, head, block of QB queries)
T_AVX512BF16 void attend(const void* ctx, int64_t c) {
    const EncArgs& a = *(const EncArgs*)ctx;
    const int64_t uh = c / a.qblocks, i0 = (c % a.qblocks) * QB;
    const int64_t u = uh / a.H, h = uh % a.H, rows = a.L - i0 < QB ? a.L - i0 : QB;
    const uint32_t* kp = a.kp + uh * (a.Dh / 2) * a.Lp;
    const uint32_t* vp = a.vp + uh * (a.Lp / 2) * a.Dp;
    float* s = (float*)aligned_alloc(64, sizeof(float) * QB * a.Lp);          // scores, then exponentials
    uint16_t* pr = (uint16_t*)aligned_alloc(64, sizeof(uint16_t) * QB * a.Lp);  // bf16 probabilities
    if (rows < QB) memset(pr + rows * a.Lp, 0, sizeof(uint16_t) * (QB - rows) * a.Lp);  // read, never stored
    uint32_t qw[QB][64];  // each query's pairs (Dh <= 128)
    for (int r = 0; r < QB; r++)
        for (int64_t p = 0; p < a.Dh / 2; p++)
            qw[r][p] = r < rows ? (uint32_t)at(a.q, a, u, i0 + r, h, 2 * p) | (uint32_t)at(a.q, a, u, i0 + r, h, 2 * p + 1) << 16
                                : 0u;
    // scores: 8 queries x 32 keys per step
    const __m512 sc = _mm512_set1_ps(a.scale);
    for (int64_t j = 0; j < a.Lp; j += 32) {
        __m512 acc[QB][2];
        for (int r = 0; r < QB; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
        for (int64_t p = 0; p < a.Dh / 2; p++) {
            const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kp + p * a.Lp + j);
            const __m512bh k1 = (__m512bh)_mm512_loadu_si512(kp + p * a.Lp + j + 16);
            for (int r = 0; r < QB; r++) {
                const __m512bh qb = (__m512bh)_mm512_set1_epi32((int)qw[r][p]);
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], k0, qb);
                acc[r][1] = _mm512_dpbf16_ps(acc[r][1], k1, qb);
            }
        }
        for (int r = 0; r < QB; r++) {
            _mm512_store_ps(s + r * a.Lp + j, _mm512_mul_ps(acc[r][0], sc));
            _mm512_store_ps(s + r * a.Lp + j + 16, _mm512_mul_ps(acc[r][1], sc));
        }
    }
    // softmax over the L real keys: exponentials in fp32, their fp32 sum, bf16 probabilities (padded keys: 0)
    float sum[QB];
    for (int r = 0; r < rows; r++) {
        float* sr = s + r * a.Lp;
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int64_t j = 0; j < a.Lp; j += 16) {
            mx = _mm512_mask_max_ps(mx, tail16(a.L - j), mx, _mm512_load_ps(sr + j));
        }
        const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        __m512 tot = _mm512_setzero_ps();
        for (int64_t j = 0; j < a.Lp; j += 16) {
            const __m512 e = _mm512_maskz_mov_ps(tail16(a.L - j), exp_nonpos(_mm512_sub_ps(_mm512_load_ps(sr + j), m)));
            tot = _mm512_add_ps(tot, e);
            _mm256_store_si256((__m256i*)(pr + r * a.Lp + j), to_bf16x16(e));
        }
        sum[r] = _mm512_reduce_add_ps(tot);
    }
    // value sums: 4 queries x Dp columns per step over key pairs, then / sum, one bf16 rounding, stored in place
    const int NC = (int)(a.Dp / 16);
    for (int r0 = 0; r0 < rows; r0 += 4) {
        __m512 acc[4][8];
        for (int r = 0; r < 4; r++)
            for (int cc = 0; cc < NC; cc++) acc[r][cc] = _mm512_setzero_ps();
        const uint32_t* p32 = (const uint32_t*)pr;
        for (int64_t i = 0; i < a.Lp / 2; i++) {
            __m512bh pw[4];
            for (int r = 0; r < 4; r++) pw[r] = (__m512bh)_mm512_set1_epi32((int)p32[(r0 + r < QB ? r0 + r : 0) * (a.Lp / 2) + i]);
            for (int cc = 0; cc < NC; cc++) {
                const __m512bh vv = (__m512bh)_mm512_loadu_si512(vp + i * a.Dp + cc * 16);
                for (int r = 0; r < 4; r++) acc[r][cc] = _mm512_dpbf16_ps(acc[r][cc], vv, pw[r]);
            }
        }
        for (int r = 0; r < 4 && r0 + r < rows; r++) {
            uint16_t* o = a.out + (u * a.L + i0 + r0 + r) * (a.H * a.Dh) + h * a.Dh;
            for (int cc = 0; cc < NC; cc++) {
                const __m512 y = _mm512_div_ps(acc[r][cc], _mm512_set1_ps(sum[r0 + r]));
                _mm256_mask_storeu_epi16(o + cc * 16, tail16(a.Dh - cc * 16), to_bf16x16(y));
            }
        }
    }
    free(s);
    free(pr);
}

}  // namespace

extern "C" {

// q, k, v, out: (n*L, H*Dh) bf16. Returns 0, or -1 when unsupported (Dh odd or > 128, no AVX512-BF16).
int lfm2vl_attn_encoder(const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* out, int64_t n, int64_t H,
                        int64_t L, int64_t Dh, float scale, int threads) {
    if (Dh % 2 || Dh > 128 || L < 1 || active_isa() < 3) return -1;
    EncArgs a{q, k, v, out, n, H, L, Dh, (L + 31) / 32 * 32, (Dh + 15) / 16 * 16, scale, nullptr, nullptr,
              (L + QB - 1) / QB};
    a.kp = (uint32_t*)malloc(sizeof(uint32_t) * n * H * (Dh / 2) * a.Lp);
    a.vp = (uint32_t*)malloc(sizeof(uint32_t) * n * H * (a.Lp / 2) * a.Dp);
    pool_run(relayout, &a, n * H, threads);
    pool_run(attend, &a, n * H * a.qblocks, threads);
    free(a.kp);
    free(a.vp);
    return 0;
}

}  // extern "C"
