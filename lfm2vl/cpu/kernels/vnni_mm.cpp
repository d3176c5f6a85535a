// int8 products of many rows in AVX512-VNNI registers, for CPUs without AMX tiles (amx.cpp runs them there):
// int8 x int8 summed exactly in int32 (the values of torch._int_mm(x, w.t())), then a linear's epilogue or a SwiGLU
// gate (int8mm.h) applied to each block of sums while it is in the cache, so no (M, N) int32 result goes through
// memory.
//
// VPDPBUSD multiplies unsigned bytes by signed ones, four pairs a lane: x's bytes are flipped to x + 128 as they are
// broadcast (an XOR, free beside the multiply-adds), and each output column's 128 * sum(w[n, :]) comes off its sums
// at the end (the column sums are taken from the packed panel, one VPDPBUSD by ones a row). Each chunk of work packs
// a group of panels of 32 output columns (panels.h: the tiles' layout, in which one 64-byte row is the register of
// 16 columns x 4 bytes of K), then every block of up to six rows of x runs over each pair of panels: 6 x 64 sums in
// 24 registers, per 4 bytes of K four weight loads, six broadcasts and 24 VPDPBUSD. A block reads x 64 bytes of a
// row at a time, past K into the next row where K is ragged (those bytes meet zero weights); the last block reads
// a padded copy of its rows instead. A group's packed panels and the next group's weight rows, prefetched while its
// blocks run, fit in PACKED_BYTES (the L2 cache). Where there are fewer groups than threads, the rows are split too
// (panels.h's ChunkPlan).
//
// It takes products of at most VNNI_ROWS rows (a prefill's chunks); the vision tower's 1024-row products stay with
// torch._int_mm (oneDNN) and int8mm.cpp's epilogue pass, which run them faster.
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "int8mm.h"
#include "panels.h"
#include "pool.h"

namespace {

const int MR = 6;                       // rows of x per block: 6 x 4 sum registers, 4 weight registers
// The most rows it takes. On a 2-core AMD Zen 4 VM (one 512-bit VPDPBUSD a cycle a core), against torch._int_mm and
// the epilogue pass (interleaved runs): 286 x 1024 x 4608 3.5 against 4.1 ms, 286 x 2048 x 10752 16.9 against 19.0,
// 512 x 1024 x 4608 6.8 against 6.9, but 1024 x 1024 x 4608 13.5 against 12.9 and 1024 x 1152 x 1152 3.7 against
// 3.2 (oneDNN's own loop reaches the core's peak on many rows, this one ~92-94% of it).
const int64_t VNNI_ROWS = 512;
const int64_t GROUP = 4;                // panels per chunk of work at most
const int64_t PACKED_BYTES = 1 << 20;  // a chunk's packed panels at most (the L2 cache of a Zen 4 core)

enum Mode { LINEAR, GATE };

struct VnniArgs {
    const int8_t* x;     // (M, K) bytes
    const int8_t *w, *w3;  // (N, K); GATE: w the gate's, w3 up's
    int64_t M, N, K, KB;  // KB: 64-byte steps of K
    ChunkPlan plan;       // the chunks of work (panels.h)
    Mode mode;
    Epilogue epi;   // LINEAR
    Gate gate;      // GATE, into h (M, N) bf16
    uint16_t* h;
};

inline int32_t load32(const int8_t* p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

// 128 * the column sums of a packed panel of KB steps: two registers (its columns 0..15, 16..31).
T_AVX512VNNI void column_sums(const int8_t* bp, int64_t KB, __m512i* cs) {
    const __m512i ones = _mm512_set1_epi8(1);
    __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
    for (int64_t i = 0; i < KB * 16; i++) {
        s0 = _mm512_dpbusd_epi32(s0, ones, _mm512_load_si512(bp + (i >> 4) * 2048 + (i & 15) * 64));
        s1 = _mm512_dpbusd_epi32(s1, ones, _mm512_load_si512(bp + (i >> 4) * 2048 + 1024 + (i & 15) * 64));
    }
    cs[0] = _mm512_slli_epi32(s0, 7);
    cs[1] = _mm512_slli_epi32(s1, 7);
}

// The sums of R rows of x (x, row stride ldx) against NP consecutive packed panels (bp, panel stride per) over KB
// steps, less 128 * the column sums cs, into t: panel j's rows at t + (j * MR + i) * PANEL.
template <int R, int NP>
T_AVX512VNNI void block(const int8_t* x, int64_t ldx, const int8_t* bp, int64_t per, int64_t KB, const __m512i* cs,
                        int32_t* t) {
    __m512i acc[R][2 * NP];
    for (int i = 0; i < R; i++)
        for (int v = 0; v < 2 * NP; v++) acc[i][v] = _mm512_setzero_si512();
    const __m512i flip = _mm512_set1_epi32((int)0x80808080);  // x + 128 as unsigned bytes
    for (int64_t kb = 0; kb < KB; kb++) {
        const int8_t *b0 = bp + kb * 2048, *xk = x + kb * 64;
#pragma GCC unroll 16
        for (int r = 0; r < 16; r++) {
            __m512i b[2 * NP];
            for (int j = 0; j < NP; j++) {
                b[2 * j] = _mm512_load_si512(b0 + j * per + r * 64);
                b[2 * j + 1] = _mm512_load_si512(b0 + j * per + 1024 + r * 64);
            }
            for (int i = 0; i < R; i++) {
                const __m512i a = _mm512_xor_si512(_mm512_set1_epi32(load32(xk + i * ldx + 4 * r)), flip);
                for (int v = 0; v < 2 * NP; v++) acc[i][v] = _mm512_dpbusd_epi32(acc[i][v], a, b[v]);
            }
        }
    }
    for (int j = 0; j < NP; j++)
        for (int i = 0; i < R; i++)
            for (int h = 0; h < 2; h++)
                _mm512_store_si512((__m512i*)(t + (j * MR + i) * PANEL + 16 * h),
                                   _mm512_sub_epi32(acc[i][2 * j + h], cs[2 * j + h]));
}

template <int NP>
T_AVX512VNNI void block_rows(int rows, const int8_t* x, int64_t ldx, const int8_t* bp, int64_t per, int64_t KB,
                             const __m512i* cs, int32_t* t) {
    switch (rows) {
        case 6: block<6, NP>(x, ldx, bp, per, KB, cs, t); break;
        case 5: block<5, NP>(x, ldx, bp, per, KB, cs, t); break;
        case 4: block<4, NP>(x, ldx, bp, per, KB, cs, t); break;
        case 3: block<3, NP>(x, ldx, bp, per, KB, cs, t); break;
        case 2: block<2, NP>(x, ldx, bp, per, KB, cs, t); break;
        default: block<1, NP>(x, ldx, bp, per, KB, cs, t); break;
    }
}

// Rows [m0, m0 + rows) x columns [n0, min(n0 + 32, N)) of the result from one panel's sums t (and t3: up's, GATE).
T_AVX512VNNI void emit(const VnniArgs& a, const int32_t* t, const int32_t* t3, int64_t m0, int rows, int64_t n0) {
    const int64_t cols = a.N - n0 < PANEL ? a.N - n0 : PANEL;
    for (int i = 0; i < rows; i++) {
        const int64_t m = m0 + i;
        const int32_t *s = t + i * PANEL, *s3 = t3 + i * PANEL;
        if (a.mode == GATE)
            store_row32(a.h, 1, m * a.N + n0, cols, GateRow{a.gate, s, s3, m, n0});
        else
            store_row32(a.epi.y, a.epi.ydt, m * a.N + n0, cols, EpilogueRow{a.epi, s, m, n0});
    }
}

T_AVX512VNNI void mm_chunk(const void* ctx, int64_t chunk) {
    const VnniArgs& a = *(const VnniArgs*)ctx;
    const int64_t per = a.KB * 2048;  // bytes of one packed panel
    int64_t p0, np, m_begin, m_end;
    a.plan.chunk(chunk, p0, np, m_begin, m_end);
    const bool gate = a.mode == GATE;
    const int64_t nw = gate ? 2 * np : np;  // packed panels: the gate's, then up's
    thread_local Scratch packed, tail_copy;
    int8_t* bp = packed.get(per * nw);
    __m512i cs[2 * 2 * GROUP];
    for (int64_t g = 0; g < np; g++) {
        pack_panel(a.w, a.N, a.K, (p0 + g) * PANEL, 0, a.KB, bp + g * per);
        column_sums(bp + g * per, a.KB, cs + 2 * g);
        if (gate) {
            pack_panel(a.w3, a.N, a.K, (p0 + g) * PANEL, 0, a.KB, bp + (np + g) * per);
            column_sums(bp + (np + g) * per, a.KB, cs + 2 * (np + g));
        }
    }
    alignas(64) int32_t t[2 * GROUP][MR * PANEL];  // a block's sums, per packed panel
    // the next group's weight rows (this thread's likely next chunk) are prefetched into the L2 cache a share per
    // block, so its packing does not wait on memory
    const int64_t n0 = (p0 + np) * PANEL, n1 = n0 + a.plan.group * PANEL < a.N ? n0 + a.plan.group * PANEL : a.N;
    const int64_t lines = (a.K + 63) / 64, ahead = n1 > n0 ? (n1 - n0) * lines * (gate ? 2 : 1) : 0;
    const int64_t blocks = m_end > m_begin ? (m_end - m_begin + MR - 1) / MR : 1, share = (ahead + blocks - 1) / blocks;
    int64_t pf = 0;
    for (int64_t m0 = m_begin; m0 < m_end; m0 += MR) {
        for (const int64_t e = pf + share < ahead ? pf + share : ahead; pf < e; pf++) {
            const int64_t i = pf % ((n1 - n0) * lines), n = n0 + i / lines;
            const int8_t* w = pf < (n1 - n0) * lines ? a.w : a.w3;
            _mm_prefetch((const char*)(w + n * a.K + i % lines * 64), _MM_HINT_T1);
        }
        const int rows = m_end - m0 < MR ? (int)(m_end - m0) : MR;
        const int8_t* xr = a.x + m0 * a.K;
        if (m0 + rows == a.M && a.K % 64) {  // the last step reads up to 63 bytes past x's end: a padded copy
            const int64_t n = rows * a.K;
            int8_t* tail = tail_copy.get(n + 64);
            memcpy(tail, xr, n);
            memset(tail + n, 0, 64);
            xr = tail;
        }
        for (int64_t j = 0; j < nw; j += 2) {
            if (j + 1 < nw)
                block_rows<2>(rows, xr, a.K, bp + j * per, per, a.KB, cs + 2 * j, t[j]);
            else
                block_rows<1>(rows, xr, a.K, bp + j * per, per, a.KB, cs + 2 * j, t[j]);
        }
        // block<R, 2> wrote panel j + 1's rows right after panel j's MR rows: t[j + 1] is that place
        for (int64_t g = 0; g < np; g++) emit(a, t[g], t[gate ? np + g : g], m0, rows, (p0 + g) * PANEL);
    }
}

// Sizes the chunks and runs them on the pool.
bool takes(int64_t M) { return active_isa() >= 3 && cpu_has_vnni() && M <= VNNI_ROWS; }

int run(VnniArgs a, const int8_t* x, int threads) {
    if (!takes(a.M)) return -1;
    if (a.M <= 0 || a.N <= 0) return 0;
    a.KB = (a.K + 63) / 64;
    a.x = x;
    // the group's packed panels and the next group's rows (prefetched) together in PACKED_BYTES
    a.plan = ChunkPlan(a.M, a.N, 2 * a.KB * 2048 * (a.mode == GATE ? 2 : 1), PACKED_BYTES, GROUP, MR, threads);
    pool_run(mm_chunk, &a, a.plan.chunks(), threads, false);
    return 0;
}

}  // namespace

extern "C" {

// 1 where the products below take M rows here (AVX512-VNNI, the instruction set not capped below AVX512-BF16, at
// most VNNI_ROWS rows), else 0.
int lfm2vl_int8_vnni(int64_t M) { return takes(M) ? 1 : 0; }

// y (M, N) <- int8_epilogue(x . w^T, xs, ws, bias, res, ydt, gelu) (int8mm.cpp), each block's epilogue on its sums.
// Returns 0, or -1 where it does not take them (lfm2vl_int8_vnni).
int lfm2vl_int8_linear_vnni(const int8_t* x, const int8_t* w, const float* xs, const float* ws, const float* bias,
                            const void* res, void* y, int ydt, int gelu, int64_t M, int64_t N, int64_t K,
                            int threads) {
    VnniArgs a{};
    a.w = w; a.M = M; a.N = N; a.K = K; a.mode = LINEAR;
    a.epi = Epilogue{xs, ws, bias, res, y, ydt, gelu, N};
    return run(a, x, threads);
}

// h (M, N) bf16 <- the SwiGLU gate of x's int8 products with w1 (gate) and w3 (up), as lfm2vl_swiglu_h_amx.
// Returns 0, or -1 where it does not take them (lfm2vl_int8_vnni).
int lfm2vl_swiglu_h_vnni(const int8_t* x, const int8_t* w1, const int8_t* w3, const float* xs, const float* s1,
                         const float* s3, const float* b1, const float* b3, uint16_t* h, int64_t M, int64_t N,
                         int64_t K, int threads) {
    VnniArgs a{};
    a.w = w1; a.w3 = w3; a.M = M; a.N = N; a.K = K; a.mode = GATE;
    a.gate = Gate{xs, s1, s3, b1, b3};
    a.h = h;
    return run(a, x, threads);
}

}  // extern "C"
