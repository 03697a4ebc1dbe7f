# Device call 2: real-data runs on the embedded SmolLM2-135M (QLoRA, 4-bit). Trainings and base evaluations run
# side by side on the one GPU (a 135M model leaves most of it idle), then the CreditMix students are evaluated
# (real_b.sh evaluates the IDP and CodeGen students).
#   run: . gpu/setup.sh && PHASE=prepare bash gpu/real_a.sh   (carry .whl .carry/p1: wheels, GGUF part 1, real data)
#   then . gpu/setup.sh && PHASE=train bash gpu/real_a.sh     (carry .carry/p2: GGUF part 2)
# CPU dry run: M=<tiny model dir> ST=2 LIMIT=4 D=<data dir> OUT=/tmp/out bash gpu/real_a.sh
set -u
M=${M:-smollm2-135m}; D=${D:-/tmp/carry/data}; R=${R:-runs}; ST=${ST:--1}; LIMIT=${LIMIT:-}; B=${B:-32}; NT=${NT:-384}
export DISTILL_SLM_RUNS=$R
mkdir -p $R/logs
LIM=${LIMIT:+--limit $LIMIT}
CM="--per_device_train_batch_size $B --gradient_accumulation_steps 1 --lr 1e-3 --max_len 512 --logging_steps 20 --save_steps 100000 --gradient_checkpointing off --max_steps $ST"
GEN="--per_device_train_batch_size $(( B / 4 )) --gradient_accumulation_steps 2 --lr 5e-4 --logging_steps 10 --save_steps 100000 --gradient_checkpointing off --max_steps $ST"
t0=$(date +%s); log() { echo "[$(( $(date +%s) - t0 ))s] $*" | tee -a $R/logs/timeline.txt; }
PHASE=${PHASE:-all}   # prepare (data only: the first call, before the model's second half arrives) | train | all
if [ "$PHASE" != train ]; then
log prepare
python3 creditmix_prepare.py --src $D/creditmix_labeled.jsonl --outdir $R/data_cm6 > $R/logs/prep_cm6.log 2>&1
python3 creditmix_prepare.py --src $D/creditmix_labeled.jsonl --features rich --outdir $R/data_cm20 > $R/logs/prep_cm20.log 2>&1
python3 idp_prepare.py --src $D/sroie.jsonl --outdir $R/data_idp > $R/logs/prep_idp.log 2>&1
python3 codegen_prepare.py --src $D/mbpp.jsonl --outdir $R/data_code --workers 12 ${LIMIT:+--limit 12} > $R/logs/prep_code.log 2>&1
tail -n 2 $R/logs/prep_*.log
fi
[ "$PHASE" = prepare ] && exit 0
[ "$M" = smollm2-135m ] && python3 -c "import common; print(common.embedded_model_dir())"
# watchdog: past DEADLINE seconds stop what still runs, so the logs and run records still come back
( sleep ${DEADLINE:-545}; echo "DEADLINE reached: stopping" >> $R/logs/timeline.txt; pkill -f "_train.py|eval_|bench_idp" ) &
WD=$!
log train + base evals
python3 sft_train.py --student $M --data $R/data_cm6/creditmix_sft.jsonl --save_dir $R/cm6_sft --epochs 2 $CM > $R/logs/cm6_sft.log 2>&1 &
python3 sft_train.py --student $M --data $R/data_cm20/creditmix_sft.jsonl --save_dir $R/cm20_sft --epochs 3 $CM > $R/logs/cm20_sft.log 2>&1 &
python3 sft_train.py --student $M --data $R/data_idp/sroie_idp_sft.jsonl --save_dir $R/idp_sft --epochs 2 --max_len 2048 $GEN > $R/logs/idp_sft.log 2>&1 &
python3 sft_train.py --student $M --data $R/data_code/codegen_sft.jsonl --save_dir $R/code_sft --epochs 3 --max_len 1024 $GEN > $R/logs/code_sft.log 2>&1 &
CME="--batch_size 64 ${LIMIT:+--limit $LIMIT}"
IDP="--data $R/data_idp/sroie_idp_test.jsonl --schema $R/data_idp/sroie_schema.json --batch_size 32 $LIM"
CG="--batch_size 64 --max_new_tokens $NT --workers 4 $LIM"
( python3 eval_creditmix.py --model_dir $M --data $R/data_cm6/creditmix_val.jsonl $CME
  python3 eval_creditmix.py --model_dir $M --data $R/data_cm20/creditmix_val.jsonl $CME ) > $R/logs/eval_cm_base.log 2>&1 &
( python3 eval_idp.py --model_dir $M $IDP --out $R/logs/idp_base_con.json
  python3 eval_idp.py --model_dir $M $IDP --unconstrained --out $R/logs/idp_base_unc.json ) > $R/logs/eval_idp_base.log 2>&1 &
( python3 eval_codegen.py --model_dir $M --data $D/humaneval.jsonl $CG --out $R/logs/he_base.json
  python3 eval_codegen.py --model_dir $M --data $D/humaneval.jsonl $CG --plan_then_code --out $R/logs/he_base_plan.json ) > $R/logs/eval_he_base.log 2>&1 &
( python3 eval_codegen.py --model_dir $M --data $D/mbpp.jsonl $CG --out $R/logs/mbpp_base.json
  python3 eval_codegen.py --model_dir $M --data $D/mbpp.jsonl $CG --plan_then_code --out $R/logs/mbpp_base_plan.json ) > $R/logs/eval_mbpp_base.log 2>&1 &
wait
log "constrained decoding overhead (bench_idp.py)"
python3 bench_idp.py --model_dir $M --schemas data/idp_schema.json $R/data_idp/sroie_schema.json --data $R/data_idp/sroie_idp_test.jsonl --n_docs ${LIMIT:-16} --batch_sizes 1 8 --out $R/logs/bench_idp.json > $R/logs/bench_idp.log 2>&1 &
log trained evals
python3 eval_creditmix.py --model_dir $R/cm6_sft --data $R/data_cm6/creditmix_val.jsonl $CME > $R/logs/eval_cm6_sft.log 2>&1 &
python3 eval_creditmix.py --model_dir $R/cm20_sft --data $R/data_cm20/creditmix_val.jsonl $CME > $R/logs/eval_cm20_sft.log 2>&1 &
wait
kill $WD 2>/dev/null
log done
tar czf $OUT/runs_a.tgz --exclude='*.safetensors' --exclude='checkpoint-*' --exclude='*.bin' --exclude='*.pt' --exclude='tokenizer.json' $R
grep -h -E "^(multi_null|batch|none) " $R/logs/eval_cm*.log; cat $R/logs/timeline.txt
