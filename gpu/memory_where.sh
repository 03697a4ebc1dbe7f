#!/usr/bin/env bash
# docs/performance.md: what fills the GPU where our runs under the 8 GiB cap run out of memory. bench.py
# --memory_history lists the tensors alive at a case's peak, and at an out-of-memory error those alive then, split
# between the default pool and CUDA graphs' pools, by where they were allocated:
#   8x1: --cuda_graphs --activation_offloading at 2048 x 8 (its capture runs out with 7.59 GiB allocated, 3.33 in the
#        graph's pool: ~1.7 GiB more outside the pool than model, LoRA and optimizer state explain)
#   16k: the same at 16,384 x 1 (its capture runs out with 4.19 GiB in the graph's pool)
#   32k: eager sft with activation offloading and the tiled MLP at 32,768 x 1 (out of memory at 7.80 GiB)
#   32k_ours: the --cuda_graphs micro-step run eagerly (BENCH_GRAPH=0) with our hidden-state offloading and the
#        tiled MLP at 32,768 x 1
# The recording slows the cases: their tokens/s do not count. Any CUDA machine:
#   bash gpu/memory_where.sh      # about 5 minutes on an H200; PARTS picks and orders them (default: 8x1 16k 32k)
. "$(dirname "$0")/env.sh"
B="python3 bench.py --tokenizer ${TOKENIZER:-smollm2-135m} --model_cache $T --steps 1 --lora_dropout 0 --cap_gb 8"
M=/tmp/memory_where   # the snapshots (.pickle, for pytorch.org/memory_viz) stay here; the tables go to $OUT
for part in ${PARTS:-8x1 16k 32k}; do case $part in
  8x1) within $B --cases sft_graph --seq 2048 --batch 8 --accum 1 --activation_offloading --memory_history $M/8x1 \
         > $OUT/mem_8x1.log 2>&1 ;;
  16k) within $B --cases sft_graph --seq 16384 --batch 1 --accum 1 --activation_offloading --memory_history $M/16k \
         > $OUT/mem_16k.log 2>&1 ;;
  32k) within $B --cases sft --seq 32768 --batch 1 --accum 1 --activation_offloading --kernels tiled_mlp \
         --memory_history $M/32k > $OUT/mem_32k.log 2>&1 ;;
  32k_ours) within env BENCH_GRAPH=0 $B --cases sft_graph --seq 32768 --batch 1 --accum 1 --activation_offloading \
         --kernels tiled_mlp --memory_history $M/32k_ours > $OUT/mem_32k_ours.log 2>&1 ;;
esac; done
for d in 8x1 16k 32k 32k_ours; do for f in $M/$d/*.txt; do [ -f "$f" ] && cp "$f" "$OUT/${d}_$(basename "$f")"; done; done
head -n 24 $OUT/*_mem_*.txt
