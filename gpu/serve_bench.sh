# Device call: the server's four CreditMix endpoints (base, sft, kd, dpo) of one Qwen2.5-3B-shaped 4-bit base
# (random weights, three random r=16 LoRA adapters): peak GPU memory with all four loaded under an 8 GiB cap, and
# throughput of mixed-adapter batches against one batch per adapter, in-process and through the server (32 clients).
#   run: . gpu/setup.sh && bash gpu/serve_bench.sh      (carry .whl .carry/tok)
set -u
export L=$OUT/serve.log BUDGET=${BUDGET:-540}
W=/tmp/serve_memory
within python3 gpu/serve_memory.py --config qwen2.5-3b --cap_gb 8 --tokenizer .carry/tok --work $W --batch 32 \
  --out $OUT/serve_memory.json >>$OUT/serve_memory.txt 2>&1
within python3 loadtest.py --model $W/qwen2.5-3b --adapters sft=$W/qwen2.5-3b_sft,kd=$W/qwen2.5-3b_kd,dpo=$W/qwen2.5-3b_dpo \
  --endpoints base,sft,kd,dpo --modes on,per_adapter --concurrency 8,32 --requests 1024 --max_seconds 60 \
  --rss_requests 0 --out $OUT/serve_load.json >>$OUT/serve_load.txt 2>&1
cat $OUT/serve_memory.txt $OUT/serve_load.txt | grep -v "Loading weights"
echo "[$(( $(date +%s) - T0 ))s] done" >>$L
