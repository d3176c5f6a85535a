// A minimal work-sharing thread pool for gemv.cpp: `pool_run(fn, ctx, chunks, threads)` runs fn(ctx, i) for
// i in [0, chunks) on the calling thread plus up to threads-1 helper threads, and returns when all are done.
//
// The chunks are cut into one contiguous range per participant: each claims its own range's chunks in order, then
// the others' from their ends (pool.cpp). The caller claims chunks too and only waits for chunks a helper has
// already started, never for a helper that has not woken up (an OpenMP barrier would wait a whole scheduler time
// slice when another process holds that core).
// Helpers spin ~0.2 ms after a job (decode issues products back to back), then sleep on a condition variable.
// linger = false marks a pass of a prefill, between torch's OpenMP products: it runs on torch's own OpenMP team
// (GOMP_parallel of the loaded libgomp; no second set of threads on the same cores), or where torch runs another
// runtime on the pool, whose helpers then sleep at once.
// One job at a time: a second thread calling while a job runs computes its product alone.
#pragma once
#include <stdint.h>

typedef void (*pool_fn)(const void* ctx, int64_t chunk);

void pool_run(pool_fn fn, const void* ctx, int64_t chunks, int threads, bool linger = true);
