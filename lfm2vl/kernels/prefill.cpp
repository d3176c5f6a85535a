// Elementwise parts of a bf16 prefill, fused, on the pool's threads: the feed-forward's SwiGLU and RMSNorm.
//
// Why: at a 512-token chunk torch runs SwiGLU as silu then mul, two passes over (T, ff_dim) bf16 that took ~2.6 ms
// per layer (9% of a 450M prefill), and RMSNorm as ~8 small fp32 ops. Same roundings as model/text.py: silu
// rounded to bf16, then the product; the norm's x * rsqrt(mean(x^2) + eps) in fp32 rounded to bf16, then times the
// weight, rounded. Only the order of the mean's fp32 sum differs from torch.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "gemv.h"
#include "pool.h"

namespace {

const int64_t SPAN = 16384;  // elements per SwiGLU chunk

struct SwiGLUArgs {
    const uint16_t *a, *b;
    uint16_t* out;
    int64_t n;
};

T_AVX512 void swiglu(const void* ctx, int64_t c) {
    const SwiGLUArgs& g = *(const SwiGLUArgs*)ctx;
    int64_t i0, i1;
    chunk_rows(c, SPAN, g.n, &i0, &i1);
    for (int64_t i = i0; i < i1; i += 16) {
        const __mmask16 mk = tail16(i1 - i);
        const __m512 s = round_bf16(silu16(from_bf16x16(g.a + i, mk)));
        _mm256_mask_storeu_epi16(g.out + i, mk, to_bf16x16(_mm512_mul_ps(s, from_bf16x16(g.b + i, mk))));
    }
}

struct NormArgs {
    const uint16_t *x, *w;
    uint16_t* out;
    int64_t rows, n, per;
    float eps;
};

T_AVX512 void rmsnorm(const void* ctx, int64_t c) {
    const NormArgs& a = *(const NormArgs*)ctx;
    int64_t r0, r1;
    chunk_rows(c, a.per, a.rows, &r0, &r1);
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t* x = a.x + r * a.n;
        __m512 ss = _mm512_setzero_ps();
        for (int64_t i = 0; i < a.n; i += 16) {
            const __m512 v = from_bf16x16(x + i, tail16(a.n - i));
            ss = _mm512_fmadd_ps(v, v, ss);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(ss) / (float)a.n + a.eps));
        for (int64_t i = 0; i < a.n; i += 16) {
            const __mmask16 mk = tail16(a.n - i);
            const __m512 y = round_bf16(_mm512_mul_ps(from_bf16x16(x + i, mk), inv));
            _mm256_mask_storeu_epi16(a.out + r * a.n + i, mk, to_bf16x16(_mm512_mul_ps(from_bf16x16(a.w + i, mk), y)));
        }
    }
}

}  // namespace

extern "C" {

// out = silu(a) * b over n bf16 values. Returns 0, or -1 without AVX512.
int lfm2vl_swiglu_bf16(const uint16_t* a, const uint16_t* b, uint16_t* out, int64_t n, int threads) {
    if (active_isa() < 2) return -1;
    SwiGLUArgs g{a, b, out, n};
    pool_run(swiglu, &g, (n + SPAN - 1) / SPAN, threads);
    return 0;
}

// out = w * bf16(x * rsqrt(mean(x^2) + eps)) for `rows` rows of n bf16 values; w (n) bf16. 0, or -1 without AVX512.
int lfm2vl_rmsnorm_bf16(const uint16_t* x, const uint16_t* w, uint16_t* out, int64_t rows, int64_t n, float eps,
                        int threads) {
    if (active_isa() < 2) return -1;
    NormArgs a{x, w, out, rows, n, (16384 + n - 1) / n, eps};
    pool_run(rmsnorm, &a, (rows + a.per - 1) / a.per, threads);
    return 0;
}

}  // extern "C"
