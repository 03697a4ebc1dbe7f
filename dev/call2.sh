# DEV: the second device call of this session (rows the first call ran out of time for, and the speed-up ablations)
set -u
run() { within python3 bench.py --out $OUT/bench.jsonl $BENCH_ARGS "$@"; }
S="--seq 2048 --batch 1 --accum 8 --steps 2"
run --cases unsloth --seq 16384 --batch 1 --accum 1 --steps 2 --cap_gb 8
run --cases sft --seq 16384 --batch 1 --accum 1 --steps 2 --cap_gb 8 --activation_offloading
run --cases sft $S --kernels compile
run --cases sft --seq 32768 --batch 1 --accum 1 --steps 1 --cap_gb 8 --activation_offloading
run --cases sft $S --lora_dropout 0 --kernels none
run --cases sft_auto $S --cap_gb 8 --activation_offloading
run --cases kd,dpo --seq 2048 --batch 1 --accum 1 --steps 2 --cap_gb 8
run --cases kd,dpo --seq 2048 --batch 1 --accum 1 --steps 2 --cap_gb 8 --kernels compile
python3 bench.py --table $OUT/bench.jsonl | tee $OUT/bench_table.txt
