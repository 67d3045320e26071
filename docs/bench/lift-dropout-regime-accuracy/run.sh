#!/usr/bin/env bash
# LIFT on MiniLM + Rotten Tomatoes: held-out accuracy with frozen blocks in eval mode (the default) and with
# dropout on in every block (train.frozen_dropout=true), 3 seeds each, 150 steps of batch 16 x 64, 1,275 held out.
# Usage: bash docs/bench/lift-dropout-regime-accuracy/run.sh OUT_DIR   (writes OUT_DIR/results.json)
set -euo pipefail
out=${1:?usage: run.sh OUT_DIR}
mkdir -p "$out"
for seed in 0 1 2; do
  for regime in eval dropout; do
    extra=(); [ "$regime" = dropout ] && extra=(--set train.frozen_dropout=true)
    layerwise train --method lift --max-steps 150 --set train.batch_size=16 --set data.max_length=64 \
      --set data.padding=max_length --set data.max_eval_samples=1275 --set train.eval_before=false \
      --set train.save_model=false --set train.progress=false --set train.seed=$seed "${extra[@]}" \
      --output "$out/lift-$regime-seed$seed" > "$out/lift-$regime-seed$seed.log" 2>&1
  done
done
python - "$out" <<'PY'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = {}
for regime in ("eval", "dropout"):
    acc = [json.loads((out / f"lift-{regime}-seed{s}" / "summary.json").read_text())["eval"]["accuracy"] for s in range(3)]
    rows[regime] = {"accuracy": acc, "mean": statistics.fmean(acc), "stdev": statistics.stdev(acc)}
(out / "results.json").write_text(json.dumps(rows, indent=2))
print(json.dumps(rows, indent=2))
PY
