#!/usr/bin/env bash
# Fetch (on this machine, which reaches PyPI) the wheels the GPU image lacks, into .whl/ (git-ignored), for
# gpu/setup.sh to install there. bitsandbytes is slimmed to its CUDA 13 libraries (the image's torch is cu130) so
# that the wheels, the tokenizer and half of the embedded model's GGUF fit one 64 MiB call.
#   bash gpu/fetch_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
P="--only-binary=:all: --python-version 3.12 --implementation cp --no-deps -q -d .whl"
M="--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 --platform any"
mkdir -p .whl
python3 -m pip download $P $M trl==1.16.0 datasets==5.2.0 gguf==0.19.0 peft==0.21.2 accelerate==1.15.0 dill multiprocess \
  xgrammar==0.2.8 apache-tvm-ffi jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing rpds-py \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection
python3 -m pip download $P --platform manylinux_2_24_x86_64 bitsandbytes==0.50.2
tmp=$(mktemp -d); (cd "$tmp" && unzip -q "$OLDPWD"/.whl/bitsandbytes-0.50.2-*.whl \
  && rm -f bitsandbytes/libbitsandbytes_cuda1[12]*.so bitsandbytes/libbitsandbytes_rocm*.so \
  && rm "$OLDPWD"/.whl/bitsandbytes-0.50.2-*.whl && zip -q -r "$OLDPWD"/.whl/bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl .)
rm -rf "$tmp"; du -sh .whl
