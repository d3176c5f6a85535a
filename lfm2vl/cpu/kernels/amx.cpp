// Products of many rows on AMX tiles: int8 x int8 -> int32 exactly (the values of torch._int_mm(x, w.t())) for
// cpu/int8mm.py's prefill and int8-vision products, and bf16 x bf16 -> fp32 for gemm.py's (the vision tower's, the
// prefill's narrower ones and its SwiGLU gates); also the tiles' setup that attn_many.cpp shares (amx.h).
//
// AMX-INT8's TDPBSSD multiplies a 16 x 64 byte tile of x's rows by a tile of w laid out four bytes of K per column
// ("VNNI": row r holds, for each of 16 output columns n, w[n, 4r .. 4r + 3]) and adds into a 16 x 16 int32 tile;
// AMX-BF16's TDPBF16PS does the same with bf16 pairs (two elements per four bytes) into fp32. Everything below works
// in bytes of K, so both share the layout. w stays row-major (the decode GEMVs read it so); each chunk of the work
// re-lays a group of four panels of 32 output columns into a per-thread buffer (a 16 x 16 dword transpose per 1 KB
// block), then runs every 32-row block of x over the group: two x tiles x two w tiles into four accumulator tiles
// per 64 bytes of K, one slice of K at a time over all four panels (the slice of x is read from the L1 cache after
// its first panel, each panel's partial sums wait in a buffer; whole-K blocks ran 15% slower at 1024 x 768 x 768 on
// the 2-core AMX Xeon VM). Where the group's packed panels would outgrow half the L2 cache (a long K), they are
// packed one block of K at a time and every block of x's rows runs over each before the next is packed. Each block's sums leave the tiles into a small buffer and become the output there: the int32
// sums themselves, a linear's epilogue (scales, bias, GELU, residual: int8mm.h), or a SwiGLU gate's h, the gate's and
// up's blocks side by side; no (M, N) int32 result goes through memory. A ragged edge (K not a multiple of 64 bytes,
// M or N not of 16) goes through zero-padded copies, never past the buffers.
//
// Linux hands out the tile registers only after arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); every thread
// loads its own tile configuration before its first tile instruction of a call and releases the tiles after it.
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <vector>

#include "amx.h"
#include "int8mm.h"
#include "panels.h"
#include "pool.h"

namespace {

const int64_t GROUP = 4;   // panels per chunk of work: each block of x's rows runs over all of them
const int64_t KSLICE = 8;  // 64-byte steps of K per slice of a 32-row block (16 KB of x, kept in the L1 cache)
const int64_t PACKED_BYTES = 1 << 20;  // at most this much of a group's packed panels at a time (half a 2 MB L2 cache)

bool amx_off = false;  // lfm2vl_set_amx(0): tests run the other paths on an AMX CPU too

struct alignas(64) TileConfig {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

}  // namespace

bool amx_ready(bool bf16) {
    if (amx_off) return false;
    static const int caps = [] {  // bit 0: AMX-INT8 usable, bit 1: AMX-BF16 usable
        unsigned a, b, c, d;
        __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
        if (!(d >> 24 & 1)) return 0;  // AMX-TILE
        const long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
        if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) return 0;
        return (int)(d >> 25 & 1) | (int)(d >> 22 & 1) << 1;  // AMX-INT8, AMX-BF16
    }();
    return caps >> (bf16 ? 1 : 0) & 1;
}

T_AMX void amx_load_config() {
    TileConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    // gcc 12 may drop the stores above as dead when only the intrinsic reads them: keep them before the load
    __asm__ volatile("" : : "r"(&cfg) : "memory");
    _tile_loadconfig(&cfg);
}

namespace {

// What each block of the product becomes: the int32 sums themselves, a linear's epilogue, or a SwiGLU gate's h.
// bf16 operands (TDPBF16PS, fp32 sums) take LINEAR only.
enum Mode { RAW, LINEAR, GATE };

struct MmArgs {
    bool bf16;        // operands bf16 (else int8)
    const int8_t* x;  // (Mp, Kp) bytes, row stride Kp: x itself, or its zero-padded copy
    const int8_t* w;  // (N, K) bytes, row stride K
    const int8_t* w3; // GATE: the up projection's (N, K), w being the gate's
    int64_t M, N, K, Kp, Mfull;  // K: bytes of a row; Mfull: rows of x in whole 16-row tiles read in place (the
                                 // rest: xt)
    const int8_t* xt;            // the last M - Mfull rows, zero-padded to 16 x Kp, or NULL
    Mode mode;
    int32_t* c;                  // RAW: (M, N)
    Epilogue epi;                // LINEAR
    Gate gate;                   // GATE, with h (M, N) bf16
    uint16_t* h;
};

// The sums of 16 or 32 rows of x (from xr, row stride ldx bytes) against the packed panel bp: t (rows x 32, row
// stride 32; int32, or fp32 for bf16 operands).
#define DP(C, A, B) do { if (BF16) _tile_dpbf16ps(C, A, B); else _tile_dpbssd(C, A, B); } while (0)

// Adds the sums of 32 rows of x (from xr, row stride ldx bytes) over `steps` 64-byte steps of K against the packed
// steps at bp into t (32 x 32, row stride 32; int32, or fp32 for bf16 operands): unless `first`, t's partial sums go
// back into the tiles and on from where they stopped, so the order of the additions is the whole K's.
template <bool BF16>
T_AMXALL void block32(const int8_t* xr, int64_t ldx, const int8_t* bp, int64_t steps, bool first, int32_t* t) {
    if (first) {
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    } else {
        _tile_loadd(0, t, PANEL * 4);
        _tile_loadd(1, t + 16, PANEL * 4);
        _tile_loadd(2, t + 16 * PANEL, PANEL * 4);
        _tile_loadd(3, t + 16 * PANEL + 16, PANEL * 4);
    }
    for (int64_t kb = 0; kb < steps; kb++) {
        _tile_loadd(4, xr + kb * 64, ldx);
        _tile_loadd(5, xr + 16 * ldx + kb * 64, ldx);
        _tile_loadd(6, bp + kb * 2048, 64);
        _tile_loadd(7, bp + kb * 2048 + 1024, 64);
        DP(0, 4, 6);
        DP(1, 4, 7);
        DP(2, 5, 6);
        DP(3, 5, 7);
    }
    _tile_stored(0, t, PANEL * 4);
    _tile_stored(1, t + 16, PANEL * 4);
    _tile_stored(2, t + 16 * PANEL, PANEL * 4);
    _tile_stored(3, t + 16 * PANEL + 16, PANEL * 4);
}

// block32 for 16 rows (t's first 16 rows).
template <bool BF16>
T_AMXALL void block16(const int8_t* xr, int64_t ldx, const int8_t* bp, int64_t steps, bool first, int32_t* t) {
    if (first) {
        _tile_zero(0); _tile_zero(1);
    } else {
        _tile_loadd(0, t, PANEL * 4);
        _tile_loadd(1, t + 16, PANEL * 4);
    }
    for (int64_t kb = 0; kb < steps; kb++) {
        _tile_loadd(4, xr + kb * 64, ldx);
        _tile_loadd(6, bp + kb * 2048, 64);
        _tile_loadd(7, bp + kb * 2048 + 1024, 64);
        DP(0, 4, 6);
        DP(1, 4, 7);
    }
    _tile_stored(0, t, PANEL * 4);
    _tile_stored(1, t + 16, PANEL * 4);
}

// The 16 values of row m, columns n.. (lanes of mk) before their rounding to y's dtype, from the block's sums at s
// (and s3: up's, GATE): a linear's epilogue, or a SwiGLU gate's h.
T_AMXALL inline __m512 value16(const MmArgs& a, const int32_t* s, const int32_t* s3, int64_t m, int64_t n,
                               __mmask16 mk) {
    if (a.mode == GATE)
        return a.bf16 ? gate16f(a.gate, (const float*)s, (const float*)s3, n, mk) : gate16(a.gate, s, s3, m, n, mk);
    return a.bf16 ? epilogue_value16f(a.epi, (const float*)s, m, n, mk) : epilogue_value16(a.epi, s, m, n, mk);
}

// value16 of row m from column n0 + j, for store_row32 (a functor: a lambda would lack the target attribute).
struct Value16 {
    const MmArgs& a;
    const int32_t *s, *s3;
    int64_t m, n0;
    T_AMXALL __m512 operator()(int64_t j, __mmask16 mk) const { return value16(a, s + j, s3 + j, m, n0 + j, mk); }
};

// Rows [m0, m0 + rows) x columns [n0, min(n0 + 32, N)) of the result from the block's sums t (and t3: up's, GATE).
T_AMXALL void emit(const MmArgs& a, const int32_t* t, const int32_t* t3, int64_t m0, int64_t rows, int64_t n0) {
    const int64_t cols = a.N - n0 < PANEL ? a.N - n0 : PANEL;
    void* y = a.mode == GATE ? (void*)a.h : a.epi.y;
    const int ydt = a.mode == GATE ? 1 : a.epi.ydt;
    for (int64_t i = 0; i < rows; i++) {
        const int64_t m = m0 + i;
        const int32_t *s = t + i * PANEL, *s3 = t3 + i * PANEL;
        if (a.mode == RAW)
            memcpy(a.c + m * a.N + n0, s, cols * 4);
        else
            store_row32(y, ydt, m * a.N + n0, cols, Value16{a, s, s3, m, n0});
    }
}

template <bool BF16>
T_AMXALL void mm_panels(const void* ctx, int64_t chunk) {
    const MmArgs& a = *(const MmArgs*)ctx;
    const int64_t KB = a.Kp / 64, ldx = a.Kp;
    const int64_t panels = (a.N + PANEL - 1) / PANEL, p0 = chunk * GROUP;
    const int64_t np = panels - p0 < GROUP ? panels - p0 : GROUP;
    const bool gate = a.mode == GATE;
    const int64_t nw = gate ? 2 * np : np;  // packed panels: the gate's, then up's
    // The steps of K packed at a time: all of them when the group's panels fit in PACKED_BYTES, else equal blocks of
    // whole slices that do, every block of x's sums over the earlier ones waiting in `sums` (else a long K's panels
    // would come back from beyond the L2 cache for every block of x).
    const int64_t kparts = (KB * nw * 2048 + PACKED_BYTES - 1) / PACKED_BYTES;  // blocks of K, of equal size
    int64_t kblk = (KB + kparts - 1) / kparts;
    kblk = kparts == 1 ? KB : (kblk + KSLICE - 1) / KSLICE * KSLICE;
    const bool whole = kblk >= KB;
    const int64_t per = kblk * 2048;  // bytes of one packed panel's steps
    const int64_t blocks = a.Mfull / 32 + a.Mfull % 32 / 16 + (a.M > a.Mfull ? 1 : 0);
    thread_local Scratch packed, saved;
    int8_t* bp = packed.get(per * nw);
    int32_t* sums = whole ? nullptr : (int32_t*)saved.get(blocks * nw * 32 * PANEL * 4);
    alignas(64) int32_t t[2 * GROUP][32 * PANEL];  // a block's sums per panel when K is packed at once
    amx_load_config();
    for (int64_t kc0 = 0; kc0 < KB; kc0 += kblk) {
        const int64_t kc1 = kc0 + kblk < KB ? kc0 + kblk : KB;
        for (int64_t g = 0; g < np; g++) {
            pack_panel(a.w, a.N, a.K, (p0 + g) * PANEL, kc0, kc1, bp + g * per);
            if (gate) pack_panel(a.w3, a.N, a.K, (p0 + g) * PANEL, kc0, kc1, bp + (np + g) * per);
        }
        // each block of x's rows meets every panel of the group while it is in the nearest caches: two whole 16-row
        // tiles, a slice of K at a time (the slice of x stays in the L1 cache across the group's panels, their sums
        // wait in t), else one tile over the packed steps, else the ragged last rows from their padded copy
        int64_t b = 0;
        for (int64_t m0 = 0, rows; m0 < a.M; m0 += rows, b++) {
            rows = m0 + 32 <= a.Mfull ? 32 : m0 < a.Mfull ? 16 : a.M - m0;
            const int8_t* xr = (m0 < a.Mfull ? a.x + m0 * ldx : a.xt) + kc0 * 64;
            int32_t* tb = whole ? t[0] : sums + b * nw * 32 * PANEL;  // panel j's sums at tb + j * 32 * PANEL
            if (rows == 32) {
                for (int64_t k0 = kc0; k0 < kc1; k0 += KSLICE) {
                    const int64_t k1 = k0 + KSLICE < kc1 ? k0 + KSLICE : kc1;
                    for (int64_t j = 0; j < nw; j++)
                        block32<BF16>(xr + (k0 - kc0) * 64, ldx, bp + j * per + (k0 - kc0) * 2048, k1 - k0, k0 == 0,
                                      tb + j * 32 * PANEL);
                }
            } else {
                for (int64_t j = 0; j < nw; j++)
                    block16<BF16>(xr, ldx, bp + j * per, kc1 - kc0, kc0 == 0, tb + j * 32 * PANEL);
            }
            if (kc1 == KB)
                for (int64_t g = 0; g < np; g++)
                    emit(a, tb + g * 32 * PANEL, tb + (gate ? np + g : g) * 32 * PANEL, m0, rows, (p0 + g) * PANEL);
        }
    }
    _tile_release();
}

}  // namespace

extern "C" {

// 1 when the int8 tiles can run here (AMX-INT8 and Linux's permission), else 0; lfm2vl_amx_bf16: the bf16 ones.
int lfm2vl_amx_int8() { return amx_ready(false) ? 1 : 0; }
int lfm2vl_amx_bf16() { return amx_ready(true) ? 1 : 0; }

// on = 0 turns the tiles off (the products below return -1, attn_many takes its AVX512-BF16 path), 1 back on where
// the CPU has them.
void lfm2vl_set_amx(int on) { amx_off = on == 0; }

}  // extern "C"

namespace {

// Sets up the padded copies of x where its shape needs them, then runs the panels on the pool.
void run(MmArgs a, const int8_t* x, int threads) {
    const int64_t K = a.K, Kp = (K + 63) / 64 * 64;
    a.Kp = Kp;
    a.Mfull = a.M / 16 * 16;
    a.x = x;
    a.xt = NULL;
    std::vector<int8_t> xpad, xtail;
    if (Kp != K) {  // every row re-laid at the padded stride: tiles read 64 bytes of K at a time
        xpad.assign((size_t)a.Mfull * Kp + 64, 0);
        for (int64_t m = 0; m < a.Mfull; m++) memcpy(xpad.data() + m * Kp, x + m * K, K);
        a.x = xpad.data();
    }
    if (a.Mfull < a.M) {
        xtail.assign((size_t)16 * Kp, 0);
        for (int64_t m = a.Mfull; m < a.M; m++) memcpy(xtail.data() + (m - a.Mfull) * Kp, x + m * K, K);
        a.xt = xtail.data();
    }
    const int64_t panels = (a.N + PANEL - 1) / PANEL;
    pool_run(a.bf16 ? mm_panels<true> : mm_panels<false>, &a, (panels + GROUP - 1) / GROUP, threads, false);
}

}  // namespace

extern "C" {

// c (M, N) int32 <- x (M, K) int8 . w (N, K)^T int8, all contiguous. Returns 0, or -1 where the tiles cannot run
// (the caller multiplies another way).
int lfm2vl_int_mm_amx(const int8_t* x, const int8_t* w, int32_t* c, int64_t M, int64_t N, int64_t K, int threads) {
    if (!amx_ready()) return -1;
    if (M <= 0 || N <= 0) return 0;
    MmArgs a{};
    a.w = w; a.M = M; a.N = N; a.K = K; a.mode = RAW; a.c = c;
    run(a, x, threads);
    return 0;
}

// y (M, N) <- int8_epilogue(x . w^T, xs, ws, bias, res, ydt, gelu) (int8mm.cpp) without the int32 result in memory:
// each block's epilogue runs on it as it leaves the tiles. Returns 0, or -1 where the tiles (or AVX512) cannot run.
int lfm2vl_int8_linear_amx(const int8_t* x, const int8_t* w, const float* xs, const float* ws, const float* bias,
                           const void* res, void* y, int ydt, int gelu, int64_t M, int64_t N, int64_t K,
                           int threads) {
    if (!amx_ready()) return -1;
    if (M <= 0 || N <= 0) return 0;
    MmArgs a{};
    a.w = w; a.M = M; a.N = N; a.K = K; a.mode = LINEAR;
    a.epi = Epilogue{xs, ws, bias, res, y, ydt, gelu, N};
    run(a, x, threads);
    return 0;
}

// y (M, N) <- x . w^T + bias (then GELU's tanh form when gelu) + res for bf16 x (M, K) and w (N, K), fp32 sums
// rounded once to y's dtype (ydt 0 fp32, 1 bf16); bias (N) fp32 or NULL, res (M, N) in y's dtype or NULL. The GELU
// applies to the sum rounded to bf16, as after torch's bf16 product (gemm.py). Returns 0, or -1 where the bf16 tiles
// cannot run.
int lfm2vl_bf16_linear_amx(const uint16_t* x, const uint16_t* w, const float* bias, const void* res, void* y,
                           int ydt, int gelu, int64_t M, int64_t N, int64_t K, int threads) {
    if (!amx_ready(true)) return -1;
    if (M <= 0 || N <= 0) return 0;
    MmArgs a{};
    a.bf16 = true; a.w = (const int8_t*)w; a.M = M; a.N = N; a.K = 2 * K; a.mode = LINEAR;
    a.epi = Epilogue{NULL, NULL, bias, res, y, ydt, gelu, N};
    run(a, (const int8_t*)x, threads);
    return 0;
}

// h (M, N) bf16 <- the SwiGLU gate of x's int8 products with w1 (gate) and w3 (up): the h that swiglu_int8
// (int8mm.cpp) quantizes, here left for quantize_rows. Returns 0, or -1 where the tiles cannot run.
int lfm2vl_swiglu_h_amx(const int8_t* x, const int8_t* w1, const int8_t* w3, const float* xs, const float* s1,
                        const float* s3, const float* b1, const float* b3, uint16_t* h, int64_t M, int64_t N,
                        int64_t K, int threads) {
    if (!amx_ready()) return -1;
    if (M <= 0 || N <= 0) return 0;
    MmArgs a{};
    a.w = w1; a.w3 = w3; a.M = M; a.N = N; a.K = K; a.mode = GATE;
    a.gate = Gate{xs, s1, s3, b1, b3};
    a.h = h;
    run(a, x, threads);
    return 0;
}

// h (M, N) bf16 <- silu(x . w1^T + b1) * (x . w3^T + b3) for bf16 x (M, K), w1 and w3 (N, K): each product's fp32
// sums plus its bias rounded to bf16, then silu rounded and the product rounded, as a bf16 F.linear, F.linear and
// prefill.cpp's swiglu round them. b1, b3 (N) fp32 or NULL. Returns 0, or -1 where the bf16 tiles cannot run.
int lfm2vl_swiglu_h_bf16_amx(const uint16_t* x, const uint16_t* w1, const uint16_t* w3, const float* b1,
                             const float* b3, uint16_t* h, int64_t M, int64_t N, int64_t K, int threads) {
    if (!amx_ready(true)) return -1;
    if (M <= 0 || N <= 0) return 0;
    MmArgs a{};
    a.bf16 = true; a.w = (const int8_t*)w1; a.w3 = (const int8_t*)w3; a.M = M; a.N = N; a.K = 2 * K; a.mode = GATE;
    a.gate = Gate{NULL, NULL, NULL, b1, b3};
    a.h = h;
    run(a, (const int8_t*)x, threads);
    return 0;
}

}  // extern "C"
