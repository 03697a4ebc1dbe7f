# Device call 1: the issue-8 benchmark on a Qwen2.5-3B-shaped model (random weights, 4-bit), one GPU, one table.
#   run: . gpu/setup.sh && bash gpu/bench_1gpu.sh      (carry .whl .carry/tok .carry/p1)
# Lines run in order of importance, within BUDGET seconds (gpu/setup.sh's `within`).
set -u
B="python3 bench.py --tokenizer .carry/tok --model_cache /tmp/bench_models --out $OUT/bench.jsonl"
export L=$OUT/bench.log BUDGET=${BUDGET:-520}
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
