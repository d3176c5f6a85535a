// Internal interface between gemv.cpp (products), attn.cpp (decode attention) and decode.cpp (the fused step).
#pragma once
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include <vector>

// Each ISA path lives in a function with a target attribute, so the files compile on any x86-64 gcc.
#define T_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))
#define T_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define T_AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma")))
#define T_AVX2 __attribute__((target("avx2,fma,f16c")))

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even, as torch's .to(bfloat16)
    return (uint16_t)(u >> 16);
}

// Store v at y[idx] as fp32 (ydt 0) or bf16 rounded to nearest even (ydt 1).
static inline void store_out(void* y, int ydt, int64_t idx, float v) {
    if (ydt == 1) ((uint16_t*)y)[idx] = f32_to_bf16(v);
    else ((float*)y)[idx] = v;
}

// Rows [n0, n1) of a one-row product NS at a time (several weight streams per thread: gemv_streams.cpp, int4 in
// gemv_vnni.cpp, packed.cpp): row t of each of NS equal parts of the range together, so each stream is sequential
// and the streams far apart (separate streams to the prefetchers); the rows left over one by one. sums(n, count, out)
// writes the sums of the count rows n[0..count-1] (count NS, or 1 for a row left over); y[n] = sum * S[n] (S NULL:
// the sum) + bias[n].
template <int NS, typename Sums>
static inline void by_parts(int64_t n0, int64_t n1, const float* S, const float* bias, void* Y, int ydt, Sums sums) {
    const int64_t q = (n1 - n0) / NS;
    int64_t n[NS];
    float out[NS];
    auto store = [&](int64_t r, float v) { store_out(Y, ydt, r, (S ? v * S[r] : v) + (bias ? bias[r] : 0.f)); };
    for (int64_t t = 0; t < q; t++) {
        for (int j = 0; j < NS; j++) n[j] = n0 + j * q + t;
        sums(n, NS, out);
        for (int j = 0; j < NS; j++) store(n[j], out[j]);
    }
    for (int64_t r = n0 + NS * q; r < n1; r++) {
        sums(&r, 1, out);
        store(r, out[0]);
    }
}

// int4 (kind 3): row n holds K/32 groups of 16 bytes; byte j of group g packs element 32g+j in its low nibble and
// element 32g+16+j in its high nibble, each as q+8 (0..15). S is (N, K/32) IEEE fp16 (as llama.cpp's Q4_0 stores its
// scales: 4.5 bits per weight): w[n, 32g+i] = (nibble - 8) * S[n, g]. K is a multiple of I4_GROUP (the Python side
// checks). The pointer is typed float* on the shared paths and read through i4_scale.
static const int64_t I4_GROUP = 32;

// IEEE fp16 -> fp32, exact (subnormals included).
static inline float h2f(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else {  // subnormal: shift the mantissa up to its leading one
            int e = -1;
            do { e++; man <<= 1; } while (!(man & 0x400u));
            u = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (man << 13);
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// fp32 -> IEEE fp16, round to nearest even (torch's .to(float16)), subnormals and overflow to inf included.
static inline uint16_t f2h(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    const uint32_t a = u & 0x7fffffffu;
    if (a >= 0x7f800000u) return sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u);
    if (a >= 0x477ff000u) return sign | 0x7c00u;  // rounds to 65520 or more: inf
    if (a < 0x38800000u) {                        // under 2^-14: a subnormal or zero
        if (a < 0x33000000u) return sign;         // under 2^-25 (2^-25 itself ties to even: 0)
        const uint32_t exp = a >> 23, man = (a & 0x7fffffu) | 0x800000u;
        const int shift = 126 - (int)exp;
        uint32_t q = man >> shift;
        const uint32_t rem = man & ((1u << shift) - 1u), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1u))) q++;
        return (uint16_t)(sign | q);
    }
    uint32_t h = (a >> 13) - ((uint32_t)(127 - 15) << 10);
    const uint32_t rem = a & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++;
    return (uint16_t)(sign | h);
}

// Group scale i of an int4 weight's scale array.
static inline float i4_scale(const float* S, int64_t i) { return h2f(((const uint16_t*)S)[i]); }


static inline float i4_at(const uint8_t* row, int64_t k) {
    const uint8_t b = row[k / 32 * 16 + k % 16];
    return (float)((k % 32 < 16 ? b & 15 : b >> 4) - 8);
}

// One int4 group (16 bytes) -> its 32 weights q - 8 as two fp32 vectors (elements 0..15, 16..31).
T_AVX512 static inline void i4_group(const uint8_t* p, __m512& lo, __m512& hi) {
    const __m128i b = _mm_loadu_si128((const __m128i*)p), low = _mm_set1_epi8(15);
    const __m512 eight = _mm512_set1_ps(8.f);
    lo = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, low))), eight);
    hi = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), low))), eight);
}

// The instruction set in use (gemv.cpp): 3 AVX512-BF16, 2 AVX512F, 1 AVX2+FMA, 0 scalar.
int active_isa();

// One product y = x W^T (+ bias): see linear_setup for the fields' meaning.
struct LinearArgs {
    int kind, isa, ydt;
    bool dp;
    bool streams;  // one activation row: read several weight rows at once (gemv_streams.cpp; row_streams())
    const void* W;
    const float* S;
    const void* X;
    const float* Xf;
    void* Y;
    const float* bias;
    int64_t M, N, K, rows_per_chunk, chunks;
    // AVX2 int8 products: x quantized to int16 in blocks of Q16_BLOCK; int4: to int8 in blocks of 32 (gemv_avx2.cpp);
    // else NULL
    const int16_t* Xh;
    const int8_t* Xq;
    const float* Xd;
    const float* Xs;
    std::vector<int16_t> xh;
    std::vector<int8_t> xq;
    std::vector<float> xd;
    std::vector<float> xs;
    // AVX2 bf16 products: x split by parity in blocks of 16 (gemv_avx2.cpp), else NULL
    const float* Xp;
    std::vector<float> xp;
};

// gemv_scalar.cpp: the scalar rows (any CPU).
void bf16w_scalar(const uint16_t* W, const float* X, void* Y, const float* bias, int64_t M, int64_t n0, int64_t n1,
                  int64_t N, int64_t K, int ydt);
void f32w_scalar(const float* W, const float* X, void* Y, const float* bias, int64_t M, int64_t n0, int64_t n1,
                 int64_t N, int64_t K, int ydt);
void i8w_scalar(const int8_t* W, const float* S, const float* X, void* Y, const float* bias, int64_t M, int64_t n0,
                int64_t n1, int64_t N, int64_t K, int ydt);
void i4w_scalar(const uint8_t* W, const float* S, const float* X, void* Y, const float* bias, int64_t M, int64_t n0,
                int64_t n1, int64_t N, int64_t K, int ydt);

// gemv_avx2.cpp: the AVX2 rows of a product with fp32 x (kind 0 bf16, 1 fp32, 2 int8 weights), x quantized to int8
// in blocks of 32, and rows with such an x (kind 2 int8, 3 int4 weights).
void rows_f32_avx2(int kind, const void* W, const float* S, const float* X, void* Y, const float* bias, int64_t M,
                   int64_t n0, int64_t n1, int64_t N, int64_t K, int ydt);
void split_x_even_odd(const float* X, int64_t M, int64_t K, float* out);
void rows_bf16_avx2(const uint16_t* W, const float* Xp, void* Y, const float* bias, int64_t M, int64_t n0, int64_t n1,
                    int64_t N, int64_t K, int ydt);
static const int64_t Q16_BLOCK = 256;
void quantize_x_q16(const float* X, int64_t M, int64_t K, int16_t* q, float* d);
void quantize_x_q8(const float* X, int64_t M, int64_t K, int8_t* q, float* d, float* qsum, int P);
// gemv_vnni.cpp: int8 rows with x from quantize_x_q16, int4 rows with x from quantize_x_q8 (runs of 4), on
// AVX512-VNNI CPUs (cpu_has_vnni()).
bool cpu_has_vnni();
// AMD Zen 4 (gemv.cpp); whether the one-stream rows other than int4's integer-dot ones prefetch their weights
// PF_BYTES ahead: not there.
bool cpu_zen4();
bool weight_prefetch();
void rows_q16_vnni(const int8_t* W, const float* S, const int16_t* Xh, const float* Xd, void* Y, const float* bias,
                   int64_t M, int64_t n0, int64_t n1, int64_t N, int64_t K, int ydt);
void rows_q4_vnni(const uint8_t* W, const float* S, const int8_t* Xq, const float* Xd, const float* Xs, void* Y,
                  const float* bias, int64_t M, int64_t n0, int64_t n1, int64_t N, int64_t K, int ydt);
void rows_q4_streams(const uint8_t* W, const float* S, const int8_t* Xq, const float* Xd, const float* Xs, void* Y,
                     const float* bias, int64_t n0, int64_t n1, int64_t K, int ydt);
// gemv_streams.cpp: one activation row against several weight rows at once (AVX512-BF16 bf16, AVX512-VNNI int8), on
// the CPUs where that reads faster (row_streams, gemv.cpp).
void rows_bf16_streams(const uint16_t* W, const uint16_t* X, void* Y, const float* bias, int64_t n0, int64_t n1,
                       int64_t K, int ydt);
void rows_q16_streams(const int8_t* W, const float* S, const int16_t* Xh, const float* Xd, void* Y, const float* bias,
                      int64_t n0, int64_t n1, int64_t K, int ydt);
void rows_q_avx2(int kind, const void* W, const float* S, const int16_t* Xh, const int8_t* Xq, const float* Xd,
                 const float* Xs, void* Y, const float* bias, int64_t M, int64_t n0, int64_t n1, int64_t N, int64_t K,
                 int ydt);

// kind 0 bf16 / 1 fp32 / 2 int8 (+ row scales S) / 3 int4 (+ group scales S) weights; xdt/ydt 0 fp32, 1 bf16.
// Xf = x as fp32 (may be NULL when
// kind == 0 and xdt == 1 on an AVX512-BF16 CPU: the dot-product path reads the bf16 x).
void linear_setup(LinearArgs& a, int kind, const void* W, const float* S, const void* X, const float* Xf, int xdt,
                  void* Y, int ydt, const float* bias, int64_t M, int64_t N, int64_t K);
// Run n products as one job on the calling thread plus up to threads-1 pool helpers.
void linear_many(const LinearArgs* lin, int n, int threads, bool linger = true);
// One query per row: see lfm2vl_attn_decode; lens (B,) or NULL gives row b its own key count.
void attn_decode_run(const float* Q, const void* K, const void* V, const uint8_t* mask, const int64_t* rows,
                     const int64_t* lens, float* O, int64_t B, int64_t H, int64_t Hkv, int64_t n, int64_t Dh,
                     int64_t sb, int64_t sh, int64_t ss, int kvdt, int threads);
// Active instruction set (see gemv.cpp): 3 AVX512-BF16, 2 AVX512F, 1 AVX2, 0 scalar.
extern "C" int lfm2vl_isa(void);

// exp(x) for x <= 0 (a softmax after subtracting the max, a sigmoid of -|x|), ~1 ulp: 2^n * poly(r), x = n ln2 + r,
// |r| <= ln2/2. libm's scalar expf was most of a long-context decode attention.
T_AVX512 static inline __m512 exp_nonpos(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));  // exp(-104) is below the smallest float: 0 after scaling
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 split in two for an exact product
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(p, n);
}

static const float LOG2E = 1.44269504088896341f;

// 2^x for x <= 0, ~1 ulp: 2^n p(f), x = n + f, |f| <= 1/2, p the minimax polynomial of Cephes' exp2f. A softmax
// whose scores are scaled by log2(e) takes it: fewer operations than exp_nonpos's reduction by ln 2.
T_AVX512 static inline __m512 exp2_nonpos(__m512 x) {
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
    return _mm512_scalef_ps(_mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f)), n);
}

static const float GELU_C = 0.7978845608028654f;  // sqrt(2 / pi)

// GELU's tanh approximation 0.5 v (1 + tanh(u)), u = sqrt(2/pi) (v + 0.044715 v^3), in fp32, as v sigmoid(2u):
// with e = exp(-2|u|) <= 1 (nothing overflows, a power of 2: exp2_nonpos), v / (1 + e) for u >= 0, v e / (1 + e)
// below
T_AVX512 static inline __m512 gelu_tanh16(__m512 v) {
    const __m512 t = _mm512_mul_ps(v, _mm512_fmadd_ps(_mm512_mul_ps(v, v), _mm512_set1_ps(0.044715f),
                                                      _mm512_set1_ps(1.f)));  // u / sqrt(2/pi)
    const __m512 e = exp2_nonpos(_mm512_mul_ps(_mm512_set1_ps(-2.f * GELU_C * LOG2E), _mm512_abs_ps(t)));
    const __m512 num = _mm512_mask_mul_ps(v, _mm512_cmp_ps_mask(t, _mm512_setzero_ps(), _CMP_LT_OQ), v, e);
    return _mm512_div_ps(num, _mm512_add_ps(_mm512_set1_ps(1.f), e));
}

// silu(x) = x / (1 + exp(-x)), with exp(-x) taken as exp(-|x|) so it never overflows (x < 0: x e / (1 + e), the
// same value)
T_AVX512 static inline __m512 silu16(__m512 x) {
    const __m512 e = exp_nonpos(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)));
    const __m512 num = _mm512_mask_mul_ps(x, _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), x, e);
    return _mm512_div_ps(num, _mm512_add_ps(_mm512_set1_ps(1.f), e));
}

// 16 bf16 values (the lanes of mask mk; the others 0) widened exactly to fp32
T_AVX512 static inline __m512 from_bf16x16(const uint16_t* p, __mmask16 mk = 0xffff) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, p)), 16));
}

// v rounded to bf16 and back, 16 lanes (round to nearest even, as f32_to_bf16; inputs here are finite)
T_AVX512 static inline __m512 round_bf16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xffff0000u)));
}

// v rounded to bf16 (nearest even), packed to 16 bf16 values for a 256-bit store
T_AVX512 static inline __m256i to_bf16x16(__m512 v) {
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(round_bf16(v)), 16));
}

// 16 values (those under mask mk) at out[idx], as fp32 (odt 0) or the top 16 bits of the bf16-rounded value (odt 1).
T_AVX512 static inline void store16(void* out, int odt, int64_t idx, __m512 v, __mmask16 mk) {
    if (odt == 1) _mm256_mask_storeu_epi16((uint16_t*)out + idx, mk, to_bf16x16(v));
    else _mm512_mask_storeu_ps((float*)out + idx, mk, v);
}

// 16 values (those under mask mk; the others 0) at p[idx], bf16 (dt 1) or fp32 (dt 0), as fp32.
T_AVX512 static inline __m512 load16(const void* p, int dt, int64_t idx, __mmask16 mk) {
    return dt == 1 ? from_bf16x16((const uint16_t*)p + idx, mk) : _mm512_maskz_loadu_ps(mk, (const float*)p + idx);
}

// The first `left` of 16 lanes (all 16 when left >= 16, none when left <= 0): the mask of a loop's tail.
static inline __mmask16 tail16(int64_t left) {
    return left >= 16 ? (__mmask16)0xffff : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1u);
}

// Scales g..g+15 of an int4 row's G fp16 scales (fewer at the row's end) as fp32 into out[16], converted 16 at a
// time (VCVTPH2PS): the hot loops read fp32.
T_AVX512 static inline void i4_scales16(const float* S, int64_t g, int64_t G, float* out) {
    _mm512_storeu_ps(out, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(tail16(G - g), (const uint16_t*)S + g)));
}

// ---- AVX2 helpers (gemv_avx2.cpp, quantized.cpp)
// 8 bf16 values widened exactly to fp32
T_AVX2 static inline __m256 load8_bf16(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

T_AVX2 static inline float hsum128(__m128 s) {
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

T_AVX2 static inline float hsum256(__m256 v) {
    return hsum128(_mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)));
}

T_AVX2 static inline float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}

// out[j] = the sum of activation row j's U accumulators, all lanes
template <int MR, int U>
T_AVX512 static inline void sum_accumulators(__m512 (&acc)[MR][U], float* out) {
    for (int j = 0; j < MR; j++) {
        __m512 t = acc[j][0];
        for (int u = 1; u < U; u++) t = _mm512_add_ps(t, acc[j][u]);
        out[j] = _mm512_reduce_add_ps(t);
    }
}

// Rows n0..n1-1 for all M activation rows, in groups of 4 / 2 / 1 activation rows per pass over a weight row:
// row(n, m, g, prefetch, out) writes the g sums, scaled by S[n] (if S) and biased here (gemv.cpp, packed.cpp).
template <typename RowFn>
static inline void rows_generic(RowFn row, const float* S, void* Y, const float* bias, int64_t M, int64_t n0,
                                int64_t n1, int64_t N, int ydt) {
    const bool pf = weight_prefetch();
    float out[4];
    for (int64_t n = n0; n < n1; n++) {
        int64_t m = 0;
        while (m < M) {
            const int g = M - m >= 4 ? 4 : M - m >= 2 ? 2 : 1;
            row(n, m, g, pf && m == 0, out);
            for (int j = 0; j < g; j++) {
                float v = out[j];
                if (S) v *= S[n];
                store_out(Y, ydt, (m + j) * N + n, v + (bias ? bias[n] : 0.f));
            }
            m += g;
        }
    }
}

// bf16 products of this many activation rows or more take four weight rows at a time (gemv.cpp: four_rows_bf16_dp,
// packed.cpp)
static const int64_t BLOCK_ROWS = 8;
T_AVX512BF16 void four_rows_bf16_dp(const uint16_t* w, const uint16_t* X, void* Y, const float* bias, int64_t M,
                                    int64_t n, int64_t N, int64_t K, int ydt, bool pf, const char* end);

// bf16 weights packed in 12 bits (packed.h): rows [n0, n1) of W times the M activation rows X (bf16; NULL when
// the CPU lacks the AVX512 paths) or Xf (fp32, for the scalar path); streams: one activation row reads two weight
// rows at a time (LinearArgs::streams). p12_fast(): whether the AVX512 paths run
// (AVX512-BF16, VBMI and VBMI2, and the instruction-set cap at AVX512-BF16).
bool p12_fast();
void p12_rows(const void* W, const uint16_t* X, const float* Xf, void* Y, const float* bias, int64_t M, int64_t n0,
              int64_t n1, int64_t N, int64_t K, int ydt, bool streams);

// Software prefetch of a weight stream: this many bytes ahead of the row being read, never past its chunk's end.
static const int64_t PF_BYTES = 2048;

static inline void prefetch_line(const char* p, const char* end) {
    if (p < end) __builtin_prefetch(p, 0, 3);  // PREFETCHT0; g++ 12 emitted no _mm_prefetch in the VNNI-target rows
}

// Rows [n0, n1) of chunk `chunk` when N rows are cut into chunks of `per` rows.
static inline void chunk_rows(int64_t chunk, int64_t per, int64_t N, int64_t* n0, int64_t* n1) {
    *n0 = chunk * per;
    *n1 = *n0 + per < N ? *n0 + per : N;
}
