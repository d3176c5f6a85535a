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

// The values of row m, columns n0 + j.. of a linear's epilogue (EpilogueRow) or a SwiGLU gate (GateRow) from a block's
// sums s (s3: up's), for store_row32. Functors with the target attribute: a lambda would be compiled without it.
struct EpilogueRow {
    const Epilogue& e;
    const int32_t* s;
    int64_t m, n0;
    T_AVX512 __m512 operator()(int64_t j, __mmask16 mk) const { return epilogue_value16(e, s + j, m, n0 + j, mk); }
};

struct GateRow {
    const Gate& g;
    const int32_t *s, *s3;
    int64_t m, n0;
    T_AVX512 __m512 operator()(int64_t j, __mmask16 mk) const { return gate16(g, s + j, s3 + j, m, n0 + j, mk); }
};

// Up to 32 columns of one output row at y[idx..] (ydt: 0 fp32, 1 bf16) from value(j, mask): the values of its
// columns j .. j + 15 (lanes of mask) before their rounding. A whole bf16 row of 32 is one 64-byte store (~5% of a
// product on AMX tiles against two 32-byte ones).
template <class Value>
T_AVX512 inline void store_row32(void* y, int ydt, int64_t idx, int64_t cols, Value value) {
    if (cols == 32 && ydt == 1) {
        const __m256i lo = to_bf16x16(value(0, (__mmask16)0xffff)), hi = to_bf16x16(value(16, (__mmask16)0xffff));
        _mm512_storeu_si512((uint16_t*)y + idx, _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
        return;
    }
    for (int64_t j = 0; j < cols; j += 16) {
        const __mmask16 mk = tail16(cols - j);
        store16(y, ydt, idx + j, value(j, mk), mk);
    }
}
