#!/usr/bin/env bash
# docs/performance.md, "Against Unsloth": issue 17's targets in one run, ours and Unsloth side by side on one GPU
# (random-weight Qwen2.5-3B shape, 4-bit NF4, LoRA r16 a32 on seven projections, dropout 0 on both sides):
#   a: 2048 x 1 x 8, our --cuda_graphs trainer path with and without --activation_offloading, against Unsloth
#   b: 2048 under an 8 GiB cap, each at its best micro-batch (ours with the layers' inputs in host memory)
#   c: 16,384 tokens under the 8 GiB cap (ours graphed, and eagerly with our offloading and with TRL's)
#   d: 32,768 tokens under the 8 GiB cap (ours eagerly with our offloading and the tiled MLP; then as --cuda_graphs
#      runs it: captured, or eagerly if its capture runs out of memory)
# Rows in $OUT/targets.jsonl, the table in $OUT/targets_table.txt. PARTS picks and orders them (default: all).
#   UNSLOTH_SITE=/tmp/unsloth_site bash gpu/unsloth_targets.sh      # about 12 minutes on an H200
. "$(dirname "$0")/env.sh"
B="python3 bench.py --out $OUT/targets.jsonl --tokenizer ${TOKENIZER:-smollm2-135m} --model_cache $T --lora_dropout 0"
S="--seq 2048 --batch 1 --accum 8 --steps 3"
for part in ${PARTS:-a b c d}; do case $part in
  a) within $B --cases sft_graph,unsloth $S --activation_offloading
     within $B --cases sft_graph $S ;;
  b) within $B --cases sft_graph_auto,unsloth_auto --seq 2048 --batch 1 --accum 8 --steps 3 --cap_gb 8 --max_memory_gb 8 \
       --activation_offloading ;;
  c) within $B --cases sft_graph --seq 16384 --batch 1 --accum 1 --steps 2 --cap_gb 8 --activation_offloading
     # the same micro-step eagerly: our hidden-state offloading (same-stream copies) instead of TRL's (sft)
     within env BENCH_GRAPH=0 $B --cases sft_graph --seq 16384 --batch 1 --accum 1 --steps 2 --cap_gb 8 --activation_offloading
     within $B --cases sft,unsloth --seq 16384 --batch 1 --accum 1 --steps 2 --cap_gb 8 --activation_offloading ;;
  d) within env BENCH_GRAPH=0 $B --cases sft_graph --seq 32768 --batch 1 --accum 1 --steps 1 --cap_gb 8 --activation_offloading \
       --kernels tiled_mlp
     # as sft_train.py --cuda_graphs runs it: captured, or on eagerly if the capture runs out of memory
     within $B --cases sft_graph --seq 32768 --batch 1 --accum 1 --steps 1 --cap_gb 8 --activation_offloading --kernels tiled_mlp
     within $B --cases unsloth --seq 32768 --batch 1 --accum 1 --steps 1 --cap_gb 8 ;;
esac; done
python3 bench.py --table "$OUT/targets.jsonl" | tee "$OUT/targets_table.txt"
python3 - "$OUT/targets.jsonl" <<'PY'
import json, sys
for r in map(json.loads, open(sys.argv[1])):
    print(r["case"], r.get("seq"), r.get("batch"), "x", r.get("accum"), r["status"], str(r.get("error", ""))[:300],
          {k: r.get(k) for k in ("peak_alloc_gib", "tokens_per_s", "loss_eager", "loss_graph", "grad_max_rel_diff",
                                 "graph_pool_gib", "offloaded_gib")})
PY
