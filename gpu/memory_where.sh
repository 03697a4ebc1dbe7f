#!/usr/bin/env bash
# docs/performance.md: what fills the GPU. bench.py --memory_history lists the tensors alive at a case's peak by
# where they were allocated: sft_graph (--cuda_graphs) against Unsloth at 2048 x 1 x 8 (ours peaks 0.18 GiB above
# Unsloth's), and sft_graph at micro-batch 4 under the 8 GiB cap, whose capture runs out of memory with ~2.5 GiB
# more allocated outside the graph's pool than the model, LoRA and optimizer state explain (mem_sft_graph_oom.txt),
# and our 32,768-token run under the cap (activation offloading, tiled MLP), which runs out of memory at 7.80 GiB.
# The recording slows the cases: their tokens/s do not count. Any CUDA machine, Unsloth in its own folder:
#   UNSLOTH_SITE=/tmp/unsloth_site bash gpu/memory_where.sh      # about 5 minutes on an H200
. "$(dirname "$0")/env.sh"
B="python3 bench.py --tokenizer ${TOKENIZER:-smollm2-135m} --model_cache $T --seq 2048 --steps 1 --lora_dropout 0"
M=/tmp/memory_where   # the snapshots (.pickle, for pytorch.org/memory_viz) stay here; the tables go to $OUT
within $B --cases sft_graph,unsloth --batch 1 --accum 8 --memory_history $M/1x8 > $OUT/mem_1x8.log 2>&1
within $B --cases sft_graph --batch 4 --accum 2 --cap_gb 8 --memory_history $M/4x2 > $OUT/mem_4x2.log 2>&1
within ${B/--seq 2048/--seq 32768} --cases sft --batch 1 --accum 1 --cap_gb 8 --activation_offloading \
  --kernels tiled_mlp --memory_history $M/32k > $OUT/mem_32k.log 2>&1
for d in 1x8 4x2 32k; do for f in $M/$d/*.txt; do [ -f "$f" ] && cp "$f" "$OUT/${d}_$(basename "$f")"; done; done
head -n 24 $OUT/*_mem_*.txt
