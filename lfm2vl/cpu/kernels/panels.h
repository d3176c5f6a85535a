// Weight rows re-laid for the int8 products of many rows (amx.cpp on tiles, vnni_mm.cpp in AVX512-VNNI registers):
// both multiply 4 bytes of K of 16 output columns at a time, so both read the same packed panels.
//
// A panel is 32 output columns over 64-byte steps of K: per step two 1 KB blocks (columns n0..n0+15, then
// n0+16..n0+31), whose 64-byte row r holds, for each of the 16 columns, its bytes 4r .. 4r + 3 of the step (an AMX
// tile of w, or one register of VPDPBUSD's signed operand). Columns past N and bytes past K are zeros.
#pragma once
#include <immintrin.h>
#include <stdint.h>

#include <vector>

#include "gemv.h"

const int64_t PANEL = 32;  // output columns of a packed panel: two tiles / registers of 16

// The 16 x 16 dword transpose of r[0..15] in place: r[j] dword i <- old r[i] dword j.
T_AVX512 inline void transpose16(__m512i* r) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
        r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
        r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
    }
}

// The panel of w's rows [n0, n0 + 32) (w: (N, K) bytes, row stride K) over the 64-byte steps [kb0, kb1) of K; step
// kb at out + (kb - kb0) * 2048 (64-byte aligned).
T_AVX512 inline void pack_panel(const int8_t* w, int64_t N, int64_t K, int64_t n0, int64_t kb0, int64_t kb1,
                                int8_t* out) {
    for (int64_t kb = kb0; kb < kb1; kb++) {
        const int64_t k0 = kb * 64, left = K - k0;
        const __mmask64 mk = left >= 64 ? ~0ull : (1ull << left) - 1;
        for (int h = 0; h < 2; h++) {
            __m512i r[16];
            for (int i = 0; i < 16; i++) {
                const int64_t n = n0 + 16 * h + i;
                r[i] = n < N ? _mm512_maskz_loadu_epi8(mk, w + n * K + k0) : _mm512_setzero_si512();
            }
            transpose16(r);
            int8_t* dst = out + ((kb - kb0) * 2 + h) * 1024;
            for (int i = 0; i < 16; i++) _mm512_store_si512((__m512i*)(dst + 64 * i), r[i]);
        }
    }
}

// How a product of M rows over N output columns is cut into the pool's chunks of work, for the register kernels
// (vnni_mm.cpp, bf16_mm.cpp): each chunk makes a group of panels and runs its part of the rows over them. A group holds
// as many panels as fit in `budget` bytes at `per` bytes each, at most `most`, in whole pairs (a lone panel runs at
// half the registers); groups of two where groups of `most` would leave the threads unequal shares (36 panels: 9
// groups of four on 2 threads ran ~10% slower than 18 of two). Where there are fewer groups than two per thread the
// rows are cut into parts too (each part makes its group's panels again), each part at least ~8 blocks of mr rows.
struct ChunkPlan {
    int64_t M = 0, N = 0, group = 1, groups = 0, mparts = 1;

    ChunkPlan() = default;
    ChunkPlan(int64_t M_, int64_t N_, int64_t per, int64_t budget, int64_t most, int64_t mr, int threads)
        : M(M_), N(N_) {
        group = budget / per < most ? budget / per : most;
        if (group > 1) group &= ~(int64_t)1;
        if (group < 1) group = 1;
        const int64_t panels = (N + PANEL - 1) / PANEL;
        if (group == most && (panels + most - 1) / most % threads) group = 2;
        groups = (panels + group - 1) / group;
        mparts = groups >= 2 * threads ? 1 : (2 * threads + groups - 1) / groups;
        const int64_t blocks = (M + 8 * mr - 1) / (8 * mr);
        if (mparts > blocks) mparts = blocks < 1 ? 1 : blocks;
    }

    int64_t chunks() const { return groups * mparts; }

    // Chunk c's first panel p0 and panel count np, and its rows [m0, m1).
    void chunk(int64_t c, int64_t& p0, int64_t& np, int64_t& m0, int64_t& m1) const {
        const int64_t panels = (N + PANEL - 1) / PANEL, rows = (M + mparts - 1) / mparts;
        p0 = c / mparts * group;
        np = panels - p0 < group ? panels - p0 : group;
        m0 = c % mparts * rows;
        m1 = m0 + rows < M ? m0 + rows : M;
    }
};

// A per-thread buffer, 64-byte aligned, grown on demand (packed panels, block sums).
struct Scratch {
    std::vector<int8_t> raw;
    int8_t* get(int64_t bytes) {
        if ((int64_t)raw.size() < bytes + 64) raw.resize(bytes + 64);
        return (int8_t*)(((uintptr_t)raw.data() + 63) & ~(uintptr_t)63);
    }
};
