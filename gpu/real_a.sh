# Device call 2: real-data runs on the embedded SmolLM2-135M (QLoRA, 4-bit). The four SFT trainings and the base
# evaluations still missing run side by side on the one GPU (a 135M model leaves most of it idle), then the
# CreditMix students are evaluated and constrained decoding is benchmarked (real_b.sh does KD, DPO and the rest).
#   run: bash gpu/real_a.sh      (P: the data prepared by dev/make_carry.sh's prepare lines)
# CPU dry run: M=<tiny model dir> ST=2 LIMIT=4 P=<dir with make_carry's prepared data> OUT=/tmp/out bash gpu/real_a.sh
set -u
OUT=${OUT:-runs/gpu}; mkdir -p "$OUT"
DL="timeout ${DEADLINE:-480}"   # each command is stopped after DEADLINE seconds
M=${M:-smollm2-135m}; P=${P:-/tmp/carry/prep}; R=${R:-runs}; ST=${ST:--1}; LIMIT=${LIMIT:-}; B=${B:-32}; NT=${NT:-384}
MIN=${MIN:-3.5}   # minutes per training at most (--max_minutes: stops at a step and saves the adapter)
export DISTILL_SLM_RUNS=$R
mkdir -p $R/logs && cp -r $P/data_* $R/
LIM=${LIMIT:+--limit $LIMIT}
CM="--per_device_train_batch_size $B --gradient_accumulation_steps 1 --lr 1e-3 --max_len 512 --logging_steps 20 --save_steps 100000 --gradient_checkpointing off --max_steps $ST --max_minutes $MIN"
GEN="--per_device_train_batch_size $(( B / 4 )) --gradient_accumulation_steps 2 --lr 5e-4 --logging_steps 10 --save_steps 100000 --gradient_checkpointing off --max_steps $ST --max_minutes $MIN"
t0=$(date +%s); log() { echo "[$(( $(date +%s) - t0 ))s] $*" | tee -a $R/logs/timeline.txt; }
[ "$M" = smollm2-135m ] && python3 -c "import models; print(models.embedded_model_dir())"
# watchdog: past DEADLINE seconds stop what still runs, so the logs and run records still come back
log train + base evals
$DL python3 sft_train.py --student $M --data $R/data_cm6/creditmix_sft.jsonl --save_dir $R/cm6_sft --epochs 6 $CM > $R/logs/cm6_sft.log 2>&1 &
$DL python3 sft_train.py --student $M --data $R/data_cm20/creditmix_sft.jsonl --save_dir $R/cm20_sft --epochs 6 $CM > $R/logs/cm20_sft.log 2>&1 &
$DL python3 sft_train.py --student $M --data $R/data_idp/sroie_idp_sft.jsonl --save_dir $R/idp_sft --epochs 2 --max_len 2048 $GEN > $R/logs/idp_sft.log 2>&1 &
$DL python3 sft_train.py --student $M --data $R/data_code/codegen_sft.jsonl --save_dir $R/code_sft --epochs 3 --max_len 1024 $GEN > $R/logs/code_sft.log 2>&1 &
CME="--batch_size 64 ${LIMIT:+--limit $LIMIT}"
IDP="--data $R/data_idp/sroie_idp_test.jsonl --schema $R/data_idp/sroie_schema.json --batch_size 32 $LIM"
CG="--batch_size 64 --max_new_tokens $NT --workers 4 $LIM"
( $DL python3 eval_creditmix.py --model_dir $M --data $R/data_cm6/creditmix_val.jsonl $CME
  $DL python3 eval_creditmix.py --model_dir $M --data $R/data_cm20/creditmix_val.jsonl $CME ) > $R/logs/eval_cm_base.log 2>&1 &
$DL python3 eval_idp.py --model_dir $M $IDP --out $R/logs/idp_base_con.json > $R/logs/eval_idp_base.log 2>&1 &
$DL python3 eval_codegen.py --model_dir $M --data $P/mbpp.jsonl $CG --plan_then_code --out $R/logs/mbpp_base_plan.json > $R/logs/eval_mbpp_base.log 2>&1 &
wait
log "trained evals; constrained decoding overhead (bench_idp.py)"
$DL python3 bench_idp.py --model_dir $M --schemas data/idp_schema.json $R/data_idp/sroie_schema.json --data $R/data_idp/sroie_idp_test.jsonl --n_docs ${LIMIT:-16} --batch_sizes 1 8 --out $R/logs/bench_idp.json > $R/logs/bench_idp.log 2>&1 &
$DL python3 eval_creditmix.py --model_dir $R/cm6_sft --data $R/data_cm6/creditmix_val.jsonl $CME > $R/logs/eval_cm6_sft.log 2>&1 &
$DL python3 eval_creditmix.py --model_dir $R/cm20_sft --data $R/data_cm20/creditmix_val.jsonl $CME > $R/logs/eval_cm20_sft.log 2>&1 &
wait
log done
tar czf $OUT/runs_a.tgz --exclude='*.safetensors' --exclude='checkpoint-*' --exclude='*.bin' --exclude='*.pt' --exclude='tokenizer.json' --exclude='data_*' $R
grep -h -E "^(multi_null|batch|none) |stopped|save_dir" $R/logs/*.log | cut -c1-300; cat $R/logs/timeline.txt
