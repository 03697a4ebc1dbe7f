#!/usr/bin/env bash
# The performance table of docs/performance.md: our training path against Unsloth and the plain QLoRA recipe on a
# random-weight Qwen2.5-3B-shaped model (bench.py builds it from its config), 4-bit NF4, LoRA r16 a32 on all seven
# projections, one CUDA GPU, and what each speed-up buys on its own. Any CUDA machine with requirements.txt installed:
#   pip install --no-deps --target /tmp/unsloth_site unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 \
#       datasets==4.8.0 tyro docstring_parser typeguard shtab cut_cross_entropy torchao msgspec hf_transfer
#   UNSLOTH_SITE=/tmp/unsloth_site bash gpu/speed_table.sh            # about 15 minutes on an H200
# Rows land in ${OUT:-runs/speed}/bench.jsonl; the table is printed at the end. PART=1 or PART=2 runs half of it.
set -u
OUT=${OUT:-runs/speed}; mkdir -p "$OUT"
B="python3 bench.py --out $OUT/bench.jsonl ${BENCH_ARGS:-}"
run() { if type within >/dev/null 2>&1; then within $B "$@"; else $B "$@"; fi; }
S2048="--seq 2048 --batch 1 --accum 8 --steps 2"
if [ "${PART:-1}" != 2 ]; then
run --cases matmul,unsloth,sft,sft_baseline $S2048                  # side by side at 1 x 8; sft = our default
run --cases sft $S2048 --kernels none                               # our path without speed-ups
run --cases sft $S2048 --lora_dropout 0                             # LoRA dropout 0 (Unsloth's setting)
run --cases unsloth_auto,sft_auto $S2048 --cap_gb 8                 # each at its best micro-batch under 8 GiB
run --cases sft_auto $S2048 --cap_gb 8 --kernels none
run --cases unsloth --seq 16384 --batch 1 --accum 1 --steps 2 --cap_gb 8
run --cases sft --seq 16384 --batch 1 --accum 1 --steps 2 --cap_gb 8 --activation_offloading
run --cases sft --seq 32768 --batch 1 --accum 1 --steps 1 --cap_gb 8 --activation_offloading
fi
if [ "${PART:-1}" != 1 ]; then
run --cases sft $S2048 --kernels liger,compile                     # regional torch.compile on top of Liger
run --cases sft --seq 16384 --batch 1 --accum 1 --steps 2 --cap_gb 8 --activation_offloading --kernels liger
run --cases sft --seq 16384 --batch 1 --accum 1 --steps 2 --cap_gb 8 --activation_offloading --kernels none
run --cases unsloth --seq 32768 --batch 1 --accum 1 --steps 1 --cap_gb 8
run --cases kd,dpo --seq 2048 --batch 1 --accum 1 --steps 2 --cap_gb 8
run --cases kd,dpo --seq 2048 --batch 1 --accum 1 --steps 2 --cap_gb 8 --kernels none
fi
python3 bench.py --table "$OUT/bench.jsonl" | tee "$OUT/bench_table.txt"
