#!/usr/bin/env bash
# Quality with error bars (docs/quality.md): every method at its default lr, seeds 1, 2 and 3, under the model's quality
# protocol (protocol.sh).
#   equal steps: one `layerwise bench` per seed, the methods interleaved within it;
#   equal wall-clock: each method trained for the steps that fit in full's median setup + training seconds, after its
#   own median setup (salf's probe), at its own median training seconds per step from the equal-steps runs (the same
#   config otherwise), seeds interleaved the same way; a method left without a whole step is not run (said in the log).
# Usage: bash docs/bench/quality/run.sh minilm|smollm2 [WORK_DIR [time]]   (writes MODEL-equal-{steps,time}.json/.md here;
#   time: only the equal wall-clock half, from the equal-steps runs already in WORK_DIR and MODEL-equal-steps.json)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/protocol.sh" "${1:-}"
work="${2:-$(mktemp -d)}"
if [ "${3:-}" != time ]; then
  for seed in 1 2 3; do
    layerwise bench "${bench[@]}" --methods "$methods" --set train.seed=$seed --output "$work/steps-seed$seed"
  done
  layerwise measure quality-report "$work"/steps-seed{1,2,3} --metrics "$metrics" --output "$here/$1-equal-steps"
fi
python - "$here/$1-equal-steps.json" "$work" <<'PY'
import json, statistics, subprocess, sys
from pathlib import Path
summary, work = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
entries = {e["label"]: e for e in summary["entries"]}
budget = entries["full"]["seconds"]
# The setup is paid once, before the first step; only what is left of the budget buys steps.
setup = {label: statistics.median(json.loads((work / f"steps-seed{seed}" / "runs" / f"{label}-0" / "summary.json").read_text())
                                  .get("setup_seconds", 0.0) for seed in (1, 2, 3)) for label in entries}
steps = {label: max(0, round(e["steps"] * (budget - setup[label]) / e["train_seconds"])) for label, e in entries.items()}
print("equal wall-clock budget", round(budget, 1), "s:", steps, flush=True)
for label in [label for label, n in steps.items() if n < 1]:
    print(f"{label}: its median setup ({setup[label]:.1f} s) leaves no whole step in the budget; not run", flush=True)
for seed in (1, 2, 3):
    for label in [label for label, n in steps.items() if n >= 1]:
        run = work / f"time-seed{seed}" / "runs" / f"{label}-0"
        run.parent.mkdir(parents=True, exist_ok=True)
        with open(run.parent / f"{label}-0.log", "w") as log:
            subprocess.run(["layerwise", "train", str(work / f"steps-seed{seed}" / "configs" / f"{label}.yaml"), "--output", str(run),
                            "--set", f"train.max_steps={steps[label]}"], stdout=log, stderr=subprocess.STDOUT, check=True)
PY
layerwise measure quality-report "$work"/time-seed{1,2,3} --metrics "$metrics" --output "$here/$1-equal-time"
