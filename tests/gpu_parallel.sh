#!/usr/bin/env bash
# The GPU tests (pytest -m gpu) in N pytest processes sharing one GPU. Their time is Triton compiling kernel variants
# on the CPU, one at a time per process: serially they took over 9 minutes on the H200 machine (16 cores), past the
# device tool's 10-minute call; in 4 processes about 5. Tests are dealt round-robin so the heavy ones spread out.
#
#   tests/gpu_parallel.sh [N] [more pytest args]      # logs: ${OUT:-.}/gpu-tests-K.log, a summary on stdout
#
# Exits non-zero when any process failed (or collected nothing).
set -uo pipefail
cd "$(dirname "$0")/.."
n="${1:-4}"
shift || true
out="${OUT:-.}"
mapfile -t ids < <(python -m pytest -q -m gpu --collect-only -p no:cacheprovider tests "$@" 2>/dev/null | grep '::')
if [ "${#ids[@]}" -eq 0 ]; then
  echo "no GPU tests collected"
  exit 1
fi
pids=()
for ((k = 0; k < n; k++)); do
  part=()
  for ((i = k; i < ${#ids[@]}; i += n)); do part+=("${ids[i]}"); done
  [ "${#part[@]}" -eq 0 ] && continue
  python -m pytest -q -p no:cacheprovider -rs --durations=5 "$@" "${part[@]}" > "$out/gpu-tests-$k.log" 2>&1 &
  pids+=($!)
done
status=0
for k in "${!pids[@]}"; do
  wait "${pids[k]}" || status=1
  echo "== part $k: $(grep -E ' in [0-9.]+s' "$out/gpu-tests-$k.log" | tail -1)"
  grep -E '^(FAILED|ERROR)' "$out/gpu-tests-$k.log"
done
exit $status
