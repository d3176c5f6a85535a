// bf16 products of many rows (a prefill chunk) in AVX512-BF16 registers, for CPUs without AMX tiles (amx.cpp runs
// them there) that also run the 12-bit packed format fast (AVX512-VBMI / VBMI2: one kernel for plain and packed
// weights, so both give the same bits). Each chunk of work makes a group of panels of 32 output columns in the
// register layout (panels.h: per 64 bytes of K, 16 columns x one bf16 pair a 64-byte row) in its core's L2 cache,
// from plain bf16 rows or unpacking packed ones (packed.h), then every block of up to six rows of x runs over each
// pair of panels: 6 x 64 fp32 sums in 24 registers, per bf16 pair of K four weight loads, six broadcasts and 24
// VDPBF16PS, K in order from zero, rounded to bf16 once at the end. oneDNN's bf16 GEMM sums the same way but cuts K in
// blocks, so ~0.02% of its outputs round the other way. A packed weight never goes through memory unpacked.
//
// On a 2-core AMD Zen 4 VM against oneDNN with the plain weight (three distinct weights a shape, so they come from
// memory): 286 x 1024 x 4608 (450M w2) 6.34 against 6.91 ms, 286 x 4608 x 1024 6.92 against 7.54, 286 x 10752 x 2048
// (3B w1) 30.9 against 31.9, 286 x 2048 x 10752 31.6 against 33.5; packed weights unpacked in 4 MB blocks for oneDNN
// took 9.2-44.7 ms there (1.17-1.39x the plain product, in a slow memory phase of the VM).
//
// Panels are made 16 rows at a time (packed rows unpacked into a per-thread buffer) and transposed into place; a
// group's panels fit in PACKED_BYTES, the chunks cut as panels.h's ChunkPlan says.
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "packed.h"
#include "panels.h"
#include "pool.h"

namespace {

const int MR = 6;                       // rows of x per block: 6 x 4 sum registers, 4 weight registers
const int64_t GROUP = 4;                // panels per chunk of work at most
const int64_t PACKED_BYTES = 1 << 20;  // a chunk's unpacked panels at most (the L2 cache of a Zen 4 core)

struct Args {
    P12 v;
    const uint16_t* w;  // plain (N, K) bf16 weight, or NULL: packed (v)
    const uint16_t* x;  // (M, K) bf16
    uint16_t* y;        // (M, N) bf16
    int64_t M, N, K, KB;  // KB: 64-byte steps of K (32 bf16)
    ChunkPlan plan;
};

inline int32_t load32(const uint16_t* p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

// Columns [n0, n0 + 32) of the weight (zeros past N) as a panel at out (KB steps of 2 KB); packed rows through tmp
// (16 K bf16).
T_P12 void make_panel(const Args& a, int64_t n0, uint16_t* tmp, int8_t* out) {
    for (int h = 0; h < 2; h++) {
        const int64_t r0 = n0 + 16 * h, rows = a.N - r0 < 16 ? a.N - r0 : 16;
        const uint16_t* src = a.w ? a.w + r0 * a.K : tmp;
        if (rows > 0 && !a.w) p12_unpack_rows(a.v, r0, r0 + rows, a.K, tmp);
        for (int64_t kb = 0; kb < a.KB; kb++) {
            __m512i r[16];
            for (int i = 0; i < 16; i++)
                r[i] = i < rows ? _mm512_loadu_si512(src + i * a.K + kb * 32) : _mm512_setzero_si512();
            transpose16(r);
            int8_t* dst = out + (kb * 2 + h) * 1024;
            for (int i = 0; i < 16; i++) _mm512_store_si512((__m512i*)(dst + 64 * i), r[i]);
        }
    }
}

// The sums of R rows of x (row stride ldx) against NP consecutive panels (bp, panel stride per) into t: panel j's
// rows at t + (j * MR + i) * PANEL.
template <int R, int NP>
T_P12 void block(const uint16_t* x, int64_t ldx, const int8_t* bp, int64_t per, int64_t KB, float* t) {
    __m512 acc[R][2 * NP];
    for (int i = 0; i < R; i++)
        for (int v = 0; v < 2 * NP; v++) acc[i][v] = _mm512_setzero_ps();
    for (int64_t kb = 0; kb < KB; kb++) {
        const int8_t* b0 = bp + kb * 2048;
        const uint16_t* xk = x + kb * 32;
#pragma GCC unroll 16
        for (int r = 0; r < 16; r++) {
            __m512i b[2 * NP];
            for (int j = 0; j < NP; j++) {
                b[2 * j] = _mm512_load_si512(b0 + j * per + r * 64);
                b[2 * j + 1] = _mm512_load_si512(b0 + j * per + 1024 + r * 64);
            }
            for (int i = 0; i < R; i++) {
                const __m512i p = _mm512_set1_epi32(load32(xk + i * ldx + 2 * r));
                for (int v = 0; v < 2 * NP; v++) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], (__m512bh)p, (__m512bh)b[v]);
            }
        }
    }
    for (int j = 0; j < NP; j++)
        for (int i = 0; i < R; i++)
            for (int h = 0; h < 2; h++) _mm512_store_ps(t + (j * MR + i) * PANEL + 16 * h, acc[i][2 * j + h]);
}

template <int NP>
T_P12 void block_rows(int rows, const uint16_t* x, int64_t ldx, const int8_t* bp, int64_t per, int64_t KB, float* t) {
    switch (rows) {
        case 6: block<6, NP>(x, ldx, bp, per, KB, t); break;
        case 5: block<5, NP>(x, ldx, bp, per, KB, t); break;
        case 4: block<4, NP>(x, ldx, bp, per, KB, t); break;
        case 3: block<3, NP>(x, ldx, bp, per, KB, t); break;
        case 2: block<2, NP>(x, ldx, bp, per, KB, t); break;
        default: block<1, NP>(x, ldx, bp, per, KB, t); break;
    }
}

T_P12 void mm_chunk(const void* ctx, int64_t chunk) {
    const Args& a = *(const Args*)ctx;
    const int64_t per = a.KB * 2048;  // bytes of one panel
    int64_t p0, np, m_begin, m_end;
    a.plan.chunk(chunk, p0, np, m_begin, m_end);
    thread_local Scratch panel_buf, row_buf;
    int8_t* bp = panel_buf.get(per * np);
    uint16_t* tmp = (uint16_t*)row_buf.get(16 * a.K * 2);
    for (int64_t g = 0; g < np; g++) make_panel(a, (p0 + g) * PANEL, tmp, bp + g * per);
    alignas(64) float t[GROUP][MR * PANEL];
    for (int64_t m0 = m_begin; m0 < m_end; m0 += MR) {
        const int rows = m_end - m0 < MR ? (int)(m_end - m0) : MR;
        const uint16_t* xr = a.x + m0 * a.K;
        for (int64_t j = 0; j < np; j += 2) {
            if (j + 1 < np) block_rows<2>(rows, xr, a.K, bp + j * per, per, a.KB, t[j]);
            else block_rows<1>(rows, xr, a.K, bp + j * per, per, a.KB, t[j]);
        }
        // block<R, 2> wrote panel j + 1's rows right after panel j's MR rows: t[j + 1] is that place
        for (int64_t g = 0; g < np; g++) {
            const int64_t n0 = (p0 + g) * PANEL, cols = a.N - n0 < PANEL ? a.N - n0 : PANEL;
            for (int i = 0; i < rows; i++)
                for (int64_t c = 0; c < cols; c += 16) {
                    const __mmask16 mk = tail16(cols - c);
                    _mm256_mask_storeu_epi16(a.y + (m0 + i) * a.N + n0 + c, mk,
                                             to_bf16x16(_mm512_maskz_loadu_ps(mk, t[g] + i * PANEL + c)));
                }
        }
    }
}

}  // namespace

extern "C" {

// y (M, N) bf16 <- x (M, K) bf16 . w^T, w plain (N, K) bf16 (packed 0) or a packed buffer (packed 1; packed.h), fp32
// sums over K in order, rounded once. Returns 0, or -1 where it does not run here (no AVX512-BF16 / VBMI / VBMI2, the
// instruction set capped below them, or K not a multiple of 32).
int lfm2vl_bf16_mm(const void* w, int packed, const uint16_t* x, uint16_t* y, int64_t M, int64_t N, int64_t K,
                   int threads) {
    if (!p12_fast() || K % 32 || K <= 0) return -1;
    if (M <= 0 || N <= 0) return 0;
    const Args a{packed ? p12_view(w, N, K) : P12{}, packed ? nullptr : (const uint16_t*)w, x, y, M, N, K, K / 32,
                 ChunkPlan(M, N, K / 32 * 2048, PACKED_BYTES, GROUP, MR, threads)};
    pool_run(mm_chunk, &a, a.plan.chunks(), threads, false);
    return 0;
}

}  // extern "C"
