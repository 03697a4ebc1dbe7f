# codegen_star.py on a GPU: CodeGen distillation with the sandbox as verifier (STaR: the student samples MBPP-train,
# its passing answers train it, failing ones are DPO rejected) for the embedded SmolLM2-135M in bf16 (training with
# --quantize none, so inference loads bf16 too); HumanEval and MBPP-test pass@1 greedy at the base and after every
# round, pass@1 / pass@10 from 20 samples at T 0.8 at the last round (docs/codegen.md#distillation-with-the-sandbox-as-verifier).
#   P=<dir holding mbpp.jsonl and humaneval.jsonl> bash gpu/codegen_star.sh      (any CUDA machine; sized for ~8 min on an H200)
# More: SAMPLED_AT=all (pass@10 every round, ~4 min more per round), ROUNDS=3, N=8, TRAIN=sft, TEACHER=<model spec>,
# FORMAT=both (each MBPP task also sampled as HumanEval asks it: --train_format), M=<an SFT run dir to start from>,
# EVAL_AT=last (only the last round's student evaluated: the base's bf16 pass@1 is in docs/results.md; ~3 min less
# per round skipped), RESUME=1 (continue the run in $R/codegen_star after its last finished round, e.g. a second
# call with ROUNDS raised).
# CPU dry run: M=<tiny model dir> P=<dir> ROUNDS=1 N=2 LIMIT=4 EVAL_LIMIT=2 TOK=16 ES=2 K=1,2 bash gpu/codegen_star.sh
set -u
M=${M:-smollm2-135m}; P=${P:-/tmp/carry/prep}; R=${R:-runs}; OUT=${OUT:-runs/gpu}
ROUNDS=${ROUNDS:-2}; N=${N:-4}; TRAIN=${TRAIN:-sft+dpo}; SAMPLED_AT=${SAMPLED_AT:-last}; TEACHER=${TEACHER:-}
EVAL_AT=${EVAL_AT:-all}; RESUME=${RESUME:-}; FORMAT=${FORMAT:-mbpp}
LIMIT=${LIMIT:-0}; EVAL_LIMIT=${EVAL_LIMIT:-0}; TOK=${TOK:-512}; ES=${ES:-20}; K=${K:-1,10}
MIN=${MIN:-1}    # minutes per training at most (--max_minutes: stops at a step and saves the adapter)
BS=${BS:-1024}   # sequences per generate() call (a 135M model leaves an H200 mostly idle at 64)
export DISTILL_SLM_RUNS=$R
mkdir -p $R/logs $OUT
[ -n "$RESUME" ] || : > $R/logs/codegen_star.log  # a resumed run's log goes on where it stopped
T="--quantize none --per_device_train_batch_size 16 --gradient_accumulation_steps 1 --max_len 1024 --gradient_checkpointing off --logging_steps 5 --save_steps 100000 --max_minutes $MIN --report_to none"
python3 codegen_star.py --student $M ${TEACHER:+--teacher $TEACHER} --train_data $P/mbpp.jsonl \
  --eval_data $P/humaneval.jsonl $P/mbpp.jsonl --rounds $ROUNDS --num_samples $N --temperature 0.8 --top_p 0.95 \
  --max_new_tokens $TOK --eval_max_new_tokens $TOK --batch_sequences $BS --limit $LIMIT --eval_limit $EVAL_LIMIT \
  --eval_samples $ES --k $K --train_format $FORMAT --eval_at $EVAL_AT --sampled_eval_at $SAMPLED_AT --timeout 3 \
  --eval_timeout 5 --train $TRAIN \
  --train_args "$T --epochs 2 --lr 2e-4" --dpo_args "$T --epochs 1 --lr 5e-6 --beta 0.1" \
  --save_dir $R/codegen_star ${RESUME:+--resume} 2>> $R/logs/codegen_star.log | tee $OUT/codegen_star.txt
grep -E "^(precision|round [0-9]|NOTE|error)" $R/logs/codegen_star.log | cut -c1-400 | tee -a $OUT/codegen_star.txt
python3 - "$R/codegen_star/run.json" <<'PY' | tee -a $OUT/codegen_star.txt
import json, sys
rec = json.load(open(sys.argv[1]))
print(f"wall {rec['wall_time_s']} s, peak GPU memory {rec['peak_mem_gib']} GiB, device {rec['device']}")
for r in rec["metrics"]["per_round"]:
    s = r.get("sampling") or {}
    print(f"round {r['round']}: precision {r.get('precision')}, generate {s.get('generate_s')} s, sandbox "
          f"{s.get('sandbox_s')} s, train {r.get('train_s')} s, eval {r.get('eval_s')} s, status {s.get('status')}")
PY
