// The work-sharing thread pool of lfm2vl's kernels (see pool.h). One definition for the whole library: every
// product and attention call of gemv.cpp, attn.cpp and decode.cpp shares these helper threads.
#include "pool.h"
#include <immintrin.h>
#include <stdint.h>

#include <dlfcn.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>


namespace pool_detail {
struct Job {
    pool_fn fn;
    const void* ctx;
    int64_t total;
    int helpers;  // helpers with index < helpers take part
    int parts;    // the chunks are cut into this many ranges: the caller's (0) and helper i's (i + 1)
};
static Job jobs[2];                           // indexed by generation parity
static std::atomic<uint64_t> counter{0};      // generation << 32: a new value publishes a new job

// Each participant's range of chunks, claimed from the front by its owner and from the back by the others once
// theirs are done: a thread reads one contiguous stretch of a weight matrix, and nobody waits for a participant that
// never wakes up. Two threads taking turns at one counter would read interleaved 256 KiB chunks, which stream slower
// than two contiguous halves (docs/cpu.md has the figures). One word per range: the generation's low
// GEN_BITS, the next chunk and the end, so a claim of an older job's range fails.
const int MAX_PARTS = 64, GEN_BITS = 20, POS_BITS = 22;
const uint64_t POS_MASK = (1ull << POS_BITS) - 1, GEN_MASK = (1ull << GEN_BITS) - 1;
struct alignas(64) Range {
    std::atomic<uint64_t> v{0};
};
static Range ranges[MAX_PARTS];

static inline uint64_t pack(uint32_t gen, int64_t next, int64_t end) {
    return ((uint64_t)(gen & GEN_MASK) << (2 * POS_BITS)) | ((uint64_t)next << POS_BITS) | (uint64_t)end;
}

// Claim one chunk of range q of generation gen: its first (front) or its last; false when none is left.
static bool claim(int q, uint32_t gen, bool front, int64_t* chunk) {
    for (;;) {
        uint64_t v = ranges[q].v.load(std::memory_order_acquire);
        if ((v >> (2 * POS_BITS)) != (gen & GEN_MASK)) return false;
        const int64_t next = (int64_t)((v >> POS_BITS) & POS_MASK), end = (int64_t)(v & POS_MASK);
        if (next >= end) return false;
        const uint64_t nv = front ? pack(gen, next + 1, end) : pack(gen, next, end - 1);
        if (ranges[q].v.compare_exchange_weak(v, nv, std::memory_order_acq_rel)) {
            *chunk = front ? next : end - 1;
            return true;
        }
    }
}
static std::atomic<int64_t> done{0};          // chunks finished in the current generation
static std::atomic<int> sleepers{0};
static std::atomic<bool> busy{false};
static std::atomic<bool> linger_after{true};  // whether helpers spin for a next job after the current one
// Never destroyed (leaked on purpose): at process exit, glibc's condition-variable destructor would wait for the
// helpers still sleeping on it, and the process would hang instead of exiting.
static std::mutex& mu = *new std::mutex;
static std::condition_variable& cv = *new std::condition_variable;
static int n_helpers = 0;
static std::mutex& spawn_mu = *new std::mutex;

static inline uint32_t gen_of(uint64_t v) { return (uint32_t)(v >> 32); }

// Run chunks of generation `gen`: the participant's own range from the front, then the others' from the back, until
// none is left (a claim fails once a newer job replaced this one, so a stale copy of the job is never run).
static void run_chunks(uint32_t gen, int helper) {
    if (gen_of(counter.load(std::memory_order_acquire)) != gen) return;
    const Job j = jobs[gen & 1];  // stable while the counter still shows `gen` (see pool_run)
    if (helper >= j.helpers) return;
    const int p = helper + 1;
    int64_t c;
    for (int k = 0; k < j.parts; k++) {
        const int q = (p + k) % j.parts;
        while (claim(q, gen, k == 0, &c)) {
            j.fn(j.ctx, c);
            done.fetch_add(1, std::memory_order_release);
        }
    }
}

static void helper_main(int index) {
    uint32_t seen = gen_of(counter.load());
    for (;;) {
        auto t0 = std::chrono::steady_clock::now();
        const bool linger = linger_after.load(std::memory_order_relaxed);
        int spins = 0;
        while (gen_of(counter.load(std::memory_order_acquire)) == seen) {
            _mm_pause();
            if (linger && ++spins % 256) continue;
            if (linger && std::chrono::steady_clock::now() - t0 < std::chrono::microseconds(200)) continue;
            std::unique_lock<std::mutex> lk(mu);
            sleepers.fetch_add(1);
            cv.wait(lk, [&] { return gen_of(counter.load()) != seen; });
            sleepers.fetch_sub(1);
        }
        seen = gen_of(counter.load(std::memory_order_acquire));
        run_chunks(seen, index);
    }
}

static void ensure_helpers(int n) {
    if (n <= n_helpers) return;
    std::lock_guard<std::mutex> lk(spawn_mu);
    while (n_helpers < n) {
        std::thread(helper_main, n_helpers).detach();
        n_helpers++;
    }
}
}  // namespace pool_detail

namespace omp_detail {
// torch's own OpenMP runtime (libgomp.so.1, already loaded by torch), reached through its stable entry point
// GOMP_parallel; NULL when torch runs another runtime.
typedef void (*gomp_parallel_fn)(void (*)(void*), void*, unsigned, unsigned);

static gomp_parallel_fn gomp_parallel() {
    static const gomp_parallel_fn f = [] {
        void* h = dlopen("libgomp.so.1", RTLD_NOW | RTLD_NOLOAD);
        return h ? (gomp_parallel_fn)dlsym(h, "GOMP_parallel") : (gomp_parallel_fn) nullptr;
    }();
    return f;
}

struct Team {
    pool_fn fn;
    const void* ctx;
    int64_t chunks;
    std::atomic<int64_t> next{0};
};

static void team_body(void* p) {
    Team& t = *(Team*)p;
    for (int64_t i; (i = t.next.fetch_add(1, std::memory_order_relaxed)) < t.chunks;) t.fn(t.ctx, i);
}
}  // namespace omp_detail

void pool_run(pool_fn fn, const void* ctx, int64_t chunks, int threads, bool linger) {
    using namespace pool_detail;
    if (!linger && threads > 1 && chunks > 1 && omp_detail::gomp_parallel()) {
        // a prefill pass between torch's OpenMP products: on torch's own team, whose threads would otherwise spin
        // beside the pool's helpers on the same cores
        omp_detail::Team t;
        t.fn = fn; t.ctx = ctx; t.chunks = chunks;
        omp_detail::gomp_parallel()(omp_detail::team_body, &t, (unsigned)threads, 0);
        return;
    }
    bool expected = false;
    if (threads > MAX_PARTS) threads = MAX_PARTS;
    if (threads <= 1 || chunks <= 1 || chunks > (int64_t)POS_MASK || !busy.compare_exchange_strong(expected, true)) {
        for (int64_t i = 0; i < chunks; i++) fn(ctx, i);
        return;
    }
    ensure_helpers(threads - 1);
    uint32_t gen = gen_of(counter.load()) + 1;
    // Every chunk of the previous job is done, so no helper can still succeed in claiming one of it; a helper
    // still in the previous job fails its claims once the ranges carry `gen`.
    jobs[gen & 1] = Job{fn, ctx, chunks, threads - 1, threads};
    for (int q = 0; q < threads; q++)
        ranges[q].v.store(pack(gen, chunks * q / threads, chunks * (q + 1) / threads), std::memory_order_relaxed);
    linger_after.store(linger, std::memory_order_relaxed);
    done.store(0);
    counter.store((uint64_t)gen << 32);  // seq_cst: pairs with the sleepers check below
    if (sleepers.load() > 0) {
        std::lock_guard<std::mutex> lk(mu);
        cv.notify_all();
    }
    run_chunks(gen, -1);
    while (done.load(std::memory_order_acquire) < chunks) _mm_pause();
    busy.store(false, std::memory_order_release);
}
