// attn_many's int8 scores (attn_q8.cpp): the vision tower's q k^T on AVX512-VNNI integer dot products, for the
// opt-in int8 vision tower.
#pragma once
#include <stdint.h>

// Queries per q8_scores call: attn_many's block of queries (8 x 2 key vectors of 16 = 16 int32 accumulators).
const int Q8_ROWS = 8;

// 32-bit words of a key's int8 head columns (4 a word, the last one zero-padded): the rows of q8_keys' kq.
inline int64_t q8_words(int64_t Dh) { return (Dh + 3) / 4; }

// The keys of one (unit, kv head), S valid rows of Dh bf16 at row stride rs, for q8_scores: each head column's mean
// over the keys is subtracted first (it adds the same amount to all of a query's scores, which the softmax ignores,
// and it is most of a key's size where the keys share an offset), then each key is rounded to int8 with its own
// scale (its largest magnitude / 127). kq (Pq, Ls) words: the word [p][j] holds key j's int8 columns 4p .. 4p + 3
// (Pq = q8_words(Dh)); ksc[j] the key's scale; kcorr[j] 128 times the sum of its int8 columns. Keys S .. Lp - 1 and
// columns past Dh are zero.
void q8_keys(const uint16_t* k, int64_t rs, int64_t S, int64_t Dh, int64_t Lp, int64_t Ls, uint32_t* kq, float* ksc,
             int32_t* kcorr);

// Scores of `rows` (<= Q8_ROWS) queries (bf16 rows of Dh at row stride rs) against keys [0, Lb) (Lb a multiple of
// 32) of q8_keys' layout, times c, into s (row stride Ls; rows past `rows` are 0). Each query is rounded to int8
// with its own scale and offset by 128 (VPDPBUSD multiplies unsigned by signed bytes; kcorr takes the offset out).
void q8_scores(const uint16_t* q, int64_t rs, int rows, int64_t Dh, const uint32_t* kq, const float* ksc,
               const int32_t* kcorr, int64_t Lb, int64_t Ls, float c, float* s);
