#!/usr/bin/env bash
# The README's speed table in one run, one command after another (each engine in its own default environment):
# lfm2vl bench at 450M (three scenarios, 3 interleaved rounds) and 3B (one round), decode and one-image time to first
# token beside llama.cpp at both sizes, and the server's throughput. Run it on an otherwise idle machine.
#
#   bash scripts/bench_readme.sh LLAMA_BIN GGUF_450M GGUF_3B OUT
#
# LLAMA_BIN: llama.cpp's build/bin (llama-bench, llama-mtmd-cli); GGUF_450M / GGUF_3B: folders holding lm-bf16.gguf,
# lm-q8_0.gguf, lm-q4_0.gguf and mmproj-bf16.gguf of the bench's random checkpoints (~/.cache/lfm2vl/bench/random-*;
# `lfm2vl bench --shape 3B` writes the 3B one), converted as ../shared/llamacpp/RECIPE.md describes. OUT: a folder
# for the outputs (text and JSON). Takes ~35 minutes on 2 cores.
set -euo pipefail
if [ $# -ne 4 ]; then
    echo "usage: bash scripts/bench_readme.sh LLAMA_BIN GGUF_450M GGUF_3B OUT (see the top of this script)" >&2
    exit 2
fi
BIN=$1; G450=$2; G3B=$3; OUT=$4
for f in "$BIN/llama-bench" "$BIN/llama-mtmd-cli" "$G450"/{lm-bf16,lm-q8_0,lm-q4_0,mmproj-bf16}.gguf \
         "$G3B"/{lm-bf16,lm-q8_0,lm-q4_0,mmproj-bf16}.gguf; do
    [ -e "$f" ] || { echo "bench_readme.sh: $f does not exist" >&2; exit 2; }
done
cd "$(dirname "$0")/.."
PY=.venv/bin/python
M3B=$HOME/.cache/lfm2vl/bench/random-3B-seed0
mkdir -p "$OUT"
$PY -m lfm2vl bench --shape 450M --bf16-packed --int8 --int4 --int8-vision --rounds 3 \
    --scenarios text512,img512,img1024x768 --json "$OUT/bench_450m.json" > "$OUT/bench_450m.txt" 2>&1
$PY scripts/bench_vs_llamacpp.py --llama-bench "$BIN/llama-bench" --gguf-bf16 "$G450/lm-bf16.gguf" \
    --gguf-q8 "$G450/lm-q8_0.gguf" --gguf-q4 "$G450/lm-q4_0.gguf" --bf16-packed --rounds 6 > "$OUT/decode_450m.txt" 2>&1
for size in 512x512 1024x768; do
    $PY scripts/bench_ttft_vs_llamacpp.py --mtmd-cli "$BIN/llama-mtmd-cli" --gguf "$G450/lm-bf16.gguf" \
        --mmproj "$G450/mmproj-bf16.gguf" --size $size --rounds 3 > "$OUT/ttft_450m_$size.txt" 2>&1
done
$PY -m lfm2vl bench --shape 3B --bf16-packed --int8 --int4 --int8-vision --scenarios text512,img512 --reps 1 \
    --warmup 1 --new-tokens 32 --json "$OUT/bench_3b.json" > "$OUT/bench_3b.txt" 2>&1
# at 3B one process per format pair: with every format loaded in one process (~13 GB of weights beside llama.cpp's
# files in the page cache) lfm2vl int4 decoded at 12.2 tok/s where it decodes at 16.7 alone (docs/benchmarks.md)
$PY scripts/bench_vs_llamacpp.py --llama-bench "$BIN/llama-bench" --model "$M3B" --gguf-bf16 "$G3B/lm-bf16.gguf" \
    --bf16-packed --rounds 3 --new-tokens 32 > "$OUT/decode_3b_bf16.txt" 2>&1
for q in q8 q4; do
    $PY scripts/bench_vs_llamacpp.py --llama-bench "$BIN/llama-bench" --model "$M3B" --gguf-bf16 "$G3B/lm-bf16.gguf" \
        --gguf-$q "$G3B/lm-${q}_0.gguf" --rounds 3 --new-tokens 32 > "$OUT/decode_3b_$q.txt" 2>&1
done
$PY scripts/bench_ttft_vs_llamacpp.py --mtmd-cli "$BIN/llama-mtmd-cli" --model "$M3B" --gguf "$G3B/lm-bf16.gguf" \
    --mmproj "$G3B/mmproj-bf16.gguf" --rounds 2 > "$OUT/ttft_3b.txt" 2>&1
$PY scripts/bench_server.py --model "$HOME/.cache/lfm2vl/bench/random-450M-seed0" --dtype bfloat16 \
    > "$OUT/server.txt" 2>&1
tail -n 3 "$OUT"/*.txt
