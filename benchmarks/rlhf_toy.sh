#!/usr/bin/env bash
# The whole toy online-RLHF experiment in the background of a shared machine: WORKERS processes
# nice'd, XLA single-threaded, pinned to core CORE (so never more than that core; CORE= lets them
# use any), sharing compiled programs through JAX's persistent cache; resumable (rerun to continue).
# Tuning first, then the main study and the nudge test, then the report.
#   bash benchmarks/rlhf_toy.sh [OUT]        # OUT defaults to runs/rlhf/toy; logs in OUT/logs
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/rlhf/toy}
PY=${PYTHON:-.venv/bin/python}
CORE=${CORE-1}
WORKERS=${WORKERS:-2}
PIN=()
if [ -n "$CORE" ]; then PIN=(taskset -c "$CORE"); fi
mkdir -p "$OUT/logs"
export XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/effjax/jax}
phase() {
  local pids=()
  for ((shard = 0; shard < WORKERS; shard++)); do
    "${PIN[@]}" nice -n 5 "$PY" benchmarks/rlhf_toy.py run --out "$OUT" --study "$@" \
      --shard "$shard/$WORKERS" --no-progress > "$OUT/logs/$1-$shard.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
}
# The SFT policy is trained (and cached) once, before the workers start.
"$PY" -m effjax.rlhf.cli describe --config configs/rlhf_toy.toml > "$OUT/logs/describe.log" 2>&1
phase tune_enn tune_offline
phase main nudge
"$PY" benchmarks/rlhf_toy.py report --out "$OUT" --load "$(uptime | sed 's/.*load average: //')"
