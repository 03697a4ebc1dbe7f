# Sourced by the gpu/ scripts: where rows and logs go ($OUT, default runs/gpu; log $L), `within` (dev/setup.sh's
# per-call time budget on a borrowed machine, else it just runs the command), the random models' cache ($T) and the
# IDP documents the benchmarks decode ($DOCS: SROIE's test split in $IDP_DATA when present, else the sample).
set -u
OUT=${OUT:-runs/gpu}; mkdir -p "$OUT"; L=${L:-$OUT/log.txt}
type within >/dev/null 2>&1 || within() { "$@"; }
D=${IDP_DATA:-data}; T=${MODEL_CACHE:-/tmp/bench_models}
[ -f $D/sroie_idp_test.jsonl ] && DOCS=$D/sroie_idp_test.jsonl || DOCS=$D/idp_test.jsonl
