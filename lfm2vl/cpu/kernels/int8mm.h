// The fp32 formulas after an int8 product of many rows, shared by int8mm.cpp's passes over a whole int32 result and
// amx.cpp's fused ones over each block of it, so both give the same values (see the top of int8mm.cpp).
#pragma once
#include "gemv.h"

// What one product's epilogue reads and writes: y[m, n] = act(acc[m, n] * xs[m] * ws[n] + bias[n]) + res[m, n].
struct Epilogue {
    const float *xs, *ws, *bias;  // (M), (N), (N) or NULL
    const void* res;              // (M, N) in y's dtype, or NULL
    void* y;                      // (M, N)
    int ydt, gelu;                // y: 0 fp32, 1 bf16; gelu: GELU's tanh approximation
    int64_t N;
};

// The gate of an int8 SwiGLU MLP: h[m, n] = silu(bf16 gate) * bf16 up, each product scaled as above.
struct Gate {
    const float *xs, *s1, *s3, *b1, *b3;  // x's row scales (M); the gate's and up's row scales and biases (N)
};

// (acc * xs) * ws + b for 16 int32 sums at acc (lanes of mk) of columns n.., in fp32, no fused multiply-add
T_AVX512 static inline __m512 scaled16(const int32_t* acc, __m512 xs, const float* ws, const float* b, int64_t n,
                                       __mmask16 mk) {
    __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(mk, acc)), xs),
                             _mm512_maskz_loadu_ps(mk, ws + n));
    if (b) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, b + n));
    return v;
}

// The epilogue of row m, columns n.. (lanes of mk), from the 16 sums at acc: y's values before their rounding.
T_AVX512 static inline __m512 epilogue_value16(const Epilogue& e, const int32_t* acc, int64_t m, int64_t n,
                                               __mmask16 mk) {
    __m512 v = scaled16(acc, _mm512_set1_ps(e.xs[m]), e.ws, e.bias, n, mk);
    if (e.gelu) v = gelu_tanh16(v);
    if (e.res) v = _mm512_add_ps(v, load16(e.res, e.ydt, m * e.N + n, mk));
    return v;
}

// The same for 16 fp32 sums of a bf16 product (no scales): acc + bias[n], then GELU on that sum rounded to bf16 (as
// a bf16 F.linear's output meets F.gelu), then + res.
T_AVX512 static inline __m512 epilogue_value16f(const Epilogue& e, const float* acc, int64_t m, int64_t n,
                                                __mmask16 mk) {
    __m512 v = _mm512_maskz_loadu_ps(mk, acc);
    if (e.bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, e.bias + n));
    if (e.gelu) v = gelu_tanh16(round_bf16(v));
    if (e.res) v = _mm512_add_ps(v, load16(e.res, e.ydt, m * e.N + n, mk));
    return v;
}

T_AVX512 static inline void epilogue16(const Epilogue& e, const int32_t* acc, int64_t m, int64_t n, __mmask16 mk) {
    store16(e.y, e.ydt, m * e.N + n, epilogue_value16(e, acc, m, n, mk), mk);
}

// h of row m, columns n.. from the gate's and up's 16 sums at a1 and a3: both products rounded to bf16 as their
// epilogues round them, then silu(gate) and its product with up rounded to bf16 as prefill.cpp's swiglu rounds.
T_AVX512 static inline __m512 gate16(const Gate& g, const int32_t* a1, const int32_t* a3, int64_t m, int64_t n,
                                     __mmask16 mk) {
    const __m512 xs = _mm512_set1_ps(g.xs[m]);
    const __m512 gate = round_bf16(silu16(round_bf16(scaled16(a1, xs, g.s1, g.b1, n, mk))));
    return round_bf16(_mm512_mul_ps(gate, round_bf16(scaled16(a3, xs, g.s3, g.b3, n, mk))));
}

// The same from the fp32 sums of a bf16 product's gate and up (no scales: g.xs, g.s1, g.s3 unused).
T_AVX512 static inline __m512 gate16f(const Gate& g, const float* a1, const float* a3, int64_t n, __mmask16 mk) {
    __m512 v1 = _mm512_maskz_loadu_ps(mk, a1), v3 = _mm512_maskz_loadu_ps(mk, a3);
    if (g.b1) v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(mk, g.b1 + n));
    if (g.b3) v3 = _mm512_add_ps(v3, _mm512_maskz_loadu_ps(mk, g.b3 + n));
    return round_bf16(_mm512_mul_ps(round_bf16(silu16(round_bf16(v1))), round_bf16(v3)));
}
