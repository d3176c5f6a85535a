// A minimal work-sharing thread pool for gemv.cpp: `pool_run(fn, ctx, chunks, threads)` runs fn(ctx, i) for
// i in [0, chunks) on the calling thread plus up to threads-1 helper threads, and returns when all are done.
//
// Chunks are claimed from one 64-bit atomic (generation << 32 | next index). The caller claims chunks too and
// only waits for chunks a helper has already started, never for a helper that has not woken up (an OpenMP
// barrier would wait a whole scheduler time slice when another process holds that core).
// Helpers spin ~0.2 ms after a job (decode issues products back to back), then sleep on a condition variable; after
// a job run with linger = false they sleep at once: the passes of a prefill sit between torch's OpenMP products,
// whose threads need the cores a spinning helper would hold.
// One job at a time: a second thread calling while a job runs computes its product alone.
#pragma once
#include <stdint.h>

typedef void (*pool_fn)(const void* ctx, int64_t chunk);

void pool_run(pool_fn fn, const void* ctx, int64_t chunks, int threads, bool linger = true);
