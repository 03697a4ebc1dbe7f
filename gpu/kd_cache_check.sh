# KD from a cached teacher against KD with the teacher live, on real CreditMix (twenty features; docs/training.md).
# Trains the teacher (SFT of the embedded SmolLM2-135M, --max_minutes MIN), then everything else at once, each chain
# [cache ->] student -> holdout eval (1,314 rows) in the background, every student for KST steps with one seed:
#   plain SFT;  T=2: KD with the teacher live (--teacher), from its top-64 cache, from its sampled cache (64 draws,
#   teacher_cache.py --sampling sample);  T=1: KD live and from its top-64 cache (made at temperature 1).
#   P=<dir holding data_cm20 from creditmix_prepare.py> bash gpu/kd_cache_check.sh      (any CUDA machine)
# CPU dry run: M=<tiny model dir> ST=2 KST=2 MIN=1 LIMIT=4 P=<dir with make_carry's prepared data> OUT=/tmp/out R=/tmp/runs bash gpu/kd_cache_check.sh
# RUN picks the chains (default all: "sft live cached sampled live_t1 cached_t1"). Time on an H200, 2026-12-01,
# KST=240, all chains: teacher done at 260 s (120 s of training), the three caches at ~365 s, the SFT and live
# students at 470-560 s; the cached students, started last, did not finish in a 560 s budget. On a machine that
# limits a call to 10 minutes, run it in two calls on the same warm machine (RUN="sft live live_t1", then
# RUN="cached sampled cached_t1" with ST=0 to reuse the teacher). $L gets a time stamp per step
# ("<seconds since start> s: <step> done").
set -u
M=${M:-smollm2-135m}; P=${P:-/tmp/carry/prep}; R=${R:-runs}; ST=${ST:--1}; KST=${KST:-270}; LIMIT=${LIMIT:-}
RUN=" ${RUN:-sft live cached sampled live_t1 cached_t1} "
OUT=${OUT:-/tmp/out}; MIN=${MIN:-2}   # minutes of teacher training at most (--max_minutes)
export DISTILL_SLM_RUNS=$R L=$R/logs/kd_cache_check.txt OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}  # 7 processes at once
mkdir -p $R/logs $OUT && cp -r $P/data_cm20 $R/
D=$R/data_cm20; V=$D/creditmix_val.jsonl; E="--batch_size 64 ${LIMIT:+--limit $LIMIT}"; T=$R/cm20_teacher
CM="--per_device_train_batch_size 32 --gradient_accumulation_steps 1 --lr 1e-3 --max_len 512 --logging_steps 10 --save_steps 100000 --gradient_checkpointing off --seed 0"
KD="--data $D/creditmix_kd.jsonl --idp_mode --kd_loss forward_kl --alpha 0.5"
type within >/dev/null 2>&1 || within() { echo "$*" >>"$L"; "$@" || echo "FAILED: $*" >>"$L"; }
stamp() { echo "$SECONDS s: $1 done" >>"$L"; }
ev() { within python3 eval_creditmix.py --model_dir $R/$1 --data $V $E --out $R/logs/eval_$1.json \
  > $R/logs/eval_$1.log 2>&1; stamp "eval $1"; }
kd() { local n=$1; shift; within python3 kd_train.py --student $M $KD --save_dir $R/$n --max_steps $KST $CM "$@" \
  > $R/logs/$n.log 2>&1; stamp $n; ev $n; }
cache() { local n=$1; shift; within python3 teacher_cache.py --teacher $T --data $D/creditmix_kd.jsonl --idp_mode \
  --max_len 512 --out $R/$n "$@" > $R/logs/$n.log 2>&1; stamp $n; }
want() { [[ $RUN == *" $1 "* ]]; }
if [ "$ST" = 0 ] && [ -f $T/run.json ]; then echo "reusing the teacher in $T" >>"$L"; else
  within python3 sft_train.py --student $M --data $D/creditmix_sft.jsonl --save_dir $T --epochs 6 $CM \
    --max_steps $ST --max_minutes $MIN > $R/logs/teacher.log 2>&1; stamp teacher
  ev cm20_teacher &
fi
want sft && (within python3 sft_train.py --student $M --data $D/creditmix_sft.jsonl --save_dir $R/cm20_student_sft \
  --max_steps $KST $CM > $R/logs/cm20_student_sft.log 2>&1; stamp cm20_student_sft; ev cm20_student_sft) &
want live && kd cm20_kd_live --teacher $T --temperature 2 &
want live_t1 && kd cm20_kd_live_t1 --teacher $T --temperature 1 &
want cached && (cache cm20_cache --temperature 2
 kd cm20_kd_cached --teacher_cache $R/cm20_cache --cache_sampling topk --temperature 2) &
want sampled && (cache cm20_cache_sample --temperature 2 --sampling sample --draws 64 --seed 0
 kd cm20_kd_sampled --teacher_cache $R/cm20_cache_sample --cache_sampling sample --temperature 2) &
want cached_t1 && (cache cm20_cache_t1 --temperature 1
 kd cm20_kd_cached_t1 --teacher_cache $R/cm20_cache_t1 --cache_sampling topk --temperature 1) &
wait
python3 - "$R" <<'PY' | tee $OUT/kd_cache_check.txt
import json, sys
from pathlib import Path
R = Path(sys.argv[1])
runs = [("teacher (SFT)", "cm20_teacher"), ("student, SFT", "cm20_student_sft"),
        ("T=2 KD, teacher live", "cm20_kd_live"), ("T=2 KD, cached top-64", "cm20_kd_cached"),
        ("T=2 KD, cached sample N=64", "cm20_kd_sampled"),
        ("T=1 KD, teacher live", "cm20_kd_live_t1"), ("T=1 KD, cached top-64", "cm20_kd_cached_t1")]
print(f"{'model':<30} {'calibration':<11} {'bal. acc.':>9} {'macro_f1':>8}")
for name, run in runs:
    p = R / "logs" / f"eval_{run}.json"
    if not p.is_file():
        print(f"{name:<30} missing ({p})"); continue
    for mode, m in json.loads(p.read_text())["calibrations"].items():
        print(f"{name:<30} {mode:<11} {m['accuracy']:>9.4f} {m['macro_f1']:>8.4f}")
for _, run in runs:
    p = R / run / "run.json"
    if p.is_file():
        rec = json.loads(p.read_text())
        m = rec["metrics"]
        print(run, {k: m.get(k) for k in ("train_steps", "final_loss", "final_kd_loss", "tokens_per_s")},
              "peak", rec.get("peak_mem_gib"))
for c in ("cm20_cache", "cm20_cache_sample", "cm20_cache_t1"):
    log = R / "logs" / f"{c}.log"
    got = [ln for ln in log.read_text().splitlines() if ln.startswith("{")][-1:] if log.is_file() else "no log"
    print(c, got)
PY
cat $L; grep -h -E "save_dir|stopped|Error|NOTE: .*hold only" $R/logs/*.log | cut -c1-300
