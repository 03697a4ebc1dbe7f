# DEV ONLY (not for users): source at the start of a call on a borrowed GPU machine that has no network and does not
# carry the project's venv. Installs the carried wheels (dev/fetch_wheels.sh) into /tmp/site (the project's pins) and
# /tmp/unsloth_site (Unsloth and its older TRL/datasets), and defines `within` (a time budget for the call's lines).
#   . dev/device_setup.sh WHEEL_DIR          (WHEEL_DIR holds o/ = ours and u/ = Unsloth's)
W=${1:-.whl}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false DISTILL_SLM_CACHE=/tmp/dslm_cache
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
I="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade"
[ -f /tmp/site/.ok ] || { $I --target /tmp/site $W/o/*.whl && touch /tmp/site/.ok; }
[ -f /tmp/unsloth_site/.ok ] || [ ! -d $W/u ] || { $I --target /tmp/unsloth_site $W/u/*.whl && touch /tmp/unsloth_site/.ok; }
export PYTHONPATH=/tmp/site:$PWD UNSLOTH_SITE=/tmp/unsloth_site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft, trl, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__, 'bnb', bitsandbytes.__version__)"
# within CMD...: run CMD if at least 20 s are left of BUDGET seconds (default 540) counted from here, killed when
# they run out; logs its start (and any failure) to $L.
export T0=$(date +%s) L=${L:-/tmp/device.log}
within() { local left=$(( ${BUDGET:-540} - $(date +%s) + T0 ))
           if [ $left -lt 20 ]; then echo "SKIPPED (time): $*" | tee -a "$L"; return; fi
           echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$L"; timeout $left "$@" >>"$L" 2>&1 || echo "FAILED/TIMEOUT: $*" | tee -a "$L"; }
export -f within
