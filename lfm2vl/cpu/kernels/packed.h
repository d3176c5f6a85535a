// bf16 weights packed losslessly in 12 bits a weight (kind 4): a decode step reads 25% fewer bytes and multiplies
// exactly the same bf16 values.
//
// A bf16 value's high byte (sign and the top 7 exponent bits) takes few values in a weight matrix: the 15 most
// frequent get a 4-bit code, and code 15 marks an escape whose high byte is stored apart. The low byte (the last
// exponent bit and the 7 mantissa bits) is kept as it is. One packed (N, K) matrix (K a multiple of 64) is one
// byte buffer:
//   [0, 64)              the code table: byte c (c < 15) is code c's high byte, repeated in four 16-byte lanes
//   [64, 64 + 4 (N + 1)) int32: row n's first escape among the escape bytes (entry N: how many there are)
//   lo    (64-aligned)   N K bytes, the low bytes, in blocks of 64 weights stored in unpack order (below)
//   codes                N K / 2 bytes: byte j of a block's 32 holds the code of position j (low nibble) and of
//                        position 32 + j (high nibble)
//   escapes              the escaped high bytes, in the order of (row, position)
// Position p of a block holds element p12_elem(p) (p = 16 L + i: 8 L + i for i < 8, 32 + 8 L + i - 8 otherwise), so
// that interleaving the low and high bytes per 128-bit lane (VPUNPCKLBW / VPUNPCKHBW) yields elements 0..31 and
// 32..63 of the block in order. The codes become high bytes by VPSHUFB against the table, the escapes by
// VPEXPANDB (AVX512-VBMI2).
//
// packed.cpp multiplies with and unpacks the format, packed_pack.cpp makes it.
#pragma once
#include <stdint.h>

#include "gemv.h"

#define T_P12 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi,avx512vbmi2,fma")))

static const int P12_ESCAPE = 15;

// The element of a block that position p holds.
static constexpr inline int p12_elem(int p) {
    const int L = p / 16, i = p % 16;
    return i < 8 ? 8 * L + i : 32 + 8 * L + i - 8;
}

static inline int64_t p12_lo_offset(int64_t N) { return (64 + 4 * (N + 1) + 63) / 64 * 64; }

// Rows a pool chunk of packing or unpacking takes: ~256 KiB of bf16 weights.
static inline int64_t p12_chunk_rows(int64_t K) { return (256 * 1024) / (K * 2) > 1 ? (256 * 1024) / (K * 2) : 1; }

struct P12 {
    const uint8_t* table;
    const int32_t* row_esc;
    const uint8_t* lo;
    const uint8_t* codes;
    const uint8_t* esc;
};

static inline P12 p12_view(const void* buf, int64_t N, int64_t K) {
    const uint8_t* b = (const uint8_t*)buf;
    const uint8_t* lo = b + p12_lo_offset(N);
    return P12{b, (const int32_t*)(b + 64), lo, lo + N * K, lo + N * K + N * K / 2};
}

// Rows [n0, n1) as bf16 into out, row n at out + (n - n0) K (the AVX512 path: p12_fast()).
void p12_unpack_rows(const P12& v, int64_t n0, int64_t n1, int64_t K, uint16_t* out);
