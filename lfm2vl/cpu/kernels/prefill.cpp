// Elementwise parts of a bf16 prefill, fused, on the pool's threads: the feed-forward's SwiGLU, RMSNorm, and the
// middle of the gated short convolution (gates, causal depthwise conv, conv state); the vision tower's LayerNorm and
// GELU.
//
// Why: torch runs SwiGLU as silu then mul (two passes over (T, ff_dim)), RMSNorm as ~8 small fp32 ops, and the
// conv block's middle as ~12 ops over transposed (D, T) views, each a pass over memory.
// Same roundings as model/text.py and speed.py: silu rounded to bf16, then the product; the norm's
// x * rsqrt(mean(x^2) + eps) in fp32 rounded, then times the weight, rounded; u = B*x rounded, the conv as fp32
// products summed tap by tap (no fused multiply-add), rounded, then times C, rounded. Only the order of the norm's
// fp32 sum differs from torch.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "gemv.h"
#include "pool.h"

namespace {

const int64_t SPAN = 16384;  // elements per chunk of an elementwise pass

// An elementwise pass over n bf16 values: out from a (and b)
struct SpanArgs {
    const uint16_t *a, *b;
    uint16_t* out;
    int64_t n;
};

// Run pass fn over g's values in chunks of SPAN, on torch's team (a prefill pass). Returns 0, or -1 without AVX512.
int run_spans(pool_fn fn, const SpanArgs& g, int threads) {
    if (active_isa() < 2) return -1;
    pool_run(fn, &g, (g.n + SPAN - 1) / SPAN, threads, false);
    return 0;
}

// out = silu(a) * b
T_AVX512 void swiglu(const void* ctx, int64_t c) {
    const SpanArgs& g = *(const SpanArgs*)ctx;
    int64_t i0, i1;
    chunk_rows(c, SPAN, g.n, &i0, &i1);
    for (int64_t i = i0; i < i1; i += 16) {
        const __mmask16 mk = tail16(i1 - i);
        const __m512 s = round_bf16(silu16(from_bf16x16(g.a + i, mk)));
        _mm256_mask_storeu_epi16(g.out + i, mk, to_bf16x16(_mm512_mul_ps(s, from_bf16x16(g.b + i, mk))));
    }
}

// out = GELU (tanh approximation) of a: fp32 math (gelu_tanh16), one rounding, as torch's bf16 F.gelu rounds
T_AVX512 void gelu(const void* ctx, int64_t c) {
    const SpanArgs& g = *(const SpanArgs*)ctx;
    int64_t i0, i1;
    chunk_rows(c, SPAN, g.n, &i0, &i1);
    for (int64_t i = i0; i < i1; i += 16) {
        const __mmask16 mk = tail16(i1 - i);
        _mm256_mask_storeu_epi16(g.out + i, mk, to_bf16x16(gelu_tanh16(from_bf16x16(g.a + i, mk))));
    }
}

// RMSNorm and LayerNorm over rows of n bf16 values
struct NormArgs {
    const uint16_t *x, *w, *b;  // b: LayerNorm's bias, or NULL
    uint16_t* out;
    int64_t rows, n, per;
    float eps;
};

// 1 / sqrt(sum of ss's lanes / n + eps): the scale both norms apply
T_AVX512 inline __m512 inv_root(__m512 ss, const NormArgs& a) {
    return _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(ss) / (float)a.n + a.eps));
}

// Run a norm's pass over a.rows rows, ~16K values per chunk, on torch's team (a prefill pass).
void run_norm(pool_fn fn, NormArgs& a, int threads) {
    a.per = (16384 + a.n - 1) / a.n;
    pool_run(fn, &a, (a.rows + a.per - 1) / a.per, threads, false);
}

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
        const __m512 inv = inv_root(ss, a);
        for (int64_t i = 0; i < a.n; i += 16) {
            const __mmask16 mk = tail16(a.n - i);
            const __m512 y = round_bf16(_mm512_mul_ps(from_bf16x16(x + i, mk), inv));
            _mm256_mask_storeu_epi16(a.out + r * a.n + i, mk, to_bf16x16(_mm512_mul_ps(from_bf16x16(a.w + i, mk), y)));
        }
    }
}

// torch's bf16 layer_norm: mean and variance in fp32, (x - mean) * rstd * w + b in fp32, one rounding
T_AVX512 void layernorm(const void* ctx, int64_t c) {
    const NormArgs& a = *(const NormArgs*)ctx;
    int64_t r0, r1;
    chunk_rows(c, a.per, a.rows, &r0, &r1);
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t* x = a.x + r * a.n;
        __m512 sum = _mm512_setzero_ps();
        for (int64_t i = 0; i < a.n; i += 16) sum = _mm512_add_ps(sum, from_bf16x16(x + i, tail16(a.n - i)));
        const float mean = _mm512_reduce_add_ps(sum) / (float)a.n;
        const __m512 m = _mm512_set1_ps(mean);
        __m512 ss = _mm512_setzero_ps();
        for (int64_t i = 0; i < a.n; i += 16) {
            const __mmask16 mk = tail16(a.n - i);
            const __m512 d = _mm512_maskz_sub_ps(mk, from_bf16x16(x + i, mk), m);
            ss = _mm512_fmadd_ps(d, d, ss);
        }
        const __m512 rstd = inv_root(ss, a);
        for (int64_t i = 0; i < a.n; i += 16) {
            const __mmask16 mk = tail16(a.n - i);
            __m512 y = _mm512_mul_ps(_mm512_mul_ps(_mm512_sub_ps(from_bf16x16(x + i, mk), m), rstd),
                                     from_bf16x16(a.w + i, mk));
            if (a.b) y = _mm512_add_ps(y, from_bf16x16(a.b + i, mk));
            _mm256_mask_storeu_epi16(a.out + r * a.n + i, mk, to_bf16x16(y));
        }
    }
}

struct ConvArgs {
    const uint16_t* p;      // (B, T, 3D) in_proj output: B gate, C gate, x
    const uint16_t* state;  // (B, D, K-1) the conv inputs before this chunk (zeros for a fresh row)
    const float* w;         // (D, K) taps; the last multiplies the current token
    const float* bias;      // (D) or NULL
    uint16_t* out;          // (B, T, D) C * conv(u)
    uint16_t* tail;         // (B, D, K-1) the last K-1 conv inputs: the next state
    int64_t B, T, D, K;
};

// one chunk per (row, 16 channels): u = B*x for each token, a window of the last K inputs, taps summed in order
T_AVX512 void short_conv(const void* ctx, int64_t c) {
    const ConvArgs& a = *(const ConvArgs*)ctx;
    const int64_t blocks = (a.D + 15) / 16, b = c / blocks, d0 = (c % blocks) * 16, K = a.K;
    const __mmask16 mk = tail16(a.D - d0);
    __m512 win[8], w[8];  // win[j]: conv input K-1-j tokens back (K <= 8)
    for (int64_t j = 0; j < K; j++) {
        alignas(64) float tap[16] = {0};
        for (int64_t i = 0; i < 16 && d0 + i < a.D; i++) tap[i] = a.w[(d0 + i) * K + j];
        w[j] = _mm512_load_ps(tap);
    }
    for (int64_t j = 0; j < K - 1; j++) {  // the stored state: column j is K-1-j tokens back
        alignas(64) float st[16] = {0};
        for (int64_t i = 0; i < 16 && d0 + i < a.D; i++)
            st[i] = bf16_to_f32(a.state[(b * a.D + d0 + i) * (K - 1) + j]);
        win[j] = _mm512_load_ps(st);
    }
    const __m512 bias = a.bias ? _mm512_maskz_loadu_ps(mk, a.bias + d0) : _mm512_setzero_ps();
    for (int64_t t = 0; t < a.T; t++) {
        const uint16_t* row = a.p + (b * a.T + t) * 3 * a.D + d0;
        win[K - 1] = round_bf16(_mm512_mul_ps(from_bf16x16(row, mk), from_bf16x16(row + 2 * a.D, mk)));  // u = B*x
        __m512 y = _mm512_mul_ps(win[0], w[0]);
        for (int64_t j = 1; j < K; j++) y = _mm512_add_ps(y, _mm512_mul_ps(win[j], w[j]));
        if (a.bias) y = _mm512_add_ps(y, bias);
        const __m512 out = _mm512_mul_ps(from_bf16x16(row + a.D, mk), round_bf16(y));  // C * conv(u)
        _mm256_mask_storeu_epi16(a.out + (b * a.T + t) * a.D + d0, mk, to_bf16x16(out));
        for (int64_t j = 0; j < K - 1; j++) win[j] = win[j + 1];
    }
    for (int64_t j = 0; j < K - 1; j++) {  // win[0..K-2] now hold the last K-1 conv inputs, oldest first
        alignas(64) float v[16];
        _mm512_store_ps(v, win[j]);
        for (int64_t i = 0; i < 16 && d0 + i < a.D; i++) a.tail[(b * a.D + d0 + i) * (K - 1) + j] = f32_to_bf16(v[i]);
    }
}

}  // namespace

extern "C" {

// The gated short convolution's middle for a bf16 prefill (see ConvArgs). Returns 0, or -1 without AVX512 or with
// K > 8.
int lfm2vl_short_conv_bf16(const uint16_t* p, const uint16_t* state, const float* w, const float* bias, uint16_t* out,
                           uint16_t* tail, int64_t B, int64_t T, int64_t D, int64_t K, int threads) {
    if (active_isa() < 2 || K < 1 || K > 8) return -1;
    ConvArgs a{p, state, w, bias, out, tail, B, T, D, K};
    pool_run(short_conv, &a, B * ((D + 15) / 16), threads, false);
    return 0;
}

// out = silu(a) * b over n bf16 values. Returns 0, or -1 without AVX512.
int lfm2vl_swiglu_bf16(const uint16_t* a, const uint16_t* b, uint16_t* out, int64_t n, int threads) {
    return run_spans(swiglu, SpanArgs{a, b, out, n}, threads);
}

// x = gelu_tanh(x) over n bf16 values in place. Returns 0, or -1 without AVX512.
int lfm2vl_gelu_tanh_bf16(uint16_t* x, int64_t n, int threads) {
    return run_spans(gelu, SpanArgs{x, nullptr, x, n}, threads);
}

// out = (x - mean) * rsqrt(var + eps) * w + b per row of n bf16 values (torch's layer_norm; b may be NULL); w, b (n)
// bf16. Returns 0, or -1 without AVX512.
int lfm2vl_layernorm_bf16(const uint16_t* x, const uint16_t* w, const uint16_t* b, uint16_t* out, int64_t rows,
                          int64_t n, float eps, int threads) {
    if (active_isa() < 2) return -1;
    NormArgs a{x, w, b, out, rows, n, 0, eps};
    run_norm(layernorm, a, threads);
    return 0;
}

// out = w * bf16(x * rsqrt(mean(x^2) + eps)) for `rows` rows of n bf16 values; w (n) bf16. 0, or -1 without AVX512.
int lfm2vl_rmsnorm_bf16(const uint16_t* x, const uint16_t* w, uint16_t* out, int64_t rows, int64_t n, float eps,
                        int threads) {
    if (active_isa() < 2) return -1;
    NormArgs a{x, w, nullptr, out, rows, n, 0, eps};
    run_norm(rmsnorm, a, threads);
    return 0;
}

}  // extern "C"
