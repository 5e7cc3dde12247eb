#!/usr/bin/env bash
# The accelerator figures of mixllm-jax in one bounded run (at most ~5 minutes; see benchmarks/gpu.py):
# route_batch decisions/s at K=16, d=384 for B up to 65,536 beside the matmul peak measured in the
# same run, text -> decision texts/s at max length 128 (random weights of MiniLM's shape when the
# weights are not installed), updates/s and compile times. Writes benchmarks/results/gpu-<device>.md
# (and .json) on a GPU, runs/gpu-bench/ elsewhere; with $OUT set (the device tool), copies them there.
#
#   benchmarks/gpu.sh                      # on the GPU machine: its own python3, no venv, no registry
#   JAX_PLATFORMS=cpu benchmarks/gpu.sh --smoke --out /tmp/gpu-smoke      # test the script on a CPU
#
# Environment: PYTHON (default python3), GPU_BENCH_LIMIT_S (hard limit, default 290 s).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
limit="${GPU_BENCH_LIMIT_S:-290}"
args=("$@")
if [ -n "${OUT:-}" ]; then
  args+=(--copy-to "$OUT")
fi
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$py" -c 'import jax, sys; print("python", sys.version.split()[0], "jax", jax.__version__, "backend", jax.default_backend(), jax.devices())'
# the python run keeps 20 s of the limit for the report: rows that would start later are skipped
status=0
timeout --signal=INT --kill-after=10 "$limit" "$py" -m benchmarks.gpu --deadline-s "$((limit - 20))" "${args[@]}" || status=$?
exit "$status"
