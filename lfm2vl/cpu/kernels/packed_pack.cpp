// Packing bf16 weights into the 12-bit format of packed.h, on the pool's threads.
//
// The code table comes from a sample of the rows (~1M weights, evenly spaced): it only decides how many weights
// escape, never whether the packing is exact. Then one pass counts each row's escapes (so every row knows where its
// escaped bytes go) and one writes the low bytes, codes and escapes, both over chunks of rows in parallel. With
// AVX512-VBMI2 a block of 64 weights is split, coded and compressed by byte permutes (VPERMT2B, VPCOMPRESSB).
#include <algorithm>

#include "packed.h"
#include "pool.h"

namespace {

struct PackArgs {
    const uint16_t* W;
    int64_t N, K, per;
    uint8_t code[256];  // code of each high byte (P12_ESCAPE: escapes)
    int32_t* row_esc;   // counting: each row's escapes; packing: each row's first escape
    uint8_t *lo, *cd, *esc;  // packing: where the low bytes, codes and escapes go (packed.h); counting: NULL
};

// Byte 2 p12_elem(p) of a block's 128 bytes for each position p: its weight's low byte (+ 1: the high byte).
struct SplitIndex {
    alignas(64) uint8_t v[64];
    constexpr SplitIndex() : v() {
        for (int p = 0; p < 64; p++) v[p] = (uint8_t)(2 * p12_elem(p));
    }
};
constexpr SplitIndex SPLIT;

// The positions' bytes of the block at w: lo[p] / hi[p] = the low / high byte of element p12_elem(p).
T_P12 inline void split_block(const uint16_t* w, __m512i& lo, __m512i& hi) {
    const __m512i a0 = _mm512_loadu_si512(w), a1 = _mm512_loadu_si512(w + 32);
    const __m512i il = _mm512_load_si512(SPLIT.v);
    lo = _mm512_permutex2var_epi8(a0, il, a1);
    hi = _mm512_permutex2var_epi8(a0, _mm512_add_epi8(il, _mm512_set1_epi8(1)), a1);
}

// The codes of 64 high bytes: a 256-entry table as two 128-entry halves, picked by each byte's top bit.
T_P12 inline __m512i codes_of(__m512i hi, const __m512i (&t)[4]) {
    const __m512i c0 = _mm512_permutex2var_epi8(t[0], hi, t[1]), c1 = _mm512_permutex2var_epi8(t[2], hi, t[3]);
    return _mm512_mask_blend_epi8(_mm512_movepi8_mask(hi), c0, c1);
}

T_P12 void rows_vbmi(const PackArgs& a, int64_t n0, int64_t n1, bool count) {
    __m512i t[4];
    for (int i = 0; i < 4; i++) t[i] = _mm512_loadu_si512(a.code + 64 * i);
    const __m512i esc_code = _mm512_set1_epi8(P12_ESCAPE);
    const int64_t K = a.K;
    for (int64_t n = n0; n < n1; n++) {
        int64_t e = count ? 0 : a.row_esc[n];
        for (int64_t k = 0; k < K; k += 64) {
            __m512i l, h;
            split_block(a.W + n * K + k, l, h);
            const __m512i c = codes_of(h, t);
            const __mmask64 m = _mm512_cmpeq_epi8_mask(c, esc_code);
            if (count) {
                e += __builtin_popcountll(m);
                continue;
            }
            _mm512_storeu_si512(a.lo + n * K + k, l);
            const __m256i nib = _mm256_or_si256(_mm512_castsi512_si256(c),
                                                _mm256_slli_epi16(_mm512_extracti64x4_epi64(c, 1), 4));
            _mm256_storeu_si256((__m256i*)(a.cd + (n * K + k) / 2), nib);
            if (m) {
                _mm512_mask_compressstoreu_epi8(a.esc + e, m, h);
                e += __builtin_popcountll(m);
            }
        }
        if (count) a.row_esc[n] = (int32_t)e;
    }
}

void rows_scalar(const PackArgs& a, int64_t n0, int64_t n1, bool count) {
    const int64_t K = a.K;
    for (int64_t n = n0; n < n1; n++) {
        int64_t e = count ? 0 : a.row_esc[n];
        for (int64_t k = 0; k < K; k += 64) {
            const uint16_t* w = a.W + n * K + k;
            uint8_t c[64];
            for (int p = 0; p < 64; p++) {
                const uint16_t x = w[p12_elem(p)];
                c[p] = a.code[x >> 8];
                if (c[p] == P12_ESCAPE) {
                    if (!count) a.esc[e] = (uint8_t)(x >> 8);
                    e++;
                }
                if (!count) a.lo[n * K + k + p] = (uint8_t)x;
            }
            if (!count)
                for (int j = 0; j < 32; j++) a.cd[(n * K + k) / 2 + j] = (uint8_t)(c[j] | c[32 + j] << 4);
        }
        if (count) a.row_esc[n] = (int32_t)e;
    }
}

template <bool COUNT>
void pack_chunk(const void* ctx, int64_t chunk) {
    const PackArgs& a = *(const PackArgs*)ctx;
    int64_t n0, n1;
    chunk_rows(chunk, a.per, a.N, &n0, &n1);
    if (p12_fast()) rows_vbmi(a, n0, n1, COUNT);
    else rows_scalar(a, n0, n1, COUNT);
}

PackArgs args(const uint16_t* W, int64_t N, int64_t K, const uint8_t* table, int32_t* row_esc, uint8_t* buf) {
    PackArgs a{W, N, K, p12_chunk_rows(K), {}, row_esc, NULL, NULL, NULL};
    if (buf) {
        a.lo = buf + p12_lo_offset(N);
        a.cd = a.lo + N * K;
        a.esc = a.cd + N * K / 2;
    }
    memset(a.code, P12_ESCAPE, sizeof(a.code));
    for (int c = P12_ESCAPE - 1; c >= 0; c--) a.code[table[c]] = (uint8_t)c;  // unused codes hold 0: code 0 wins
    return a;
}

}  // namespace

extern "C" {

// The code table of W (N, K) bf16 into table[64] (the layout's first 64 bytes), and each row's first escape into
// row_esc[0..N] (entry N: their count, returned): the 15 most frequent high bytes of a sample of the rows get codes.
int64_t lfm2vl_p12_plan(const uint16_t* W, int64_t N, int64_t K, uint8_t* table, int32_t* row_esc, int threads) {
    int64_t count[256] = {};
    const int64_t stride = std::max<int64_t>(1, N * K / (1 << 20));
    for (int64_t n = 0; n < N; n += stride)
        for (int64_t k = 0; k < K; k++) count[W[n * K + k] >> 8]++;
    int order[256];
    for (int i = 0; i < 256; i++) order[i] = i;
    // most frequent first, ties by value: the same table for the same weights
    std::stable_sort(order, order + 256, [&](int a, int b) { return count[a] > count[b]; });
    for (int l = 0; l < 4; l++)
        for (int c = 0; c < 16; c++) table[16 * l + c] = c < P12_ESCAPE ? (uint8_t)order[c] : 0;
    PackArgs a = args(W, N, K, table, row_esc, nullptr);
    pool_run(pack_chunk<true>, &a, (N + a.per - 1) / a.per, threads, false);
    int64_t total = 0;
    for (int64_t n = 0; n < N; n++) {
        const int64_t e = row_esc[n];
        row_esc[n] = (int32_t)total;
        total += e;
    }
    row_esc[N] = (int32_t)total;
    return total;
}

// Bytes of the packed buffer of an (N, K) matrix with `escapes` escapes.
int64_t lfm2vl_p12_bytes(int64_t N, int64_t K, int64_t escapes) {
    return p12_lo_offset(N) + N * K + N * K / 2 + escapes;
}

// Pack W (N, K) bf16 into buf (lfm2vl_p12_bytes long) with the table and row offsets lfm2vl_p12_plan gave.
void lfm2vl_p12_pack(const uint16_t* W, int64_t N, int64_t K, const uint8_t* table, const int32_t* row_esc,
                     uint8_t* buf, int threads) {
    memcpy(buf, table, 64);
    memset(buf + 64, 0, p12_lo_offset(N) - 64);
    memcpy(buf + 64, row_esc, 4 * (N + 1));
    PackArgs a = args(W, N, K, table, (int32_t*)(buf + 64), buf);
    pool_run(pack_chunk<false>, &a, (N + a.per - 1) / a.per, threads, false);
}

}  // extern "C"
