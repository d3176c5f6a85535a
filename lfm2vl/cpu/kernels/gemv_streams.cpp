// One activation row against several weight rows at once (the decode of one sequence), on AVX512 Intel CPUs.
//
// A core keeps only so many cache-line reads in flight on one sequential stream: on the Sapphire Rapids VM of
// 2026-12-02 a product streamed its weights at ~15 GB/s over two threads, whatever the instructions did with them,
// where eight streams per thread read 21-24 GB/s. So each chunk of rows is cut into equal parts and step t reads row
// t of every part together: several streams, each sequential, far enough apart to be separate streams to the
// prefetchers. bf16 reads eight; int8, whose rows take more instructions per byte, four (on the AMX Xeon VM of
// 2026-12-04, in-process A/B against eight: 450M int8 decode +3.7-4.4%, 3B +4.5-4.7%; six +1.2-4.7%; bf16 on four
// or six: within 0.3%). int8 sums equal the one-row kernel's (gemv_vnni.cpp) exactly: integers per block, blocks
// in the same order; bf16 sums are the same fp32 products added in another order (gemv.cpp's row_bf16_dp). int4
// reads two rows at a time (gemv_vnni.cpp's rows_q4_streams): its product does still more work per byte. Only on
// Intel CPUs (gemv.cpp's row_streams): on an AMD Zen 5 VM one stream with a software prefetch reads 20-24% faster.
#include <immintrin.h>
#include "gemv.h"
#include "pool.h"
#include <stdint.h>

#include <vector>

static const int STREAMS = 8;       // bf16 rows, and the read probe's streams per thread
static const int INT8_STREAMS = 4;  // int8 rows: see rows_q16_streams

// bf16 weights x bf16 x: rows w[0..7], 64 weights per step on two accumulators each.
T_AVX512BF16 static inline void bf16_rows8(const uint16_t* const* w, const uint16_t* X, int64_t K, const char* end,
                                           float* out) {
    __m512 acc[STREAMS][2];
    for (int s = 0; s < STREAMS; s++) acc[s][0] = acc[s][1] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        const __m512bh x0 = (__m512bh)_mm512_loadu_si512(X + k), x1 = (__m512bh)_mm512_loadu_si512(X + k + 32);
        for (int s = 0; s < STREAMS; s++) {
            const char* p = (const char*)(w[s] + k);
            prefetch_line(p + PF_BYTES, end);
            prefetch_line(p + PF_BYTES + 64, end);
            acc[s][0] = _mm512_dpbf16_ps(acc[s][0], (__m512bh)_mm512_loadu_si512(w[s] + k), x0);
            acc[s][1] = _mm512_dpbf16_ps(acc[s][1], (__m512bh)_mm512_loadu_si512(w[s] + k + 32), x1);
        }
    }
    for (; k < K; k += 32) {
        const __mmask32 mk = K - k >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << (K - k)) - 1u);
        const __m512bh x0 = (__m512bh)_mm512_maskz_loadu_epi16(mk, X + k);
        for (int s = 0; s < STREAMS; s++)
            acc[s][0] = _mm512_dpbf16_ps(acc[s][0], (__m512bh)_mm512_maskz_loadu_epi16(mk, w[s] + k), x0);
    }
    for (int s = 0; s < STREAMS; s++) out[s] = _mm512_reduce_add_ps(_mm512_add_ps(acc[s][0], acc[s][1]));
}

// int8 weights x x quantized to int16 per block (quantize_x_q16): rows w[0..NS-1], one int32 accumulator per row
// and block, as row_q16_vnni sums them.
template <int NS>
T_AVX512VNNI static inline void q16_rows(const int8_t* const* w, const int16_t* Q, const float* D, int64_t K,
                                         const char* end, float* out) {
    const int64_t nb = (K + Q16_BLOCK - 1) / Q16_BLOCK;
    __m512 facc[NS];
    for (int s = 0; s < NS; s++) facc[s] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const int64_t k0 = b * Q16_BLOCK, k1 = k0 + Q16_BLOCK < K ? k0 + Q16_BLOCK : K;
        __m512i acc[NS];
        for (int s = 0; s < NS; s++) acc[s] = _mm512_setzero_si512();
        for (int64_t k = k0; k < k1; k += 64) {  // K is a multiple of 32: a block may end half way through a step
            const bool two = k + 64 <= k1;
            const __m512i x0 = _mm512_loadu_si512(Q + k), x1 = two ? _mm512_loadu_si512(Q + k + 32) : x0;
            for (int s = 0; s < NS; s++) {
                prefetch_line((const char*)(w[s] + k) + PF_BYTES, end);
                acc[s] = _mm512_dpwssd_epi32(
                    acc[s], _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(w[s] + k))), x0);
                if (two)
                    acc[s] = _mm512_dpwssd_epi32(
                        acc[s], _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(w[s] + k + 32))), x1);
            }
        }
        const __m512 d = _mm512_set1_ps(D[b]);
        for (int s = 0; s < NS; s++) facc[s] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[s]), d, facc[s]);
    }
    for (int s = 0; s < NS; s++) out[s] = _mm512_reduce_add_ps(facc[s]);
}

T_AVX512BF16 void rows_bf16_streams(const uint16_t* W, const uint16_t* X, void* Y, const float* bias, int64_t n0,
                                    int64_t n1, int64_t K, int ydt) {
    const char* end = (const char*)(W + n1 * K);
    by_parts<STREAMS>(n0, n1, nullptr, bias, Y, ydt, [&](const int64_t* n, int count, float* out) {
        const uint16_t* w[STREAMS];  // a row left over: the same row eight times, its sum once
        for (int s = 0; s < STREAMS; s++) w[s] = W + n[count == 1 ? 0 : s] * K;
        bf16_rows8(w, X, K, end, out);
    });
}

T_AVX512VNNI void rows_q16_streams(const int8_t* W, const float* S, const int16_t* Xh, const float* Xd, void* Y,
                                   const float* bias, int64_t n0, int64_t n1, int64_t K, int ydt) {
    const char* end = (const char*)(W + n1 * K);
    by_parts<INT8_STREAMS>(n0, n1, S, bias, Y, ydt, [&](const int64_t* n, int count, float* out) {
        const int8_t* w[INT8_STREAMS];
        for (int s = 0; s < INT8_STREAMS; s++) w[s] = W + n[count == 1 ? 0 : s] * K;
        q16_rows<INT8_STREAMS>(w, Xh, Xd, K, end, out);
    });
}

// ---------------------------------------------------------------- the bench's read-bandwidth probe
// A plain read of a buffer, eight streams per thread as above (chunks of 32 MiB on the pool's threads, each read as
// eight interleaved eighths), so the machine's read bandwidth is measured with the access pattern that reaches it;
// torch's one-stream reductions stop ~30% short on some CPUs.
struct ReadArgs {
    const uint64_t* p;
    int64_t words, per_chunk;
    uint64_t* sums;  // one per chunk: the XOR of its words, so the reads are not optimized away
};

static void read_chunk(const void* ctx, int64_t c) {
    const ReadArgs& a = *(const ReadArgs*)ctx;
    const int64_t w0 = c * a.per_chunk, len = a.words - w0 < a.per_chunk ? a.words - w0 : a.per_chunk;
    const int64_t part = len / STREAMS / 8 * 8;
    uint64_t x[STREAMS][8] = {};
    for (int64_t i = 0; i < part; i += 8)
        for (int s = 0; s < STREAMS; s++)
            for (int j = 0; j < 8; j++) x[s][j] ^= a.p[w0 + s * part + i + j];
    uint64_t t = 0;
    for (int64_t i = w0 + STREAMS * part; i < w0 + len; i++) t ^= a.p[i];
    for (int s = 0; s < STREAMS; s++)
        for (int j = 0; j < 8; j++) t ^= x[s][j];
    a.sums[c] = t;
}

extern "C" uint64_t lfm2vl_read(const void* buf, int64_t bytes, int threads) {
    ReadArgs a{(const uint64_t*)buf, bytes / 8, (int64_t)32 << 17, nullptr};
    const int64_t chunks = (a.words + a.per_chunk - 1) / a.per_chunk;
    std::vector<uint64_t> sums(chunks);
    a.sums = sums.data();
    pool_run(read_chunk, &a, chunks, threads);
    uint64_t t = 0;
    for (uint64_t v : sums) t ^= v;
    return t;
}
