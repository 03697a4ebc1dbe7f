#!/usr/bin/env bash
# Constrained-decoding overhead (bench_idp.py) and label-ranking agreement (bench.py score) on random-weight
# SmolLM2-135M and Qwen2.5-3B shapes (docs/performance.md). Any CUDA machine with requirements.txt installed:
#   bash gpu/scoring_decoding.sh          (IDP_DATA: folder of sroie_idp_test.jsonl, default data/ = the sample)
# Environment: CONFIGS (shapes), IDP_ARGS (more bench_idp.py arguments, e.g. "--repeats 4 --control"),
# SCORE=0 (skip the label-ranking case), BUDGET (seconds).
. "$(dirname "$0")/env.sh"
B="python3 bench.py --tokenizer ${TOKENIZER:-smollm2-135m} --model_cache $T --out $OUT/bench.jsonl"
I="python3 bench_idp.py --data $DOCS --batch_sizes 1 8 --n_docs 8 --max_new_tokens 128"
for cfg in ${CONFIGS:-smollm2-135m qwen2.5-3b}; do
  if [ "${SCORE:-1}" = 1 ]; then within $B --cases score --config $cfg --score_examples 512 >>$L 2>&1
  else within $B --cases matmul --config $cfg >>$L 2>&1; fi   # builds the model
  within $I --model_dir $T/$cfg --out $OUT/idp_$cfg.json ${IDP_ARGS:-} >>$L 2>&1
done
python3 bench.py --table $OUT/bench.jsonl | tee $OUT/bench_table.txt
grep -A6 "^decoding" $L
echo "[$(( $(date +%s) - T0 ))s] done"
