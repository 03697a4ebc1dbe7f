# Device call 1: the issue-8 benchmark on a Qwen2.5-3B-shaped model (random weights, 4-bit), one GPU.
#   run: . gpu/setup.sh && bash gpu/bench_1gpu.sh      (carry .whl .carry/tok .carry/p1)
set -u
B="python3 bench.py --tokenizer .carry/tok --model_cache /tmp/bench_models --out $OUT/bench.jsonl"
L=$OUT/bench.log
$B --cases matmul,sft_baseline,sft,sft_auto --seq 2048 --batch 1 --accum 8 --steps 2 >>$L 2>&1
$B --cases sft --seq 16384 --batch 1 --accum 1 --steps 2 --cap_gb 8 >>$L 2>&1
$B --cases kd,dpo --seq 2048 --batch 1 --accum 1 --steps 2 --cap_gb 8 >>$L 2>&1
$B --cases score --seq 2048 --score_examples 256 >>$L 2>&1
$B --cases sft,kd,dpo --seq 1024 --batch 1 --accum 2 --steps 2 --cap_gb 8 >>$L 2>&1
$B --cases dpo --seq 512 --batch 1 --accum 4 --steps 2 --cap_gb 8 >>$L 2>&1
$B --cases sft_baseline,sft --seq 4096 --batch 1 --accum 2 --steps 2 >>$L 2>&1
python3 bench.py --table $OUT/bench.jsonl | tee $OUT/bench_table.txt
