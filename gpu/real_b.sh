# Device call 3 (after real_a.sh, same warm machine): KD and DPO on real CreditMix (twenty features), their
# evaluations, held-out KL, and the compare_runs.py report over base, SFT, KD and DPO.
#   run: bash gpu/real_b.sh
# CPU dry run: M=<tiny model dir> ST=2 KST=2 LIMIT=4 P=<prepared data dir> OUT=/tmp/out bash gpu/real_b.sh  (after real_a's)
set -u
OUT=${OUT:-runs/gpu}; mkdir -p "$OUT"
DL="timeout ${DEADLINE:-480}"   # each command is stopped after DEADLINE seconds
M=${M:-smollm2-135m}; P=${P:-/tmp/carry/prep}; R=${R:-runs}; MIN=${MIN:-3}; ST=${ST:--1}; KST=${KST:-90}; LIMIT=${LIMIT:-}; B=${B:-32}
export DISTILL_SLM_RUNS=$R
V=$R/data_cm20/creditmix_val.jsonl
CM="--per_device_train_batch_size $B --gradient_accumulation_steps 1 --lr 1e-3 --max_len 512 --logging_steps 10 --save_steps 100000 --gradient_checkpointing off --max_minutes $MIN"
CME="--batch_size 64 ${LIMIT:+--limit $LIMIT}"
t0=$(date +%s); log() { echo "[$(( $(date +%s) - t0 ))s] $*" | tee -a $R/logs/timeline_b.txt; }
log "students: $KST steps each (plain SFT vs logit KD from the cm20 SFT teacher); DPO on top of SFT"
$DL python3 sft_train.py --student $M --data $R/data_cm20/creditmix_sft.jsonl --save_dir $R/cm20_student_sft --max_steps $KST $CM > $R/logs/student_sft.log 2>&1 &
$DL python3 kd_train.py --student $M --teacher $R/cm20_sft --data $R/data_cm20/creditmix_kd.jsonl --idp_mode --kd_loss forward_kl --temperature 2 --alpha 0.5 --eval_kl $V --save_dir $R/cm20_kd --max_steps $KST $CM > $R/logs/kd.log 2>&1 &
$DL python3 kd_train.py --student $M --teacher $R/cm20_sft --data $R/data_cm20/creditmix_kd.jsonl --idp_mode --kd_loss forward_kl --temperature 2 --alpha 1.0 --save_dir $R/cm20_kd_only --max_steps $KST $CM > $R/logs/kd_only.log 2>&1 &
$DL python3 kd_train.py --student $M --data $R/data_cm20/creditmix_kd.jsonl --idp_mode --save_dir $R/cm20_kd_seq --max_steps $KST $CM > $R/logs/kd_seq.log 2>&1 &
$DL python3 dpo_train.py --student $M --ref_model_dir $R/cm20_sft --data $R/data_cm20/creditmix_dpo.jsonl --save_dir $R/cm20_dpo --epochs 1 --beta 0.1 --lr 5e-5 --per_device_train_batch_size $(( B / 2 )) --gradient_accumulation_steps 2 --max_len 512 --logging_steps 10 --save_steps 100000 --gradient_checkpointing off --max_steps $ST --max_minutes $MIN > $R/logs/dpo.log 2>&1 &
wait
log evals
IDP="--data $R/data_idp/sroie_idp_test.jsonl --schema $R/data_idp/sroie_schema.json --batch_size 32 ${LIMIT:+--limit $LIMIT}"
CG="--batch_size 64 --max_new_tokens ${NT:-384} --workers 4 ${LIMIT:+--limit $LIMIT}"
( $DL python3 eval_idp.py --model_dir $R/idp_sft $IDP --out $R/logs/idp_sft_con.json
  $DL python3 eval_idp.py --model_dir $R/idp_sft $IDP --unconstrained --out $R/logs/idp_sft_unc.json ) > $R/logs/eval_idp_sft.log 2>&1 &
$DL python3 eval_codegen.py --model_dir $R/code_sft --data $P/humaneval.jsonl $CG --out $R/logs/he_sft.json > $R/logs/eval_he_sft.log 2>&1 &
$DL python3 eval_codegen.py --model_dir $R/code_sft --data $P/mbpp.jsonl $CG --out $R/logs/mbpp_sft.json > $R/logs/eval_mbpp_sft.log 2>&1 &
for m in cm20_student_sft cm20_kd cm20_kd_only cm20_kd_seq cm20_dpo; do
  $DL python3 eval_creditmix.py --model_dir $R/$m --data $V $CME > $R/logs/eval_$m.log 2>&1 &
done
for m in $M $R/cm20_student_sft $R/cm20_kd $R/cm20_kd_only $R/cm20_dpo; do
  $DL python3 eval_kl.py --teacher $R/cm20_sft --student $m --data $V --batch_size 64 --out $R/logs/kl_$(basename $m).json > $R/logs/kl_$(basename $m).log 2>&1 &
done
wait
log report
$DL python3 compare_runs.py $R/base-$(basename $M) $R/cm20_sft $R/cm20_student_sft $R/cm20_kd $R/cm20_kd_only $R/cm20_kd_seq $R/cm20_dpo --task creditmix --out $R/report_cm20 > $R/logs/compare_cm20.txt 2>&1
$DL python3 compare_runs.py $R/ --out $R/report_all > $R/logs/compare_all.txt 2>&1
log done
tar czf $OUT/runs_b.tgz --exclude='*.safetensors' --exclude='checkpoint-*' --exclude='*.bin' --exclude='*.pt' --exclude='tokenizer.json' $R
cat $R/logs/compare_cm20.txt; cat $R/logs/timeline_b.txt
