# Device call on nvidia-h100-x2: data-parallel throughput 1 vs 2 GPUs (Qwen2.5-3B shape), FSDP+QLoRA on a 7B shape.
#   run: . gpu/setup.sh && bash gpu/multi.sh        (carry .whl .carry/tok)
set -u
L=$OUT/multi.log
C="--tokenizer .carry/tok --model_cache /tmp/bench_models"
python3 bench.py --cases matmul $C >>$L 2>&1     # builds the 3B-shaped model once
python3 bench.py --one sft --seq 2048 --accum 8 --steps 3 $C 2>>$L | grep BENCH >>$OUT/multi.jsonl
python3 -m accelerate.commands.launch --config_file configs/ddp.yaml --num_processes 2 bench.py --one sft --seq 2048 --accum 8 --steps 3 $C 2>>$L | grep BENCH >>$OUT/multi.jsonl
python3 bench.py --cases matmul --config qwen2.5-7b $C >>$L 2>&1
python3 -m accelerate.commands.launch --config_file configs/fsdp_qlora.yaml --num_processes 2 bench.py --one sft --config qwen2.5-7b --seq 1024 --accum 2 --steps 2 $C 2>>$L | grep BENCH >>$OUT/multi.jsonl
sed -i 's/^BENCH //' $OUT/multi.jsonl; cat $OUT/multi.jsonl; python3 bench.py --table $OUT/multi.jsonl | tee $OUT/multi_table.txt
nvidia-smi --query-gpu=name --format=csv,noheader
