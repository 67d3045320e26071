#!/usr/bin/env bash
# The learning-rate screen behind each method's default_lr (docs/quality.md): one run per (method, lr) at seed 0 under
# the model's quality protocol (protocol.sh). The quality tables use seeds 1-3, not this one.
# Usage: bash docs/bench/quality/screen.sh minilm|smollm2 [WORK_DIR]   (writes MODEL-screen.json/.md next to this script)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/protocol.sh" "${1:-}"
work="${2:-$(mktemp -d)}"
# Three lrs a third of a decade apart around what each kind of method is known to want; where the best sat at the
# top of the first MiniLM grid (freeze, lora, ist) one more lr above it.
grid=("full 3e-5 1e-4 3e-4" "lift 1e-4 3e-4 1e-3" "lisa 1e-4 3e-4 1e-3" "freeze 1e-4 3e-4 1e-3 3e-3" "salf 1e-4 3e-4 1e-3"
      "lora 3e-4 1e-3 3e-3 1e-2" "ist 1e-3 3e-3 1e-2 3e-2" "meft 1e-3 3e-3 1e-2")
labels=(); sets=()
for row in "${grid[@]}"; do
  read -r method lrs <<<"$row"
  for lr in $lrs; do
    labels+=("${method}_lr$lr")
    sets+=(--set "methods.${method}_lr$lr.name=$method" --set "methods.${method}_lr$lr.train.lr=$lr")
  done
done
layerwise bench "${bench[@]}" --methods "$(IFS=,; echo "${labels[*]}")" "${sets[@]}" --output "$work/screen"
layerwise measure quality-report "$work/screen" --metrics "$metrics" --output "$here/$1-screen"
