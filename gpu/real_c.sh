# Device call (after real_a.sh's data, on a fresh machine): the two CreditMix SFT runs alone on the GPU, for the
# reference recipe's full 6 epochs (lr 1e-3, batch 32), then their holdout evaluations.
#   run: bash gpu/real_c.sh      
set -u
OUT=${OUT:-runs/gpu}; mkdir -p "$OUT"
DL="timeout ${DEADLINE:-480}"   # each command is stopped after DEADLINE seconds
M=${M:-smollm2-135m}; P=${P:-/tmp/carry/prep}; R=${R:-runs}; MIN=${MIN:-5}; EP=${EP:-6}
export DISTILL_SLM_RUNS=$R
mkdir -p $R/logs && cp -r $P/data_cm* $R/
CM="--per_device_train_batch_size 32 --gradient_accumulation_steps 1 --lr 1e-3 --max_len 512 --logging_steps 20 --save_steps 100000 --gradient_checkpointing off --epochs $EP --max_minutes $MIN"
$DL python3 -c "import models; print(models.embedded_model_dir())" >/dev/null 2>&1
for f in cm6 cm20; do
  $DL python3 sft_train.py --student $M --data $R/data_$f/creditmix_sft.jsonl --save_dir $R/${f}_sft6 $CM > $R/logs/${f}_sft6.log 2>&1 &
done
wait
for f in cm6 cm20; do
  $DL python3 eval_creditmix.py --model_dir $R/${f}_sft6 --data $R/data_$f/creditmix_val.jsonl --batch_size 64 > $R/logs/eval_${f}_sft6.log 2>&1 &
done
wait
tar czf $OUT/runs_c.tgz --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pt' --exclude='tokenizer.json' --exclude='data_*' $R
grep -h -E "^(multi_null|batch|none) |stopped|save_dir" $R/logs/*.log | cut -c1-300
