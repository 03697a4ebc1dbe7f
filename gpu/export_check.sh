# export.py on a GPU: the merged model's CreditMix score against the 4-bit run's (docs/export.md). Trains a CreditMix
# SFT of the embedded SmolLM2-135M with QLoRA (4-bit NF4 base), evaluates the run (4-bit base + adapter), exports it
# merged onto the dequantised NF4 weights (export.py's default) and onto the original weights (--base_weights
# original), and evaluates both merged folders as plain bf16 models (--quantize none).
#   P=<dir holding data_cm6 from creditmix_prepare.py> bash gpu/export_check.sh      (any CUDA machine)
# CPU dry run: M=<tiny model dir> ST=2 LIMIT=4 P=<dir with make_carry's prepared data> OUT=/tmp/out bash gpu/export_check.sh
set -u
M=${M:-smollm2-135m}; P=${P:-/tmp/carry/prep}; R=${R:-runs}; ST=${ST:--1}; LIMIT=${LIMIT:-}; OUT=${OUT:-/tmp/out}
MIN=${MIN:-3.5}   # minutes of training at most (--max_minutes: stops at a step and saves the adapter)
export DISTILL_SLM_RUNS=$R L=$R/logs/export_check.txt
mkdir -p $R/logs $OUT && cp -r $P/data_cm6 $R/
D=$R/data_cm6/creditmix_val.jsonl; E="--batch_size 64 ${LIMIT:+--limit $LIMIT}"
type within >/dev/null 2>&1 || within() { echo "$*" >>"$L"; "$@" || echo "FAILED: $*" >>"$L"; }
within python3 sft_train.py --student $M --data $R/data_cm6/creditmix_sft.jsonl --save_dir $R/cm6_sft --epochs 6 \
  --per_device_train_batch_size 32 --gradient_accumulation_steps 1 --lr 1e-3 --max_len 512 --logging_steps 20 \
  --save_steps 100000 --gradient_checkpointing off --max_steps $ST --max_minutes $MIN > $R/logs/cm6_sft.log 2>&1
within python3 eval_creditmix.py --model_dir $R/cm6_sft --data $D $E --out $R/logs/eval_run_4bit.json > $R/logs/eval_run.log 2>&1
for W in trained original; do
  within python3 export.py --model_dir $R/cm6_sft --to merged --out $R/cm6_merged_$W --base_weights $W > $R/logs/export_$W.log 2>&1
  within python3 eval_creditmix.py --model_dir $R/cm6_merged_$W --quantize none --data $D $E \
    --out $R/logs/eval_merged_$W.json > $R/logs/eval_merged_$W.log 2>&1
done
python3 - "$R" <<'PY' | tee $OUT/export_check.txt
import json, sys
from pathlib import Path
R = Path(sys.argv[1])
print(f"{'model':<34} {'calibration':<11} {'accuracy':>8} {'macro_f1':>8}")
for name, f in [("run (4-bit base + adapter)", "eval_run_4bit"), ("merged onto NF4 weights (bf16)", "eval_merged_trained"),
                ("merged onto original (bf16)", "eval_merged_original")]:
    p = R / "logs" / f"{f}.json"
    if not p.is_file():
        print(f"{name:<34} missing ({p})"); continue
    for mode, m in json.loads(p.read_text())["calibrations"].items():
        print(f"{name:<34} {mode:<11} {m['accuracy']:>8.4f} {m['macro_f1']:>8.4f}")
for W in ("trained", "original"):
    p = R / "logs" / f"export_{W}.log"
    print(W, [ln for ln in p.read_text().splitlines() if ln.startswith("{")][-1:] if p.is_file() else "no log")
PY
cat $L; grep -h -E "save_dir|stopped" $R/logs/cm6_sft.log | cut -c1-300
