// AMX tiles, shared by amx.cpp (int8 products) and attn_many.cpp (bf16 attention): whether this process may use
// them, and the one tile configuration both use (all eight tiles 16 rows x 64 bytes).
#pragma once
#include <immintrin.h>

#define T_AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,amx-tile,amx-int8")))
#define T_AMXALL __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-int8,amx-bf16")))
#define T_AMXBF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16")))

// Whether the tiles run here: AMX-TILE plus AMX-INT8 (bf16 = false) or AMX-BF16 (bf16 = true) on the CPU, Linux's
// permission granted (asked once), and not turned off (lfm2vl_set_amx).
bool amx_ready(bool bf16 = false);

// Load the configuration into this thread's tile registers (each thread before its first tile instruction of a call;
// _tile_release() after its last).
void amx_load_config();
