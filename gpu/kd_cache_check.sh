# KD from a cached teacher against KD with the teacher live, on real CreditMix (twenty features; docs/training.md).
# Trains the teacher (SFT of the embedded SmolLM2-135M), caches its top-64 log-probabilities on the KD file once
# (teacher_cache.py), then trains the same student three ways for the same steps and seed: plain SFT, logit KD with
# the teacher loaded (--teacher), logit KD from the cache (--teacher_cache, the teacher never loaded), and evaluates
# all four on the 1,314-row holdout.
#   P=<dir holding data_cm20 from creditmix_prepare.py> bash gpu/kd_cache_check.sh      (any CUDA machine)
# CPU dry run: M=<tiny model dir> ST=2 KST=2 LIMIT=4 P=<dir with make_carry's prepared data> OUT=/tmp/out bash gpu/kd_cache_check.sh
set -u
M=${M:-smollm2-135m}; P=${P:-/tmp/carry/prep}; R=${R:-runs}; ST=${ST:--1}; KST=${KST:-90}; LIMIT=${LIMIT:-}
OUT=${OUT:-/tmp/out}; MIN=${MIN:-2}   # minutes of teacher training at most (--max_minutes)
export DISTILL_SLM_RUNS=$R L=$R/logs/kd_cache_check.txt
mkdir -p $R/logs $OUT && cp -r $P/data_cm20 $R/
D=$R/data_cm20; V=$D/creditmix_val.jsonl; E="--batch_size 64 ${LIMIT:+--limit $LIMIT}"
CM="--per_device_train_batch_size 32 --gradient_accumulation_steps 1 --lr 1e-3 --max_len 512 --logging_steps 10 --save_steps 100000 --gradient_checkpointing off --seed 0"
KD="--idp_mode --kd_loss forward_kl --temperature 2 --alpha 0.5"
type within >/dev/null 2>&1 || within() { echo "$*" >>"$L"; "$@" || echo "FAILED: $*" >>"$L"; }
within python3 sft_train.py --student $M --data $D/creditmix_sft.jsonl --save_dir $R/cm20_teacher --epochs 6 $CM \
  --max_steps $ST --max_minutes $MIN > $R/logs/teacher.log 2>&1
within python3 teacher_cache.py --teacher $R/cm20_teacher --data $D/creditmix_kd.jsonl --idp_mode --max_len 512 \
  --temperature 2 --out $R/cm20_cache > $R/logs/cache.log 2>&1 &
within python3 sft_train.py --student $M --data $D/creditmix_sft.jsonl --save_dir $R/cm20_student_sft --max_steps $KST $CM \
  > $R/logs/student_sft.log 2>&1 &
within python3 kd_train.py --student $M --teacher $R/cm20_teacher --data $D/creditmix_kd.jsonl $KD --save_dir $R/cm20_kd_live \
  --max_steps $KST $CM > $R/logs/kd_live.log 2>&1 &
within python3 eval_creditmix.py --model_dir $R/cm20_teacher --data $V $E --out $R/logs/eval_teacher.json > $R/logs/eval_teacher.log 2>&1 &
wait
within python3 kd_train.py --student $M --teacher_cache $R/cm20_cache --data $D/creditmix_kd.jsonl $KD --save_dir $R/cm20_kd_cached \
  --max_steps $KST $CM > $R/logs/kd_cached.log 2>&1 &
for m in cm20_student_sft cm20_kd_live; do
  within python3 eval_creditmix.py --model_dir $R/$m --data $V $E --out $R/logs/eval_$m.json > $R/logs/eval_$m.log 2>&1 &
done
wait
within python3 eval_creditmix.py --model_dir $R/cm20_kd_cached --data $V $E --out $R/logs/eval_cm20_kd_cached.json \
  > $R/logs/eval_cm20_kd_cached.log 2>&1
python3 - "$R" <<'PY' | tee $OUT/kd_cache_check.txt
import json, sys
from pathlib import Path
R = Path(sys.argv[1])
print(f"{'model':<36} {'calibration':<11} {'bal. acc.':>9} {'macro_f1':>8}")
for name, f in [("teacher (SFT)", "eval_teacher"), ("student, SFT", "eval_cm20_student_sft"),
                ("student, KD, teacher live", "eval_cm20_kd_live"), ("student, KD, cached top-64", "eval_cm20_kd_cached")]:
    p = R / "logs" / f"{f}.json"
    if not p.is_file():
        print(f"{name:<36} missing ({p})"); continue
    for mode, m in json.loads(p.read_text())["calibrations"].items():
        print(f"{name:<36} {mode:<11} {m['accuracy']:>9.4f} {m['macro_f1']:>8.4f}")
for run in ("cm20_teacher", "cm20_student_sft", "cm20_kd_live", "cm20_kd_cached"):
    p = R / run / "run.json"
    if p.is_file():
        rec = json.loads(p.read_text())
        m = rec["metrics"]
        print(run, {k: m.get(k) for k in ("train_steps", "final_loss", "tokens_per_s")}, "peak", rec.get("peak_mem_gib"))
log = R / "logs" / "cache.log"
print("cache", [ln for ln in log.read_text().splitlines() if ln.startswith("{")][-1:] if log.is_file() else "no log")
PY
cat $L; grep -h -E "save_dir|stopped|Error" $R/logs/*.log | cut -c1-300
