#!/usr/bin/env bash
# docs/performance.md, sft_graph; docs/training.md, "CUDA graphs": our SFT trainer path with its micro-steps as CUDA
# graphs (sft_train.py --cuda_graphs) against Unsloth and the eager trainer (random-weight Qwen2.5-3B shape, 4-bit,
# LoRA r16 on seven projections, dropout 0) at 2048 x 1 x 8, with and without --activation_offloading (the
# layers' inputs in host memory), and at micro-batch 4 x 2 under an 8 GiB cap with it (without, that capture ran
# out of memory); then sft_train.py --cuda_graphs on the embedded SmolLM2-135M
# and real-length CreditMix rows (~120 tokens), eager against graphs, tokens/s from run.json. The GPU tests of the
# captured step run first. Any CUDA machine with requirements.txt, Unsloth in its own folder (gpu/speed_table.sh):
#   UNSLOTH_SITE=/tmp/unsloth_site bash gpu/graphs.sh        # about 10 minutes on an H200
# Rows in $OUT/graphs.jsonl, the table in $OUT/graphs_table.txt, the trainer runs under $OUT/sft_{eager,graphs}.
. "$(dirname "$0")/env.sh"
within python3 -m pytest -q -n 0 -m gpu tests/test_cuda_graphs.py 2>&1 | tail -15 | tee "$OUT/graphs_gpu_tests.txt"
B="python3 bench.py --out $OUT/graphs.jsonl --tokenizer ${TOKENIZER:-smollm2-135m} --model_cache $T"
S="--seq 2048 --batch 1 --accum 8 --steps 3 --lora_dropout 0"
C="--seq 2048 --batch 4 --accum 2 --steps 3 --lora_dropout 0 --cap_gb 8"
within $B --cases sft_graph,unsloth,sft $S
within $B --cases sft_graph $S --activation_offloading  # the layers' inputs in host memory, copied inside the graph
within env BENCH_GRAPH=0 $B --cases sft_graph $S      # the same micro-step eagerly: what the capture itself buys
within $B --cases sft_graph,unsloth_auto $C --max_memory_gb 8 --activation_offloading  # 8 GiB cap, micro-batch 4
python3 bench.py --table "$OUT/graphs.jsonl" | tee "$OUT/graphs_table.txt"
python3 - "$OUT/graphs.jsonl" <<'PY'
import json, sys
for r in map(json.loads, open(sys.argv[1])):
    if r["case"] == "sft_graph":
        print(r["batch"], "x", r["accum"], r["status"], r.get("error", ""), {k: r.get(k) for k in (
            "kernels", "loss_eager", "loss_graph", "grad_max_rel_diff", "graph_captures")})
PY
CM="--student smollm2-135m --data data/creditmix_sft.jsonl --max_steps 300 --per_device_train_batch_size 8"
CM="$CM --gradient_accumulation_steps 1 --lora_dropout 0 --logging_steps 50 --save_steps 100000 --report_to none"
for mode in eager graphs; do
  rm -rf "$OUT/sft_$mode"
  within python3 sft_train.py $CM --save_dir "$OUT/sft_$mode" $([ $mode = graphs ] && echo --cuda_graphs) \
    > "$OUT/sft_$mode.log" 2>&1 || echo "FAILED: sft_train.py $mode (see $OUT/sft_$mode.log)"
done
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
for mode in ("eager", "graphs"):
    p = Path(sys.argv[1]) / f"sft_{mode}" / "run.json"
    m = json.loads(p.read_text())["metrics"] if p.is_file() else {}
    print(mode, {k: m.get(k) for k in ("tokens_per_s", "train_runtime_s", "final_loss", "speedups",
                                       "cuda_graph_captures")} if m else f"missing {p}")
PY
