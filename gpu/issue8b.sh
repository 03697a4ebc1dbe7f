# Device call: constrained-decoding overhead (bench_idp.py) and label-ranking agreement (bench.py score) on
# random-weight SmolLM2-135M and Qwen2.5-3B shapes (issue 8).
#   run: . gpu/setup.sh && bash gpu/issue8b.sh      (carry .whl .carry/tok .carry/idp)
set -u
L=$OUT/log.txt; t0=$(date +%s); BUDGET=${BUDGET:-560}
r() { local left=$(( BUDGET - $(date +%s) + t0 ))
      if [ $left -lt 20 ]; then echo "SKIPPED (time): $*" | tee -a $L; return; fi
      echo "[$(( $(date +%s) - t0 ))s] $*" | tee -a $L; timeout $left "$@" >>$L 2>&1 || echo "FAILED/TIMEOUT: $*" | tee -a $L; }
B="python3 bench.py --tokenizer .carry/tok --model_cache /tmp/bench_models --out $OUT/bench.jsonl"
I="python3 bench_idp.py --data .carry/idp/sroie_idp_test.jsonl --batch_sizes 1 8 --n_docs 8 --max_new_tokens 128"
for cfg in ${CONFIGS:-smollm2-135m qwen2.5-3b}; do
  r $B --cases score --config $cfg --score_examples 512
  r $I --model_dir /tmp/bench_models/$cfg --out $OUT/idp_$cfg.json ${SCHEMAS:-}
done
python3 bench.py --table $OUT/bench.jsonl | tee $OUT/bench_table.txt
grep -A6 "^decoding" $L
echo "[$(( $(date +%s) - t0 ))s] done"
