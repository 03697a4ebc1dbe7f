#!/usr/bin/env bash
# docs/training.md, "Padding-free batches": sft_train.py on the embedded SmolLM2-135M and the real twenty-feature
# CreditMix file (creditmix_prepare.py --features rich) at micro-batch 32, padded against --padding_free, the same
# seed and steps (LoRA dropout 0, so the two runs differ only by the batch layout), one after the other on an idle GPU;
# then both adapters scored on the holdout (eval_creditmix.py, 1,314 rows) at once. Prints examples/s
# (steps x batch / train runtime), tokens/s, final loss, peak memory and accuracy on the balanced holdout (= balanced
# accuracy) side by side; the table also goes to $OUT/padding_free.txt.
#   P=<dir holding data_cm20 from creditmix_prepare.py --features rich> bash gpu/padding_free.sh   (any CUDA machine)
# CPU dry run: M=/tmp/sm_tiny/tiny ST=2 LIMIT=2 P=/tmp/prepchk OUT=/tmp/pf_out R=/tmp/pf_runs bash gpu/padding_free.sh
# Time on an H200 (not measured yet): a 32-row step of this model ran at ~2.3 steps/s padded (gpu/kd_cache_check.sh's
# teacher), so ST=200 steps ~1.5 min padded; padding-free on sdpa attends over one 32 x ~255-token sequence (a dense
# block-diagonal mask), perhaps twice as slow; plus loading and the two evaluations, ~5-6 min in all. Lower ST if short.
. "$(dirname "$0")/env.sh"
M=${M:-smollm2-135m}; P=${P:-/tmp/carry/prep}; R=${R:-runs}; ST=${ST:-200}; LIMIT=${LIMIT:-}; DROP=${DROP:-0}
export DISTILL_SLM_RUNS=$R
mkdir -p $R/logs && cp -r $P/data_cm20 $R/
D=$R/data_cm20; V=$D/creditmix_val.jsonl
# --max_memory_gb 0: exactly 32 rows per micro-step in both runs (the cap's probe could pick fewer)
CM="--student $M --data $D/creditmix_sft.jsonl --max_steps $ST --per_device_train_batch_size 32"
CM="$CM --gradient_accumulation_steps 1 --lr 1e-3 --max_len 512 --lora_dropout $DROP --logging_steps 10"
CM="$CM --save_steps 100000 --gradient_checkpointing off --max_memory_gb 0 --report_to none --seed 0"
for mode in padded padding_free; do
  rm -rf $R/cm20_$mode
  within python3 sft_train.py $CM --save_dir $R/cm20_$mode $([ $mode = padding_free ] && echo --padding_free) \
    > $R/logs/cm20_$mode.log 2>&1 || echo "FAILED: sft_train.py $mode (see $R/logs/cm20_$mode.log)"
done
for mode in padded padding_free; do
  within python3 eval_creditmix.py --model_dir $R/cm20_$mode --data $V --batch_size 64 ${LIMIT:+--limit $LIMIT} \
    --out $R/logs/eval_cm20_$mode.json > $R/logs/eval_cm20_$mode.log 2>&1 &
done
wait
python3 - "$R" <<'PY' | tee "$OUT/padding_free.txt"
import json, sys
from pathlib import Path
R = Path(sys.argv[1])
print(f"{'batches':<13} {'steps':>5} {'examples/s':>10} {'tokens/s':>9} {'final loss':>10} {'peak GiB':>8} "
      f"{'calibration':<11} {'bal. acc.':>9} {'macro_f1':>8}")
for mode in ("padded", "padding_free"):
    run, ev = R / f"cm20_{mode}" / "run.json", R / "logs" / f"eval_cm20_{mode}.json"
    if not run.is_file():
        print(f"{mode:<13} missing {run}"); continue
    rec = json.loads(run.read_text()); m, a = rec["metrics"], rec["args"]
    rows = m["train_steps"] * a["per_device_train_batch_size"] * a["gradient_accumulation_steps"]
    eps = rows / m["train_runtime_s"] if m["train_runtime_s"] else float("nan")
    e = json.loads(ev.read_text()) if ev.is_file() else None
    cal = e["chosen_calibration"]["calibration"] if e and isinstance(e.get("chosen_calibration"), dict) else "raw"
    acc = e["calibrations"][cal] if e else {}
    print(f"{mode:<13} {m['train_steps']:>5} {eps:>10.1f} {m['tokens_per_s']:>9.0f} {m['final_loss'] or 0:>10.4f} "
          f"{rec.get('peak_mem_gib') or 0:>8.2f} {cal:<11} {acc.get('accuracy', float('nan')):>9.4f} "
          f"{acc.get('macro_f1', float('nan')):>8.4f}")
    print(f"{'':<13} padding_free={a['padding_free']} speedups={m['speedups']} train_loss={m['train_loss']} "
          f"tokens_seen={m['tokens_seen']} runtime={m['train_runtime_s']} s")
PY
grep -h -E "save_dir|Error|NOTE" $R/logs/cm20_*.log | cut -c1-300
