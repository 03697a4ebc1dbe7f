#!/usr/bin/env bash
# docs/performance.md, "Against Unsloth": our trainers against Unsloth and the plain QLoRA recipe on a random-weight
# Qwen2.5-3B-shaped model (bench.py builds it from its config), 4-bit NF4, LoRA r16 a32 on all seven projections,
# one CUDA GPU, and what each speed-up buys on its own. Any CUDA machine with requirements.txt installed, plus:
#   pip install --no-deps --target /tmp/unsloth_site unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 \
#       datasets==4.8.0 tyro docstring_parser typeguard shtab cut_cross_entropy torchao msgspec hf_transfer
#   UNSLOTH_SITE=/tmp/unsloth_site bash gpu/speed_table.sh          # about 20 minutes on an H200
# Rows land in $OUT/bench.jsonl (default runs/gpu), the table is printed at the end. PART=1 or PART=2 runs one half
# (the two device calls the published table came from); PART=3 the rows not measured yet.
. "$(dirname "$0")/env.sh"
B="python3 bench.py --out $OUT/bench.jsonl --tokenizer ${TOKENIZER:-smollm2-135m} --model_cache ${MODEL_CACHE:-/tmp/bench_models}"
run() { within $B "$@"; }
S="--seq 2048 --batch 1 --accum 8 --steps 2"
L16="--seq 16384 --batch 1 --accum 1 --steps 2 --cap_gb 8"
L32="--seq 32768 --batch 1 --accum 1 --steps 1 --cap_gb 8"
if [ "${PART:-all}" = 1 ] || [ "${PART:-all}" = all ]; then
run --cases matmul,unsloth,sft,sft_baseline $S --kernels liger     # side by side at 1 x 8
run --cases sft $S --kernels none                                  # our path without speed-ups
run --cases unsloth_auto,sft_auto $S --cap_gb 8 --kernels liger    # each at its best micro-batch under 8 GiB
run --cases sft_auto $S --cap_gb 8 --kernels none
fi
if [ "${PART:-all}" = 2 ] || [ "${PART:-all}" = all ]; then
run --cases unsloth $L16
run --cases sft $L16 --activation_offloading --kernels tiled_mlp
run --cases sft $S --kernels compile                               # the default
run --cases sft $L32 --activation_offloading --kernels tiled_mlp
run --cases sft $S --lora_dropout 0 --kernels none
run --cases sft_auto $S --cap_gb 8 --activation_offloading --kernels none
run --cases kd,dpo --seq 2048 --batch 1 --accum 1 --steps 2 --cap_gb 8 --kernels none
fi
if [ "${PART:-all}" = 3 ] || [ "${PART:-all}" = all ]; then       # not measured yet
run --cases kd,dpo --seq 2048 --batch 1 --accum 1 --steps 2 --cap_gb 8 --kernels compile
run --cases unsloth,sft $S --lora_dropout 0                        # one machine: dropout 0 against 0.05 below
run --cases sft $S
run --cases unsloth_auto,sft_auto $S --cap_gb 8 --activation_offloading
run --cases sft $L16 --activation_offloading
run --cases unsloth $L32
fi
python3 bench.py --table "$OUT/bench.jsonl" | tee "$OUT/bench_table.txt"
