#!/usr/bin/env bash
# Memory and speed of the trainers (SFT, KD, DPO) and the label-ranking scorer on a random-weight Qwen2.5-3B-shaped
# model (4-bit), one CUDA GPU, one table (docs/performance.md, "Trainers on one GPU"). Any CUDA machine with
# requirements.txt installed:   bash gpu/bench_1gpu.sh        (rows in $OUT, default runs/gpu)
. "$(dirname "$0")/env.sh"
B="python3 bench.py --tokenizer ${TOKENIZER:-smollm2-135m} --model_cache ${MODEL_CACHE:-/tmp/bench_models} --out $OUT/bench.jsonl"
b() { within $B "$@" >>$L 2>&1; }
b --cases matmul,sft_baseline,sft,sft_auto --seq 2048 --batch 1 --accum 8 --steps 2
b --cases sft --seq 16384 --batch 1 --accum 1 --steps 2 --cap_gb 8 --activation_offloading
b --cases kd,dpo --seq 2048 --batch 1 --accum 1 --steps 2 --cap_gb 8
b --cases score --seq 2048 --score_examples 256
b --cases sft,kd,dpo --seq 1024 --batch 1 --accum 2 --steps 2 --cap_gb 8
b --cases dpo --seq 512 --batch 1 --accum 4 --steps 2 --cap_gb 8
b --cases sft_baseline,sft --seq 4096 --batch 1 --accum 2 --steps 2
b --cases sft --seq 16384 --batch 1 --accum 1 --steps 2 --cap_gb 8
python3 bench.py --table $OUT/bench.jsonl | tee $OUT/bench_table.txt
echo "[$(( $(date +%s) - T0 ))s] done" >>$L
