#!/usr/bin/env bash
# The server's four CreditMix endpoints (base, sft, kd, dpo) of one Qwen2.5-3B-shaped 4-bit base (random weights,
# three random r=16 LoRA adapters; docs/serving.md): peak GPU memory with all four loaded under an 8 GiB cap, label
# scoring of one mixed-adapter batch against one batch per adapter (in-process; stacked LoRA and PEFT's loop, with the
# ops per forward), and the load test at 8 and 32 clients over the four endpoints (mixed batches, one batch per
# adapter, mixed batches through PEFT's loop). Any CUDA machine with requirements.txt installed:
#   bash gpu/serve_bench.sh          (TOKENIZER: tokenizer files or a model spec, default smollm2-135m)
. "$(dirname "$0")/env.sh"
W=${MODEL_CACHE:-/tmp/serve_memory}
within python3 gpu/serve_memory.py --shape qwen2.5-3b --cap_gb 8 --tokenizer ${TOKENIZER:-smollm2-135m} --work $W \
  --batch 32 --out $OUT/serve_memory.json >$OUT/serve_memory.txt 2>>$L
within python3 loadtest.py --model $W/qwen2.5-3b \
  --adapters sft=$W/qwen2.5-3b_sft,kd=$W/qwen2.5-3b_kd,dpo=$W/qwen2.5-3b_dpo --endpoints base,sft,kd,dpo \
  --modes on,per_adapter,peft_mixed --concurrency 8,32 --requests 1024 --max_seconds ${LOAD_S:-60} --rss_requests 0 \
  --out $OUT/serve_load.json >$OUT/serve_load.txt 2>>$L
cat $OUT/serve_memory.txt $OUT/serve_load.txt
