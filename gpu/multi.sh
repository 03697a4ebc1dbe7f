#!/usr/bin/env bash
# Two CUDA GPUs of one host: data-parallel throughput 1 vs 2 GPUs (Qwen2.5-3B shape), FSDP+QLoRA on a 7B shape,
# then constrained-decoding overhead (bench_idp.py) on random-weight Qwen2.5-3B- and SmolLM2-135M-shaped models
# (it compares the same number of decoding steps with and without the grammar, so the weights do not matter).
# docs: "More than one GPU". Any 2-GPU CUDA machine with requirements.txt installed:   bash gpu/multi.sh
. "$(dirname "$0")/env.sh"
C="--tokenizer ${TOKENIZER:-smollm2-135m} --model_cache $T"
A="python3 -m accelerate.commands.launch --num_processes 2"
within python3 bench.py --cases matmul $C >>$L 2>&1     # builds the 3B-shaped model once
within python3 bench.py --one sft --seq 2048 --accum 8 --steps 3 $C 2>>$L | grep BENCH >>$OUT/multi.jsonl
within $A --config_file configs/ddp.yaml bench.py --one sft --seq 2048 --accum 8 --steps 3 $C 2>>$L | grep BENCH >>$OUT/multi.jsonl
within python3 bench.py --cases matmul --shape qwen2.5-7b $C >>$L 2>&1
within $A --config_file configs/fsdp_qlora.yaml bench.py --one sft --shape qwen2.5-7b --seq 1024 --accum 2 --steps 2 $C 2>>$L | grep BENCH >>$OUT/multi.jsonl
sed -i 's/^BENCH //' $OUT/multi.jsonl; python3 bench.py --table $OUT/multi.jsonl | tee $OUT/multi_table.txt
within python3 bench.py --cases matmul --shape smollm2-135m $C >>$L 2>&1
for m in smollm2-135m qwen2.5-3b; do
  within python3 bench_idp.py --model_dir $T/$m --schemas data/idp_schema.json $D/sroie_schema.json --data $DOCS --n_docs 16 --batch_sizes 1 8 --out $OUT/bench_idp_$m.json 2>>$L | tee -a $OUT/bench_idp.txt
done
nvidia-smi --query-gpu=name --format=csv,noheader; echo "[$(( $(date +%s) - T0 ))s] done" >>$L
