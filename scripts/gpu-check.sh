#!/usr/bin/env bash
# GPU check (docs/benchmarks.md "GPU check"): the paper suite's equal-batch rows for MiniLM and SmolLM2 at fp32
# and bf16 with measured peak memory, plus data parallel and FSDP2 runs when 2 or more GPUs are present; writes
# OUT_DIR/machine.json, suite/, ddp-summary.json, fsdp-summary.json, steps.tsv and summary.md. Sized for
# under 8 minutes on one H200-class GPU (every step has a time limit).
#
#   scripts/gpu-check.sh [OUT_DIR]          # default OUT_DIR: docs/bench/gpu-check
#
# Knobs (environment): GPU_CHECK_DEVICE (cuda; cpu runs the same steps on the CPU, for tests),
# GPU_CHECK_MODELS (minilm,smollm2), GPU_CHECK_PRECISIONS (fp32,bf16), GPU_CHECK_METHODS (empty: every suite
# method), GPU_CHECK_REPEATS (3 interleaved timing repeats, medians in the report), GPU_CHECK_NPROC
# (processes of the distributed runs: the GPU count on cuda, 1 = skip on cpu),
# GPU_CHECK_DIST_MODEL (minilm), GPU_CHECK_DIST_STEPS (40), GPU_CHECK_SUITE_TIMEOUT (450 s),
# GPU_CHECK_DIST_TIMEOUT (60 s per run).
set -euo pipefail

OUT=${1:-docs/bench/gpu-check}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
MODELS=${GPU_CHECK_MODELS:-minilm,smollm2}
PRECISIONS=${GPU_CHECK_PRECISIONS:-fp32,bf16}
METHODS=${GPU_CHECK_METHODS:-}
REPEATS=${GPU_CHECK_REPEATS:-3}
DIST_MODEL=${GPU_CHECK_DIST_MODEL:-minilm}
DIST_STEPS=${GPU_CHECK_DIST_STEPS:-40}
SUITE_TIMEOUT=${GPU_CHECK_SUITE_TIMEOUT:-450}
DIST_TIMEOUT=${GPU_CHECK_DIST_TIMEOUT:-60}
PYTHON=${PYTHON:-python}
# The suite forks its workers: CUDA availability is asked through NVML so that no process initializes CUDA before a fork.
export PYTORCH_NVML_BASED_CUDA_CHECK=1

if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT")" ]; then
  echo "gpu-check: '$OUT' exists and is not empty: pass a new OUT_DIR (or move the old results away)" >&2
  exit 2
fi
mkdir -p "$OUT"
: > "$OUT/steps.tsv"

# step NAME LIMIT_S COMMAND...: runs COMMAND under `timeout`, records name, seconds, exit status and command.
step() {
  local name=$1 limit=$2 code=0 t0=$SECONDS
  shift 2
  echo "== gpu-check: $name (limit ${limit} s): $*"
  timeout --kill-after 15 "$limit" "$@" || code=$?
  printf '%s\t%s\t%s\t%s\n' "$name" $((SECONDS - t0)) "$code" "$*" >> "$OUT/steps.tsv"
  if [ "$code" -eq 124 ] || [ "$code" -eq 137 ]; then
    echo "gpu-check: step '$name' ran past its ${limit} s limit (exit $code)" >&2
  elif [ "$code" -ne 0 ]; then
    echo "gpu-check: step '$name' failed (exit $code); its output is above" >&2
  fi
  return "$code"
}

step machine 60 "$PYTHON" -c "import sys; from layerwise.measure.gpu_check import write_machine; \
print(write_machine(sys.argv[1], sys.argv[2]))" "$OUT" "$DEVICE"
GPUS=$("$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1]))['gpu_count'])" "$OUT/machine.json")
if [ "$DEVICE" = cuda ]; then
  NPROC=${GPU_CHECK_NPROC:-$GPUS}
  command -v nvidia-smi > /dev/null && nvidia-smi
else
  NPROC=${GPU_CHECK_NPROC:-1}
fi

suite=("$PYTHON" -m layerwise bench --suite paper --quick --no-scaling --device "$DEVICE" --models "$MODELS"
       --precisions "$PRECISIONS" --repeats "$REPEATS" --output "$OUT/suite")
if [ -n "$METHODS" ]; then suite+=(--methods "$METHODS"); fi
step suite "$SUITE_TIMEOUT" "${suite[@]}"

# Data parallel and FSDP2 (LIFT, a switch every 10 steps); a failure here still leaves the suite's report.
failed=0
if [ "$NPROC" -ge 2 ]; then
  runs=$(mktemp -d)
  trap 'rm -rf "$runs"' EXIT
  train=(torchrun --standalone --nproc-per-node "$NPROC" -m layerwise train --model "$DIST_MODEL" --data rotten_tomatoes
         --method lift --max-steps "$DIST_STEPS" --set method.switch_every=10 --set "train.batch_size=$((8 * NPROC))"
         --set data.max_length=64 --set train.warmup_steps=0 --set train.progress=false --set train.eval_before=false
         --set train.eval_after=false --set train.save_model=false --set train.sample_generations=0)
  for mode in ddp fsdp; do
    extra=()
    if [ "$mode" = fsdp ]; then extra=(--set train.fsdp=true); fi
    if step "$mode" "$DIST_TIMEOUT" "${train[@]}" --output "$runs/$mode" "${extra[@]}"; then
      cp "$runs/$mode/summary.json" "$OUT/$mode-summary.json"
    else
      failed=1
    fi
  done
else
  echo "== gpu-check: data parallel and FSDP2 skipped ($NPROC process(es); they need 2 or more GPUs)"
fi

step report 60 "$PYTHON" -m layerwise measure gpu-check-report "$OUT"
exit "$failed"
