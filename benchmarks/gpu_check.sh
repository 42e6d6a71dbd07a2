#!/usr/bin/env bash
# The GPU check as one command for the GPU machine: install hf-multimax without its dependencies (the image has
# torch, triton, transformers and no package registry), then run each part of benchmarks/gpu_check.py in its own
# process, all writing to $OUT (gpu_check.json/.md/.png, this log as gpu_check.log); the short table comes last.
#
#   bash benchmarks/gpu_check.sh correctness attention   # one command (~9 min on an H200)
#   bash benchmarks/gpu_check.sh end_to_end tests        # the other (~6 min)
#   bash benchmarks/gpu_check.sh                         # all four parts (longer than one 10-minute command)
#   OUT=/tmp/dry bash benchmarks/gpu_check.sh --dry-run  # the same on a CPU, tiny sizes, Triton's interpreter
#
# GPU_CHECK_SECONDS (default 570) bounds the whole command: each part gets the time left, at most 420 s, and a part
# is not started with less than 90 s left. GPU_CHECK_NO_INSTALL=1 skips the install (a checkout already installed).
# Exit code 1 when any part failed.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder for the results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log="$OUT/gpu_check.log"
python=${PYTHON:-python3}

flags=()
parts=()
for arg in "$@"; do
  case "$arg" in
    --*) flags+=("$arg") ;;
    *) parts+=("$arg") ;;
  esac
done
[ ${#parts[@]} -eq 0 ] && parts=(correctness attention end_to_end tests)

start=$SECONDS
total=${GPU_CHECK_SECONDS:-570}
{
  echo "== gpu_check.sh ${parts[*]} ${flags[*]} ($(date -u +%FT%TZ))"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
  # No build isolation: there is no registry to fetch setuptools from; the image's own is used.
  if [ "${GPU_CHECK_NO_INSTALL:-0}" = 1 ]; then
    echo "GPU_CHECK_NO_INSTALL=1: not installing"
  else
    "$python" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3 \
      || echo "pip install failed: running from the source tree"
  fi
} >>"$log" 2>&1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the source tree either way

status=0
for part in "${parts[@]}"; do
  left=$((total - (SECONDS - start)))
  if [ "$left" -lt 90 ]; then
    echo "== $part: not started, ${left}s left of GPU_CHECK_SECONDS=$total" | tee -a "$log"
    status=1
    continue
  fi
  budget=$((left - 60 < 420 ? left - 60 : 420))
  # Progress lines (indented) go to the log only, so that the command's output ends with the table.
  "$python" benchmarks/gpu_check.py --part "$part" --budget "$budget" --output_dir "$OUT" --no-summary \
    ${flags[@]+"${flags[@]}"} \
    2>&1 | tee -a "$log" | grep --line-buffered -v "^  "
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
"$python" benchmarks/gpu_check.py --report-from "$OUT/gpu_check.json" --output_dir "$OUT" 2>&1 | tee -a "$log"
exit $status
