// Dropout for training, on the pool's threads: y = x * keep / (1 - p), the keep mask drawn from a counter-based
// hash of (seed, element index), so the backward pass regenerates the forward's mask from the seed alone (no mask
// tensor is stored) and any thread may draw any element.
//
// Why: torch draws the mask with its sequential CPU generator (bernoulli_, a few ns per element) and multiplies in
// a second and third pass; here one pass reads x and writes y. Plain C++ that the compiler vectorizes
// (-O3 -march=native): 32-bit multiplies, shifts and xors only.
// The hash: two rounds of the lowbias32 mixer, each keyed by a 32-bit word of the seed (index bits 32+ go into the
// key), so masks of different seeds are unrelated. An element is kept when the hash's top 24 bits reach
// threshold = round(p * 2^24). Dropped elements are x * 0 (NaN and inf stay NaN, as torch's x * mask).
#include <stdint.h>
#include <string.h>

#include "pool.h"

namespace {

const int64_t SPAN = 32768;  // elements per chunk

struct DropArgs {
    const void* x;
    void* y;
    int64_t n;
    uint64_t seed;
    uint32_t threshold;  // of 2^24
    float scale;         // 1 / (1 - p)
    int bf16;
};

inline uint32_t mix32(uint32_t h) {  // lowbias32 (Chris Wellons' hash-prospector)
    h ^= h >> 16;
    h *= 0x7feb352dU;
    h ^= h >> 15;
    h *= 0x846ca68bU;
    h ^= h >> 16;
    return h;
}

inline uint64_t splitmix64(uint64_t z) {
    z += 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

inline float from_bf16(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

inline uint16_t to_bf16(float f) {  // round to nearest even; NaN stays a quiet NaN
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t r = (u + 0x7fffU + ((u >> 16) & 1U)) >> 16;
    return (f != f) ? (uint16_t)0x7fc0 : (uint16_t)r;
}

// the keep factor of elements [i0, i1) (same 2^32 block): scale or 0
template <typename F>
inline void factors(const DropArgs& a, int64_t i0, int64_t i1, F&& use) {
    const uint64_t key = splitmix64(a.seed ^ splitmix64((uint64_t)i0 >> 32));
    const uint32_t k0 = (uint32_t)key, k1 = (uint32_t)(key >> 32);
    const int32_t th = (int32_t)a.threshold;
    const float scale = a.scale;
    for (int64_t i = i0; i < i1; i++) {
        const uint32_t h = mix32(mix32((uint32_t)i ^ k0) ^ k1);
        use(i, ((int32_t)(h >> 8) >= th) ? scale : 0.0f);
    }
}

void drop(const void* ctx, int64_t c) {
    const DropArgs& a = *(const DropArgs*)ctx;
    const int64_t i0 = c * SPAN, i1 = (i0 + SPAN < a.n) ? i0 + SPAN : a.n;  // SPAN divides 2^32: one key block
    if (a.bf16) {
        const uint16_t* x = (const uint16_t*)a.x;
        uint16_t* y = (uint16_t*)a.y;
        factors(a, i0, i1, [&](int64_t i, float f) { y[i] = to_bf16(from_bf16(x[i]) * f); });
    } else {
        const float* x = (const float*)a.x;
        float* y = (float*)a.y;
        factors(a, i0, i1, [&](int64_t i, float f) { y[i] = x[i] * f; });
    }
}

}  // namespace

// y[i] = x[i] * keep(seed, i) / (1 - p) for i < n; x and y contiguous, both bf16 (bf16 = 1) or both fp32.
// threshold = round(p * 2^24), scale = 1 / (1 - p), both computed by the caller.
extern "C" void lfm2vl_dropout(const void* x, void* y, int64_t n, uint64_t seed, uint32_t threshold, float scale,
                               int bf16, int threads) {
    DropArgs a{x, y, n, seed, threshold, scale, bf16};
    pool_run(drop, &a, (n + SPAN - 1) / SPAN, threads, false);
}

