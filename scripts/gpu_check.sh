#!/bin/bash
# The GPU checks, as ONE short script for a lent GPU machine (the `device` tool copies the working tree;
# the machine has torch + transformers, no internet). Writes its outputs under $OUT (or ./gpu_out).
#   CUDA parity vs transformers (tiny checkpoint), then lfm2vl bench on CUDA at the 450M shapes: eager lfm2vl and
#   transformers, then lfm2vl with the decode step compiled (CUDA graphs); then fine-tuning on CUDA against the CPU
#   (scripts/gpu_finetune.py).
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
timeout 150 python scripts/gpu_parity.py 2>&1 | tee "$OUT/parity.txt"
timeout 200 python -m lfm2vl bench --shape 450M --device cuda --dtype bf16 --threads 8 --reps 3 \
    --scenarios text512,img512,img1024x768 --json "$OUT/bench_cuda.json" 2>&1 | grep -v '^{' | tee "$OUT/bench.txt"
timeout 200 python -m lfm2vl bench --shape 450M --device cuda --dtype bf16 --threads 8 --reps 3 --compile \
    --engines ours --scenarios text512,img512,img1024x768 --json "$OUT/bench_cuda_compiled.json" 2>&1 \
    | grep -v '^{' | tee "$OUT/bench_compiled.txt"
timeout 240 python scripts/gpu_finetune.py --device cuda --work "$OUT/finetune" 2>&1 | tail -8 | tee "$OUT/finetune.txt"
