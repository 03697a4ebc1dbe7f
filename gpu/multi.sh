# Device call on nvidia-h100-x2: data-parallel throughput 1 vs 2 GPUs (Qwen2.5-3B shape), FSDP+QLoRA on a 7B shape,
# then constrained-decoding overhead (bench_idp.py) on random-weight Qwen2.5-3B- and SmolLM2-135M-shaped models
# (it compares the same number of decoding steps with and without the grammar, so the weights do not matter).
#   run: . gpu/setup.sh && bash gpu/multi.sh        (carry .whl .carry/tok .carry/idp)
set -u
export L=$OUT/multi.log BUDGET=${BUDGET:-540}
C="--tokenizer .carry/tok --model_cache /tmp/bench_models"
A="python3 -m accelerate.commands.launch --num_processes 2"
within python3 bench.py --cases matmul $C >>$L 2>&1     # builds the 3B-shaped model once
within python3 bench.py --one sft --seq 2048 --accum 8 --steps 3 $C 2>>$L | grep BENCH >>$OUT/multi.jsonl
within $A --config_file configs/ddp.yaml bench.py --one sft --seq 2048 --accum 8 --steps 3 $C 2>>$L | grep BENCH >>$OUT/multi.jsonl
within python3 bench.py --cases matmul --config qwen2.5-7b $C >>$L 2>&1
within $A --config_file configs/fsdp_qlora.yaml bench.py --one sft --config qwen2.5-7b --seq 1024 --accum 2 --steps 2 $C 2>>$L | grep BENCH >>$OUT/multi.jsonl
sed -i 's/^BENCH //' $OUT/multi.jsonl; python3 bench.py --table $OUT/multi.jsonl | tee $OUT/multi_table.txt
within python3 bench.py --cases matmul --config smollm2-135m $C >>$L 2>&1
for m in smollm2-135m qwen2.5-3b; do
  within python3 bench_idp.py --model_dir /tmp/bench_models/$m --schemas data/idp_schema.json .carry/idp/sroie_schema.json --data .carry/idp/sroie_idp_test.jsonl --n_docs 16 --batch_sizes 1 8 --out $OUT/bench_idp_$m.json 2>>$L | tee -a $OUT/bench_idp.txt
done
nvidia-smi --query-gpu=name --format=csv,noheader; echo "[$(( $(date +%s) - T0 ))s] done" >>$L
