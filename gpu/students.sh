#!/usr/bin/env bash
# docs/results.md, "Students that improve": side by side on one GPU, the embedded SmolLM2-135M trained as bf16 LoRA
# (--quantize none, so evaluation loads bf16 too) on the real data: CreditMix twenty and six features (longer
# schedules, LoRA r16 and r64) evaluated with the calibration eval_creditmix.py picks and its ECE; IDP SFT on SROIE
# for more epochs, constrained, raw / normalized / canonical metrics; CodeGen distilled with the sandbox as verifier
# (gpu/codegen_star.sh: STaR rounds, HumanEval / MBPP-test pass@1 at the base and after each round). PARTS picks the
# jobs (default "cm idp star"; also cm_r64: twenty features at LoRA r64; cm_tree: KD from the gradient-boosted
# tree's cache, creditmix_tree.py, made by dev/make_carry.sh; TREE_ALPHA, default 0.5, the divergence's weight;
# cm_all: twenty features from every training row, SFT and KD from the tree on those rows; idp_kd: SFT, then KD
# from it and DPO on top of it, on SROIE; idp_both: a QLoRA adapter, then a short bf16 pass from it, each scored
# on the 4-bit and the bf16 base; code_sft: SFT on MBPP train's reference solutions, HumanEval and MBPP-test
# pass@1, CODE_DATA=data_code_both for the tasks also asked as HumanEval asks); they share the GPU.
#   P=<prepared data: data_cm6, data_cm20, data_idp, mbpp.jsonl, humaneval.jsonl> bash gpu/students.sh   (~9 min, H200)
# CPU dry run: M=<tiny model dir> P=<dir> MIN=0.2 LIMIT=4 ROUNDS=1 N=2 STAR_LIMIT=4 EVAL_LIMIT=2 TOK=16 ES=2 K=1,2 OUT=/tmp/out bash gpu/students.sh
set -u
OUT=${OUT:-runs/gpu}; mkdir -p "$OUT"
M=${M:-smollm2-135m}; P=${P:-/tmp/carry/prep}; R=${R:-runs}; MIN=${MIN:-4}; LIMIT=${LIMIT:-}
DL="timeout ${DEADLINE:-500}"
export DISTILL_SLM_RUNS=$R
mkdir -p $R/logs && cp -r $P/data_* $R/
LIM=${LIMIT:+--limit $LIMIT}
COM="--student $M --quantize none --gradient_checkpointing off --save_steps 100000 --logging_steps 50 --report_to none --max_minutes $MIN"
CM="$COM --per_device_train_batch_size 32 --gradient_accumulation_steps 1 --lr 1e-3 --max_len 512 --epochs 8"
cm_eval() {  # name data: evaluate with the calibration it picks
  $DL python3 eval_creditmix.py --model_dir $R/$1 --data $R/data_$2/creditmix_val.jsonl --batch_size 64 $LIM \
    > $R/logs/eval_$1.log 2>&1
}
cm() {  # name data extra-flags...: SFT, then evaluate
  local name=$1 f=$2; shift 2
  $DL python3 sft_train.py $CM --data $R/data_$f/creditmix_sft.jsonl --save_dir $R/$name "$@" > $R/logs/$name.log 2>&1
  cm_eval $name $f
}
kd_tree() {  # name data: KD from the gradient-boosted tree (creditmix_tree.py's cache in the data folder), evaluate
  local name=$1 f=$2
  $DL python3 kd_train.py $CM --data $R/data_$f/creditmix_kd.jsonl --idp_mode --teacher_cache $R/data_$f/cache_tree \
    --alpha ${TREE_ALPHA:-0.5} --save_dir $R/$name > $R/logs/$name.log 2>&1
  cm_eval $name $f
}
IDPT="--max_len 2048 --per_device_train_batch_size 8 --gradient_accumulation_steps 2"
IDPE="--data $R/data_idp/sroie_idp_test.jsonl --schema $R/data_idp/sroie_schema.json --batch_size 64 $LIM"
idp() {  # name script flags...: train on SROIE, then evaluate constrained
  local name=$1 script=$2; shift 2
  $DL python3 $script $COM $IDPT --save_dir $R/$name "$@" > $R/logs/$name.log 2>&1
  $DL python3 eval_idp.py --model_dir $R/$name $IDPE --out $R/logs/${name}_con.json > $R/logs/eval_$name.log 2>&1
}
for part in ${PARTS:-cm idp star}; do case $part in
  cm) cm cm20_bf16 cm20 &
      cm cm6_bf16 cm6 & ;;
  cm_r64) cm cm20_bf16_r64 cm20 --lora_r 64 --lora_alpha 128 --lr 5e-4 & ;;
  cm_all)  # twenty features from every training row (creditmix_prepare.py --train_rows all): SFT, and KD from the
    # tree trained on those rows (its cache in data_cm20_all, dev/make_carry.sh)
    cm cm20_all cm20_all &
    kd_tree cm20_all_kd_tree cm20_all & ;;
  cm_tree)  # KD from the gradient-boosted tree (its caches made by dev/make_carry.sh) into fresh students
    kd_tree cm20_kd_tree cm20 &
    kd_tree cm6_kd_tree cm6 & ;;
  idp) idp idp_bf16 sft_train.py --data $R/data_idp/sroie_idp_sft.jsonl --epochs 8 --lr 5e-4 & ;;
  idp_kd)  # SFT, then logit KD from it into a fresh student and DPO on top of it (reference: the SFT run)
    ( idp idp_sft_t sft_train.py --data $R/data_idp/sroie_idp_sft.jsonl --epochs 8 --lr 5e-4
      idp idp_kd kd_train.py --teacher $R/idp_sft_t --data $R/data_idp/sroie_idp_kd.jsonl --idp_mode \
        --schema $R/data_idp/sroie_schema.json --kd_loss forward_kl --alpha 0.5 --epochs 8 --lr 5e-4 &
      idp idp_dpo dpo_train.py --ref_model_dir $R/idp_sft_t --data $R/data_idp/sroie_idp_dpo.jsonl --epochs 1 \
        --beta 0.1 --lr 5e-6 &
      wait ) & ;;
  idp_both)  # an adapter for either base: QLoRA SFT on the 4-bit base, then a short pass from it on the bf16 base;
    # each scored on both bases (Q4=none for a CPU dry run)
    ( $DL python3 sft_train.py $COM $IDPT --quantize ${Q4:-4bit} --data $R/data_idp/sroie_idp_sft.jsonl --epochs 8 \
        --lr 5e-4 --save_dir $R/idp_q4 > $R/logs/idp_q4.log 2>&1
      $DL python3 sft_train.py $COM $IDPT --student $R/idp_q4 --data $R/data_idp/sroie_idp_sft.jsonl --max_steps 20 \
        --lr 1e-4 --save_dir $R/idp_q4_bf16 > $R/logs/idp_q4_bf16.log 2>&1
      for run in idp_q4 idp_q4_bf16; do for q in ${Q4:-4bit} none; do
        $DL python3 eval_idp.py --model_dir $R/$run $IDPE --quantize $q --out $R/logs/${run}_$q.json \
          > $R/logs/eval_${run}_$q.log 2>&1
      done; done ) & ;;
  code_sft)  # SFT on MBPP train's reference solutions (codegen_prepare.py's file), then greedy pass@1 as in STaR;
    # CODE_DATA=data_code_both: the tasks asked as MBPP and as HumanEval asks (codegen_prepare.py --format both)
    ( cdata=${CODE_DATA:-data_code}; name=code_sft${cdata#data_code}
      $DL python3 sft_train.py $COM --data $R/$cdata/codegen_sft.jsonl --save_dir $R/$name --epochs 3 \
        --max_len 1024 --per_device_train_batch_size 16 --gradient_accumulation_steps 1 --lr 2e-4 \
        > $R/logs/$name.log 2>&1
      for set in humaneval mbpp; do
        $DL python3 eval_codegen.py --model_dir $R/$name --data $P/$set.jsonl --batch_size 1024 --max_new_tokens 512 \
          ${LIMIT:+--limit $LIMIT} > $R/logs/eval_${name}_$set.log 2>&1
      done ) & ;;
  star) ( MIN=1 LIMIT=${STAR_LIMIT:-0} OUT=$OUT R=$R M=$M P=$P $DL bash "$(dirname "$0")/codegen_star.sh" \
          > $R/logs/star.log 2>&1 ) & ;;
esac; done
wait
tar czf $OUT/runs_students.tgz --exclude='*.safetensors' --exclude='checkpoint-*' --exclude='*.bin' --exclude='*.pt' \
  --exclude='tokenizer.json' --exclude='data_*' $R
for f in $R/logs/eval_*.log; do echo "== $f"; grep -E "^(precision|multi_null|batch|none|fitted|calibration|micro|field|exact|company|date|total|address|JSON|\{\"pass@)" "$f" | cut -c1-200; done
grep -h -E "stopped|train_runtime|steps" $R/logs/cm*.log $R/logs/idp*.log 2>/dev/null | cut -c1-200 | tail -12
cat $OUT/codegen_star.txt 2>/dev/null | tail -20
