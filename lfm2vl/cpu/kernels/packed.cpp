// Products with, and unpacking of, bf16 weights packed in 12 bits (the format: packed.h).
//
// Products take one activation row at a time like gemv.cpp's row_bf16_dp, with its accumulators in its order (or
// from BLOCK_ROWS activation rows on, four unpacked weight rows through gemv.cpp's own blocks), so their sums are the
// one-stream bf16 kernel's sums bit for bit, also where one activation row reads two packed rows at a time
// (gemv.h's by_parts); without AVX512-BF16, VBMI and VBMI2 a scalar path unpacks each row.
#include "packed.h"
#include "pool.h"

namespace {

// Row n of the matrix as bf16 values (scalar).
void unpack_row(const P12& v, int64_t n, int64_t K, uint16_t* out) {
    const uint8_t* lo = v.lo + n * K;
    const uint8_t* cd = v.codes + n * K / 2;
    const uint8_t* esc = v.esc + v.row_esc[n];
    for (int64_t k = 0; k < K; k += 64)
        for (int p = 0; p < 64; p++) {
            const int c = p < 32 ? cd[k / 2 + p] & 15 : cd[k / 2 + p - 32] >> 4;
            const int hi = c == P12_ESCAPE ? *esc++ : v.table[c];
            out[k + p12_elem(p)] = (uint16_t)(hi << 8 | lo[k + p]);
        }
}

// The 64 bf16 weights of the block at lo / cd: A = elements 0..31, B = 32..63; esc advances past its escapes.
T_P12 inline __attribute__((always_inline)) void block(const uint8_t* lo, const uint8_t* cd, const uint8_t*& esc,
                                                       __m512i table, __m512i& A, __m512i& B) {
    const __m512i m4 = _mm512_set1_epi8(P12_ESCAPE);
    const __m256i c8 = _mm256_loadu_si256((const __m256i*)cd);
    const __m512i c = _mm512_and_si512(_mm512_inserti64x4(_mm512_zextsi256_si512(c8), _mm256_srli_epi16(c8, 4), 1), m4);
    __m512i hi = _mm512_shuffle_epi8(table, c);
    const __mmask64 e = _mm512_cmpeq_epi8_mask(c, m4);
    if (__builtin_expect(e != 0, 0)) {
        hi = _mm512_mask_expandloadu_epi8(hi, e, esc);
        esc += __builtin_popcountll(e);
    }
    const __m512i l = _mm512_loadu_si512(lo);
    A = _mm512_unpacklo_epi8(l, hi);
    B = _mm512_unpackhi_epi8(l, hi);
}

// A and B (elements k..k+63 of the row) times each activation row: A into accumulator ua, then B into ub.
template <int MR, int U>
T_P12 inline __attribute__((always_inline)) void fma_block(__m512 (&acc)[MR][U], int ua, int ub, __m512i A, __m512i B,
                                                           const uint16_t* X, int64_t K, int64_t k) {
    for (int j = 0; j < MR; j++) {
        acc[j][ua] = _mm512_dpbf16_ps(acc[j][ua], (__m512bh)A, (__m512bh)_mm512_loadu_si512(X + j * K + k));
        acc[j][ub] = _mm512_dpbf16_ps(acc[j][ub], (__m512bh)B, (__m512bh)_mm512_loadu_si512(X + j * K + k + 32));
    }
}

// One packed row times MR activation rows, accumulated as row_bf16_dp<MR> does: U chains, 32 elements a step,
// step s into chain s % U, a tail shorter than U steps into chain 0.
template <int MR>
T_P12 void row_p12(const P12& v, int64_t n, const uint16_t* X, int64_t K, bool pf, const char* lo_end,
                   const char* cd_end, float* out) {
    constexpr int U = MR == 1 ? 4 : MR == 2 ? 2 : 1;
    const uint8_t* lo = v.lo + n * K;
    const uint8_t* cd = v.codes + n * K / 2;
    const uint8_t* esc = v.esc + v.row_esc[n];
    const __m512i table = _mm512_loadu_si512(v.table);
    __m512 acc[MR][U] = {};
    __m512i A, B;
    const int64_t step = U == 4 ? 128 : 64;
    int64_t k = 0;
    for (; k + step <= K; k += step) {
        if (pf) {  // the bf16 kernel's distance in weights: 3/4 of PF_BYTES in low bytes, 3/8 in codes
            prefetch_line((const char*)lo + k + PF_BYTES * 3 / 4, lo_end);
            if (U == 4) prefetch_line((const char*)lo + k + 64 + PF_BYTES * 3 / 4, lo_end);
            prefetch_line((const char*)cd + k / 2 + PF_BYTES * 3 / 8, cd_end);
        }
        block(lo + k, cd + k / 2, esc, table, A, B);
        if (U == 4) {
            fma_block<MR, U>(acc, 0, 1, A, B, X, K, k);
            block(lo + k + 64, cd + k / 2 + 32, esc, table, A, B);
            fma_block<MR, U>(acc, 2 % U, 3 % U, A, B, X, K, k + 64);
        } else {
            fma_block<MR, U>(acc, 0, 1 % U, A, B, X, K, k);
        }
    }
    if (k < K) {  // U == 4 and one block of 64 left
        block(lo + k, cd + k / 2, esc, table, A, B);
        fma_block<MR, U>(acc, 0, 0, A, B, X, K, k);
    }
    sum_accumulators<MR, U>(acc, out);
}

// NS packed rows n[0..NS-1] times one activation row, their 128-element steps interleaved (NS streams of low
// bytes, codes and escapes per thread); each row's sums are row_p12<1>'s, in the same order.
template <int NS>
T_P12 void rows_p12_one(const P12& v, const int64_t* n, const uint16_t* X, int64_t K, const char* lo_end,
                        const char* cd_end, float* out) {
    const __m512i table = _mm512_loadu_si512(v.table);
    const uint8_t *lo[NS], *cd[NS], *esc[NS];
    __m512 acc[NS][1][4] = {};
    for (int j = 0; j < NS; j++) {
        lo[j] = v.lo + n[j] * K;
        cd[j] = v.codes + n[j] * K / 2;
        esc[j] = v.esc + v.row_esc[n[j]];
    }
    __m512i A, B;
    int64_t k = 0;
    for (; k + 128 <= K; k += 128)
        for (int j = 0; j < NS; j++) {
            prefetch_line((const char*)lo[j] + k + PF_BYTES * 3 / 4, lo_end);
            prefetch_line((const char*)lo[j] + k + 64 + PF_BYTES * 3 / 4, lo_end);
            prefetch_line((const char*)cd[j] + k / 2 + PF_BYTES * 3 / 8, cd_end);
            block(lo[j] + k, cd[j] + k / 2, esc[j], table, A, B);
            fma_block<1, 4>(acc[j], 0, 1, A, B, X, K, k);
            block(lo[j] + k + 64, cd[j] + k / 2 + 32, esc[j], table, A, B);
            fma_block<1, 4>(acc[j], 2, 3, A, B, X, K, k + 64);
        }
    if (k < K)  // one block of 64 left
        for (int j = 0; j < NS; j++) {
            block(lo[j] + k, cd[j] + k / 2, esc[j], table, A, B);
            fma_block<1, 4>(acc[j], 0, 0, A, B, X, K, k);
        }
    for (int j = 0; j < NS; j++) sum_accumulators<1, 4>(acc[j], out + j);
}

// Rows [n0, n1) as bf16 into out, row n at out + (n - n0) K.
T_P12 void unpack_rows_fast(const P12& v, int64_t n0, int64_t n1, int64_t K, uint16_t* out) {
    const __m512i table = _mm512_loadu_si512(v.table);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t* esc = v.esc + v.row_esc[n];
        for (int64_t k = 0; k < K; k += 64) {
            __m512i A, B;
            block(v.lo + n * K + k, v.codes + (n * K + k) / 2, esc, table, A, B);
            _mm512_storeu_si512(out + (n - n0) * K + k, A);
            _mm512_storeu_si512(out + (n - n0) * K + k + 32, B);
        }
    }
}

// Rows [n0, n1), as gemv.cpp's rows_bf16_dp takes them: from BLOCK_ROWS activation rows on, four weight rows at a
// time; the others (and fewer activation rows) one at a time, activation rows in groups of 4, 2 and 1.
T_P12 void rows_fast(const P12& v, const uint16_t* X, void* Y, const float* bias, int64_t M, int64_t n0, int64_t n1,
                     int64_t N, int64_t K, int ydt) {
    if (M >= BLOCK_ROWS) {  // gemv.cpp's blocks of four weight rows, over the four rows unpacked
        std::vector<uint16_t> w(4 * K);
        const int64_t nb = n0 + (n1 - n0) / 4 * 4;
        for (int64_t n = n0; n < nb; n += 4) {
            unpack_rows_fast(v, n, n + 4, K, w.data());
            four_rows_bf16_dp(w.data(), X, Y, bias, M, n, N, K, ydt, false, nullptr);
        }
        n0 = nb;
    }
    const char* lo_end = (const char*)v.lo + n1 * K;
    const char* cd_end = (const char*)v.codes + n1 * K / 2;
    rows_generic([&](int64_t n, int64_t m, int g, bool pf, float* out) {
        if (g == 4) row_p12<4>(v, n, X + m * K, K, pf, lo_end, cd_end, out);
        else if (g == 2) row_p12<2>(v, n, X + m * K, K, pf, lo_end, cd_end, out);
        else row_p12<1>(v, n, X + m * K, K, pf, lo_end, cd_end, out);
    }, nullptr, Y, bias, M, n0, n1, N, ydt);
}

void rows_scalar(const P12& v, const float* Xf, void* Y, const float* bias, int64_t M, int64_t n0, int64_t n1,
                 int64_t N, int64_t K, int ydt) {
    std::vector<uint16_t> w(K);
    for (int64_t n = n0; n < n1; n++) {
        unpack_row(v, n, K, w.data());
        for (int64_t m = 0; m < M; m++) {
            float acc = 0.f;
            for (int64_t k = 0; k < K; k++) acc += bf16_to_f32(w[k]) * Xf[m * K + k];
            store_out(Y, ydt, m * N + n, acc + (bias ? bias[n] : 0.f));
        }
    }
}

struct UnpackArgs {
    P12 v;
    int64_t n0, rows, K, per;  // rows [n0, n0 + rows) into out
    uint16_t* out;
};

void unpack_chunk(const void* ctx, int64_t chunk) {
    const UnpackArgs& a = *(const UnpackArgs*)ctx;
    int64_t n0, n1;
    chunk_rows(chunk, a.per, a.rows, &n0, &n1);
    uint16_t* out = a.out + n0 * a.K;
    if (p12_fast()) {
        unpack_rows_fast(a.v, a.n0 + n0, a.n0 + n1, a.K, out);
    } else {
        for (int64_t n = a.n0 + n0; n < a.n0 + n1; n++, out += a.K) unpack_row(a.v, n, a.K, out);
    }
}

}  // namespace

bool p12_fast() {
    static const bool ok = (__builtin_cpu_init(), __builtin_cpu_supports("avx512bf16") &&
                            __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vbmi2") &&
                            __builtin_cpu_supports("avx512bw"));
    return ok && lfm2vl_isa() >= 3;
}

void p12_unpack_rows(const P12& v, int64_t n0, int64_t n1, int64_t K, uint16_t* out) {
    unpack_rows_fast(v, n0, n1, K, out);
}

void p12_rows(const void* W, const uint16_t* X, const float* Xf, void* Y, const float* bias, int64_t M, int64_t n0,
              int64_t n1, int64_t N, int64_t K, int ydt, bool streams) {
    const P12 v = p12_view(W, N, K);
    // one activation row on the CPUs where several weight streams read faster (gemv.cpp's row_streams): two rows at
    // a time. On the AMX Xeon VM of 2026-12-04 (in-process A/B against one): 450M decode +5.3-6.3%, 3B +7.6%; four
    // rows +6.8-7.4% at 450M but +0% at 3B.
    if (X && p12_fast() && M == 1 && streams) {
        const char* lo_end = (const char*)v.lo + n1 * K;
        const char* cd_end = (const char*)v.codes + n1 * K / 2;
        by_parts<2>(n0, n1, nullptr, bias, Y, ydt, [&](const int64_t* n, int count, float* out) {
            if (count == 2) rows_p12_one<2>(v, n, X, K, lo_end, cd_end, out);
            else rows_p12_one<1>(v, n, X, K, lo_end, cd_end, out);
        });
    } else if (X && p12_fast()) rows_fast(v, X, Y, bias, M, n0, n1, N, K, ydt);
    else rows_scalar(v, Xf, Y, bias, M, n0, n1, N, K, ydt);
}

extern "C" {

// Rows [n0, n1) of buf (packed (N, K)) -> out (n1 - n0, K) bf16, the same values W had.
void lfm2vl_p12_unpack(const uint8_t* buf, int64_t N, int64_t K, int64_t n0, int64_t n1, uint16_t* out,
                       int threads) {
    UnpackArgs a{p12_view(buf, N, K), n0, n1 - n0, K, p12_chunk_rows(K), out};
    pool_run(unpack_chunk, &a, (a.rows + a.per - 1) / a.per, threads, false);
}

// Whether packed products run the AVX512 path (else the scalar one).
int lfm2vl_p12_fast(void) { return p12_fast(); }

}  // extern "C"
