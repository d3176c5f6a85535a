// Attention for many queries at once, bf16 in and out: the vision tower's bidirectional attention (no mask) and the
// language model's causal prefill chunks (query l of a unit sees its keys 0..start+l). Both run between torch's
// OpenMP products, so the passes run on torch's own OpenMP team (pool_run's linger = false): on the pool, torch's
// workers still spinning after the last product would share the cores with it.
//
// Why native: torch's CPU flash-attention kernel reaches ~170-190 GFLOP/s at these shapes (1024 patches or a
// 512-token chunk, head size 64 or 72), a third of what the linears reach: it was half of the vision time and a
// fifth of a long prefill (with an explicit mask it also computes the masked upper triangle). Here scores and value
// sums are AVX512-BF16 dot products (_mm512_dpbf16_ps: bf16 pairs, fp32 accumulation) over re-laid-out K and V,
// with a whole-row fp32 softmax over the visible keys only. Rounding as torch's flash kernel: fp32 scores and
// exponentials, the unnormalized probabilities rounded to bf16 for the value sums, the fp32 sum divided out at the
// end, one bf16 rounding of the output. An int8 tower may take its scores in int8 instead (attn_q8.cpp).
//
// Layout: q (n, H, L, Dh) and k, v (n, Hkv, S, Dh) given by their strides (unit, head, row; the last dim
// contiguous), so the tower's projections and the KV cache are read in place; out is (n, L, H*Dh) contiguous, the
// out-projection's input. Query head h reads kv head h / (H/Hkv). Dh even and at most 128.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

#include "amx.h"
#include "attn_q8.h"
#include "gemv.h"
#include "pool.h"

namespace {

const int QB = 8;  // query rows per block: 8 x 2 key blocks of 16 = 16 score accumulators
static_assert(QB == Q8_ROWS, "the int8 scores fill a whole block of queries");

struct ManyArgs {
    const uint16_t *q, *k, *v;
    uint16_t* out;
    int64_t n, H, Hkv, L, Dh, Lp, Dp;  // Lp: the most keys of a unit rounded up to 32; Dp: Dh rounded up to 16
    int64_t qs[3], ks[3], vs[3];       // strides (unit, head, row) of q, k and v
    const int64_t* nkeys;              // keys of each unit (causal: the last L of them are the queries' own)
    int causal;
    float scale;
    uint32_t* kp;  // per (unit, kv head): (Pp, Lp) key pairs, the pair (k[j][2p], k[j][2p+1]) at [p][j]; rows past
                   // Dh/2 zero (Pp: Dh/2 rounded up to 16, whole tiles of 32 head columns)
    uint32_t* vp;  // per (unit, kv head): (Lp/2, Dp) value pairs, the pair (v[2i][d], v[2i+1][d]) at [i][d]
    int64_t qblocks;  // blocks of queries per (unit, head): of QB, or of QT on the tiles
    int64_t Pp;
    int64_t Ls;  // row stride of kp, of the scores and of the probabilities: Lp + 32, so that the 16 rows a tile
                 // reads or writes do not all fall into the same few sets of the L1 cache (a 4 KB stride would)
    uint32_t* kq;  // int8 scores (attn_q8.h; else null): per (unit, kv head) the keys' (q8_words(Dh), Ls) words
    float* ksc;    // in place of kp, and per key its scale and offset correction (Ls of each)
    int32_t* kcorr;

    // keys visible to query l of unit u
    int64_t visible(int64_t u, int64_t l) const { return causal ? nkeys[u] - L + l + 1 : nkeys[u]; }
};

// One query's softmax over its vis visible keys of Lb: e = 2^(c s - c max(s)) for its scores s at sr (c > 0: their
// scale times log2 e, or 1 for scores already scaled so), 0 for the hidden and padded keys; the e rounded to bf16
// into pw, their fp32 sum returned (one accumulator, in key order). The whole vectors of visible keys run unmasked,
// the max over four accumulators (one max's latency per vector held a 1024-key row back: 10% of a vision layer's
// attention), then the one partial vector, then zeros.
T_AVX512BF16 float softmax_row(const float* sr, uint16_t* pw, int64_t Lb, int64_t vis, float c) {
    const int64_t full = vis / 16 * 16;  // keys in whole vectors of visible ones
    const __mmask16 part = tail16(vis - full);
    __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
    int64_t k = 0;
    for (; k + 64 <= full; k += 64) {
        m0 = _mm512_max_ps(m0, _mm512_load_ps(sr + k));
        m1 = _mm512_max_ps(m1, _mm512_load_ps(sr + k + 16));
        m2 = _mm512_max_ps(m2, _mm512_load_ps(sr + k + 32));
        m3 = _mm512_max_ps(m3, _mm512_load_ps(sr + k + 48));
    }
    for (; k < full; k += 16) m0 = _mm512_max_ps(m0, _mm512_load_ps(sr + k));
    if (part) m1 = _mm512_mask_max_ps(m1, part, m1, _mm512_load_ps(sr + full));
    const float mx = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
    const __m512 cv = _mm512_set1_ps(c), m = _mm512_set1_ps(mx * c);
    __m512 tot = _mm512_setzero_ps();
    for (k = 0; k < full; k += 16) {
        const __m512 e = exp2_nonpos(_mm512_fmsub_ps(_mm512_load_ps(sr + k), cv, m));
        tot = _mm512_add_ps(tot, e);
        _mm256_store_si256((__m256i*)(pw + k), (__m256i)_mm512_cvtneps_pbh(e));
    }
    if (part) {
        const __m512 e = _mm512_maskz_mov_ps(part, exp2_nonpos(_mm512_fmsub_ps(_mm512_load_ps(sr + k), cv, m)));
        tot = _mm512_add_ps(tot, e);
        _mm256_store_si256((__m256i*)(pw + k), (__m256i)_mm512_cvtneps_pbh(e));
        k += 16;
    }
    for (; k < Lb; k += 16) _mm256_store_si256((__m256i*)(pw + k), _mm256_setzero_si256());
    return _mm512_reduce_add_ps(tot);
}

// A block's scores (then exponentials) and bf16 probabilities, n of each, 64-byte aligned: this thread's buffers, kept
// for its next blocks (a malloc and free per block cost 3% of a vision layer).
void block_buffers(int64_t n, float** s, uint16_t** pr) {
    static thread_local std::vector<float> s_buf;
    static thread_local std::vector<uint16_t> pr_buf;
    if ((int64_t)s_buf.size() < n + 16) s_buf.resize(n + 16);
    if ((int64_t)pr_buf.size() < n + 32) pr_buf.resize(n + 32);
    *s = (float*)(((uintptr_t)s_buf.data() + 63) & ~(uintptr_t)63);
    *pr = (uint16_t*)(((uintptr_t)pr_buf.data() + 63) & ~(uintptr_t)63);
}

// pass 1, one chunk per (unit, kv head): K and V into pair layouts (padded keys and head columns are zero), or K
// rounded to int8 for the int8 scores
void relayout(const void* ctx, int64_t c) {
    const ManyArgs& a = *(const ManyArgs*)ctx;
    const int64_t u = c / a.Hkv, h = c % a.Hkv, S = a.nkeys[u];
    const int64_t P = a.Dh / 2;
    const uint16_t* kc = a.k + u * a.ks[0] + h * a.ks[1];
    if (a.kq) {
        q8_keys(kc, a.ks[2], S, a.Dh, a.Lp, a.Ls, a.kq + c * q8_words(a.Dh) * a.Ls, a.ksc + c * a.Ls,
                a.kcorr + c * a.Ls);
    } else {
        uint32_t* kp = a.kp + c * a.Pp * a.Ls;
        memset(kp + P * a.Ls, 0, sizeof(uint32_t) * (a.Pp - P) * a.Ls);
        // a key row's bf16 values read as 32-bit words are its pairs: the K layout is their transpose
        uint32_t tile[16][64];
        for (int64_t j0 = 0; j0 < a.Lp; j0 += 16) {
            for (int64_t j = 0; j < 16; j++) {
                if (j0 + j < S) memcpy(tile[j], kc + (j0 + j) * a.ks[2], sizeof(uint32_t) * P);
                else memset(tile[j], 0, sizeof(uint32_t) * P);
            }
            for (int64_t p = 0; p < P; p++)
                for (int64_t j = 0; j < 16; j++) kp[p * a.Ls + j0 + j] = tile[j][p];
        }
    }
    uint32_t* vp = a.vp + c * (a.Lp / 2) * a.Dp;
    static const uint16_t zeros[128] = {};
    for (int64_t i = 0; i < a.Lp / 2; i++) {
        const uint16_t* lo = 2 * i < S ? a.v + u * a.vs[0] + h * a.vs[1] + 2 * i * a.vs[2] : zeros;
        const uint16_t* hi = 2 * i + 1 < S ? a.v + u * a.vs[0] + h * a.vs[1] + (2 * i + 1) * a.vs[2] : zeros;
        uint32_t* o = vp + i * a.Dp;
        for (int64_t d = 0; d < a.Dh; d++) o[d] = (uint32_t)lo[d] | (uint32_t)hi[d] << 16;
        for (int64_t d = a.Dh; d < a.Dp; d++) o[d] = 0;
    }
}

// The value sums of a block's queries, R at a time: R queries x NC column blocks of 16 accumulate over the key
// pairs (each row pair of V read once per R queries), then are divided by the softmax sums and rounded once to bf16
// into out. R divides QB; rows past the block read row 0's probabilities and are never stored.
template <int R, int NC>
T_AVX512BF16 inline void value_sums(const ManyArgs& a, const uint32_t* vp, const uint32_t* p32, const float* sum,
                                    int64_t rows, int64_t Lb, int64_t u, int64_t h, int64_t i0) {
    for (int64_t r0 = 0; r0 < rows; r0 += R) {
        __m512 acc[R][NC];
        for (int r = 0; r < R; r++)
            for (int cc = 0; cc < NC; cc++) acc[r][cc] = _mm512_setzero_ps();
        const uint32_t* pq[R];  // each query's probability pairs
        for (int r = 0; r < R; r++) pq[r] = p32 + (r0 + r < QB ? r0 + r : 0) * (a.Ls / 2);
        for (int64_t i = 0; i < Lb / 2; i++) {
            __m512bh pw[R];
            for (int r = 0; r < R; r++) pw[r] = (__m512bh)_mm512_set1_epi32((int)pq[r][i]);
            for (int cc = 0; cc < NC; cc++) {
                const __m512bh vv = (__m512bh)_mm512_loadu_si512(vp + i * a.Dp + cc * 16);
                for (int r = 0; r < R; r++) acc[r][cc] = _mm512_dpbf16_ps(acc[r][cc], vv, pw[r]);
            }
        }
        for (int r = 0; r < R && r0 + r < rows; r++) {
            uint16_t* o = a.out + (u * a.L + i0 + r0 + r) * (a.H * a.Dh) + h * a.Dh;
            for (int cc = 0; cc < NC; cc++) {
                const __m512 y = _mm512_div_ps(acc[r][cc], _mm512_set1_ps(sum[r0 + r]));
                _mm256_mask_storeu_epi16(o + cc * 16, tail16(a.Dh - cc * 16), to_bf16x16(y));
            }
        }
    }
}

// Scores of a block's queries (rows of q at the row stride qs[2]) against keys [0, Lb): 8 queries x 32 keys per
// step, times scale log2(e) (the softmax's exponentials are powers of 2), into s (rows past `rows`: from zero queries).
T_AVX512BF16 inline void scores_bf16(const ManyArgs& a, const uint16_t* q, int64_t rows, const uint32_t* kp,
                                     int64_t Lb, float* s) {
    uint32_t qw[QB][64];  // each query's pairs (Dh <= 128): a row's bf16 values read as 32-bit words
    for (int r = 0; r < QB; r++) {
        if (r < rows) memcpy(qw[r], q + r * a.qs[2], sizeof(uint16_t) * a.Dh);
        else memset(qw[r], 0, sizeof(uint16_t) * a.Dh);
    }
    const __m512 sc = _mm512_set1_ps(a.scale * LOG2E);
    for (int64_t j = 0; j < Lb; j += 32) {
        __m512 acc[QB][2];
        for (int r = 0; r < QB; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
        for (int64_t p = 0; p < a.Dh / 2; p++) {
            const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kp + p * a.Ls + j);
            const __m512bh k1 = (__m512bh)_mm512_loadu_si512(kp + p * a.Ls + j + 16);
            for (int r = 0; r < QB; r++) {
                const __m512bh qb = (__m512bh)_mm512_set1_epi32((int)qw[r][p]);
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], k0, qb);
                acc[r][1] = _mm512_dpbf16_ps(acc[r][1], k1, qb);
            }
        }
        for (int r = 0; r < QB; r++) {
            _mm512_store_ps(s + r * a.Ls + j, _mm512_mul_ps(acc[r][0], sc));
            _mm512_store_ps(s + r * a.Ls + j + 16, _mm512_mul_ps(acc[r][1], sc));
        }
    }
}

// pass 2, one chunk per (unit, head, block of QB queries)
T_AVX512BF16 void attend(const void* ctx, int64_t c) {
    const ManyArgs& a = *(const ManyArgs*)ctx;
    const int64_t uh = c / a.qblocks, i0 = (c % a.qblocks) * QB;
    const int64_t u = uh / a.H, h = uh % a.H, rows = a.L - i0 < QB ? a.L - i0 : QB;
    const int64_t kv = u * a.Hkv + h / (a.H / a.Hkv);
    const int64_t Lb = (a.visible(u, i0 + rows - 1) + 31) / 32 * 32;  // keys any query of the block sees, padded
    const uint32_t* vp = a.vp + kv * (a.Lp / 2) * a.Dp;
    float* s;
    uint16_t* pr;
    block_buffers(QB * a.Ls, &s, &pr);
    if (rows < QB) memset(pr + rows * a.Ls, 0, sizeof(uint16_t) * (QB - rows) * a.Ls);  // read, never stored
    const uint16_t* q = a.q + u * a.qs[0] + h * a.qs[1] + i0 * a.qs[2];
    if (a.kq) q8_scores(q, a.qs[2], (int)rows, a.Dh, a.kq + kv * q8_words(a.Dh) * a.Ls, a.ksc + kv * a.Ls,
                        a.kcorr + kv * a.Ls, Lb, a.Ls, a.scale * LOG2E, s);
    else scores_bf16(a, q, rows, a.kp + kv * a.Pp * a.Ls, Lb, s);
    // softmax over each query's visible keys: exponentials in fp32, their fp32 sum, bf16 probabilities (the
    // hidden and padded keys: 0)
    float sum[QB];
    for (int r = 0; r < rows; r++) sum[r] = softmax_row(s + r * a.Ls, pr + r * a.Ls, Lb, a.visible(u, i0 + r), 1.f);
    // value sums over key pairs, then / sum, one bf16 rounding (value_sums: the column count fixed at compile time,
    // so the accumulators stay in registers)
    const uint32_t* p32 = (const uint32_t*)pr;
    switch (a.Dp / 16) {
        case 1: value_sums<4, 1>(a, vp, p32, sum, rows, Lb, u, h, i0); break;
        case 2: value_sums<4, 2>(a, vp, p32, sum, rows, Lb, u, h, i0); break;
        case 3: value_sums<4, 3>(a, vp, p32, sum, rows, Lb, u, h, i0); break;
        case 4: value_sums<4, 4>(a, vp, p32, sum, rows, Lb, u, h, i0); break;
        case 5: value_sums<4, 5>(a, vp, p32, sum, rows, Lb, u, h, i0); break;
        case 6: value_sums<4, 6>(a, vp, p32, sum, rows, Lb, u, h, i0); break;
        case 7: value_sums<2, 7>(a, vp, p32, sum, rows, Lb, u, h, i0); break;
        default: value_sums<2, 8>(a, vp, p32, sum, rows, Lb, u, h, i0); break;
    }
}

// ---- the same on AMX-BF16 tiles (TDPBF16PS: a 16 x 32 bf16 tile times a tile of 16 bf16 pairs per column into a
// 16 x 16 fp32 tile): blocks of 32 queries (QT); the pair layouts above are the tiles' B operands as they are (K: rows
// of head-column pairs, 16 keys a row; V: rows of key pairs, 16 head columns a row), queries and probabilities their
// A operands. The same softmax; the scale (times log2 e) goes into it (max(s) * c = max(s * c) for a positive c).

const int QT = 32;  // queries per block on the tiles: two 16-row A tiles share each K and V tile read

// Scores of the block's 32 queries (q: 32 rows of Dq bf16, zero-padded) against keys [j, j + 32) -> s (fp32, row
// stride Ls), unscaled: 2 x 2 tiles per 32 head columns.
T_AMXBF16 inline void score_tiles(const ManyArgs& a, const uint16_t* q, int64_t Dq, const uint32_t* kp, int64_t j,
                                  float* s) {
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int64_t d = 0; d < Dq; d += 32) {  // 32 head columns = 16 pair rows of kp
        const uint32_t* kr = kp + (d / 2) * a.Ls + j;
        _tile_loadd(4, q + d, Dq * 2);
        _tile_loadd(5, q + 16 * Dq + d, Dq * 2);
        _tile_loadd(6, kr, a.Ls * 4);
        _tile_loadd(7, kr + 16, a.Ls * 4);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, s + j, a.Ls * 4);
    _tile_stored(1, s + j + 16, a.Ls * 4);
    _tile_stored(2, s + 16 * a.Ls + j, a.Ls * 4);
    _tile_stored(3, s + 16 * a.Ls + j + 16, a.Ls * 4);
}

// Value sums of the block over keys [0, Lb) for head columns [16 c0, 16 (c0 + NC)), NC 1 or 2 -> o (32 x 128 fp32).
template <int NC>
T_AMXBF16 inline void value_tiles(const ManyArgs& a, const uint16_t* pr, const uint32_t* vp, int64_t Lb, int c0,
                                  float* o) {
    _tile_zero(0); _tile_zero(2);
    if (NC > 1) { _tile_zero(1); _tile_zero(3); }
    for (int64_t j = 0; j < Lb; j += 32) {  // 32 keys = 16 pair rows of vp
        const uint32_t* vr = vp + (j / 2) * a.Dp + 16 * c0;
        _tile_loadd(4, pr + j, a.Ls * 2);
        _tile_loadd(5, pr + 16 * a.Ls + j, a.Ls * 2);
        _tile_loadd(6, vr, a.Dp * 4);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(2, 5, 6);
        if (NC > 1) {
            _tile_loadd(7, vr + 16, a.Dp * 4);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
    float* oc = o + 16 * c0;
    _tile_stored(0, oc, 128 * 4);
    _tile_stored(2, oc + 16 * 128, 128 * 4);
    if (NC > 1) {
        _tile_stored(1, oc + 16, 128 * 4);
        _tile_stored(3, oc + 16 * 128 + 16, 128 * 4);
    }
}

// pass 2 on the tiles, one chunk per (unit, head, block of 32 queries)
T_AMXBF16 void attend_amx(const void* ctx, int64_t c) {
    const ManyArgs& a = *(const ManyArgs*)ctx;
    const int64_t uh = c / a.qblocks, i0 = (c % a.qblocks) * QT;
    const int64_t u = uh / a.H, h = uh % a.H, rows = a.L - i0 < QT ? a.L - i0 : QT;
    const int64_t kv = u * a.Hkv + h / (a.H / a.Hkv);
    const int64_t Lb = (a.visible(u, i0 + rows - 1) + 31) / 32 * 32;
    const uint32_t* kp = a.kp + kv * a.Pp * a.Ls;
    const uint32_t* vp = a.vp + kv * (a.Lp / 2) * a.Dp;
    const int64_t Dq = a.Pp * 2;  // head columns padded to whole tiles
    float* s;
    uint16_t* pr;
    block_buffers(QT * a.Ls, &s, &pr);
    alignas(64) uint16_t q32[QT * 128];
    alignas(64) float o[QT * 128];
    for (int r = 0; r < QT; r++) {
        uint16_t* qr = q32 + r * Dq;
        if (r < rows) {
            memcpy(qr, a.q + u * a.qs[0] + h * a.qs[1] + (i0 + r) * a.qs[2], sizeof(uint16_t) * a.Dh);
            memset(qr + a.Dh, 0, sizeof(uint16_t) * (Dq - a.Dh));
        } else {
            memset(qr, 0, sizeof(uint16_t) * Dq);
        }
    }
    amx_load_config();
    for (int64_t j = 0; j < Lb; j += 32) score_tiles(a, q32, Dq, kp, j, s);  // Lb is a multiple of 32
    const float scale2 = a.scale * LOG2E;  // exp(scale (s - max)) = 2^(scale log2(e) (s - max))
    float sum[QT];
    for (int r = 0; r < QT; r++) {
        if (r < rows) sum[r] = softmax_row(s + r * a.Ls, pr + r * a.Ls, Lb, a.visible(u, i0 + r), scale2);
        else memset(pr + r * a.Ls, 0, sizeof(uint16_t) * Lb);  // read by the value tiles, never stored
    }
    for (int c0 = 0; c0 < a.Dp / 16; c0 += 2) {  // two column tiles at a time beside the probability and value tiles
        if (c0 + 1 < a.Dp / 16) value_tiles<2>(a, pr, vp, Lb, c0, o);
        else value_tiles<1>(a, pr, vp, Lb, c0, o);
    }
    _tile_release();
    for (int64_t r = 0; r < rows; r++) {
        uint16_t* out = a.out + (u * a.L + i0 + r) * (a.H * a.Dh) + h * a.Dh;
        const __m512 d = _mm512_set1_ps(sum[r]);
        for (int64_t cc = 0; cc < a.Dh; cc += 16) {
            const __m512 y = _mm512_div_ps(_mm512_load_ps(o + r * 128 + cc), d);
            _mm256_mask_storeu_epi16(out + cc, tail16(a.Dh - cc), to_bf16x16(y));
        }
    }
}

}  // namespace

extern "C" {

// Whether int8_scores take int8 here: AVX512-VNNI, and no AMX tiles in use (their bf16 scores are faster).
int lfm2vl_attn_int8_scores() { return active_isa() >= 3 && cpu_has_vnni() && !amx_ready(true); }

// q, k, v: strides qs / ks / vs (unit, head, row) in elements, last dim contiguous; nkeys (n,) keys per unit (causal:
// at least L); out (n, L, H*Dh) bf16. int8_scores: q k^T in int8 (attn_q8.h) where lfm2vl_attn_int8_scores(); the
// value sums stay bf16. Returns 0, or -1 when unsupported (Dh odd or > 128, H not a multiple of Hkv, no AVX512-BF16).
int lfm2vl_attn_many(const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* out, int64_t n, int64_t H,
                     int64_t Hkv, int64_t L, int64_t Dh, const int64_t* qs, const int64_t* ks, const int64_t* vs,
                     const int64_t* nkeys, int causal, int int8_scores, float scale, int threads) {
    if (Dh % 2 || Dh > 128 || L < 1 || Hkv < 1 || H % Hkv || active_isa() < 3) return -1;
    int64_t most = 0;
    for (int64_t u = 0; u < n; u++) {
        if (nkeys[u] < (causal ? L : 1)) return -1;
        most = nkeys[u] > most ? nkeys[u] : most;
    }
    const bool tiles = amx_ready(true);
    const bool q8 = int8_scores && lfm2vl_attn_int8_scores();
    const int64_t qb = tiles ? QT : QB;
    ManyArgs a{q, k, v, out, n, H, Hkv, L, Dh, (most + 31) / 32 * 32, (Dh + 15) / 16 * 16, {qs[0], qs[1], qs[2]},
               {ks[0], ks[1], ks[2]}, {vs[0], vs[1], vs[2]}, nkeys, causal, scale, nullptr, nullptr, (L + qb - 1) / qb,
               (Dh / 2 + 15) / 16 * 16, 0, nullptr, nullptr, nullptr};
    a.Ls = a.Lp + 32;
    if (q8) {
        a.kq = (uint32_t*)malloc(sizeof(uint32_t) * n * Hkv * q8_words(Dh) * a.Ls);
        a.ksc = (float*)malloc(sizeof(float) * n * Hkv * a.Ls);
        a.kcorr = (int32_t*)malloc(sizeof(int32_t) * n * Hkv * a.Ls);
    } else {
        a.kp = (uint32_t*)malloc(sizeof(uint32_t) * n * Hkv * a.Pp * a.Ls);
    }
    a.vp = (uint32_t*)malloc(sizeof(uint32_t) * n * Hkv * (a.Lp / 2) * a.Dp);
    pool_run(relayout, &a, n * Hkv, threads, false);
    pool_run(tiles ? attend_amx : attend, &a, n * H * a.qblocks, threads, false);
    free(a.kp);
    free(a.vp);
    free(a.kq);
    free(a.ksc);
    free(a.kcorr);
    return 0;
}

}  // extern "C"
