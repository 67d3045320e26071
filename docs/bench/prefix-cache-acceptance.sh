#!/usr/bin/env bash
# Frozen-prefix cache acceptance (issue 9, deliverable 1): full vs salf vs salf + prefix cache (bf16, fp32),
# MiniLM + Rotten Tomatoes, batch 16 x 64, TRAIN training examples (default 800), 3 epochs (3 * TRAIN / 16 steps),
# back to back; EVAL held-out examples (default: all 1,275). Run from the repository root.
# Usage: bash docs/bench/prefix-cache-acceptance.sh OUTDIR   (NICE="" for normal priority; TRAIN=320 EVAL=500 for a short one)
set -euo pipefail
OUT=${1:-prefix-cache-acceptance}
NICE=${NICE-nice -n 19}
mkdir -p "$OUT"; rm -rf "$OUT"/cache-* "$OUT"/full "$OUT"/salf "$OUT"/salf-cache-bf16 "$OUT"/salf-cache-fp32
TRAIN=${TRAIN:-800}
STEPS=$(( (3 * TRAIN + 15) / 16 ))
common=(--max-steps "$STEPS" --set train.batch_size=16 --set data.max_length=64 --set data.max_train_samples="$TRAIN"
        ${EVAL:+--set data.max_eval_samples=$EVAL}
        --set train.eval_before=false --set train.save_model=false --set train.progress=false --set train.log_every=1)
run() {  # name, args...
  local name=$1; shift
  echo "== $name  $(date +%T)  load: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/log.txt"
  $NICE env OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
    python -m layerwise train "${common[@]}" --output "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
  echo "   done $(date +%T)  load: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/log.txt"
}
run salf --method salf --set method.budget=0.5
run salf-cache-bf16 --method salf --set method.budget=0.5 --set train.prefix_cache=on --set train.prefix_cache_dir="$OUT/cache-bf16"
run salf-cache-fp32 --method salf --set method.budget=0.5 --set train.prefix_cache=on --set train.prefix_cache_dir="$OUT/cache-fp32" \
    --set train.prefix_cache_dtype=fp32
run full --method full
python - "$OUT" <<'PY' | tee "$OUT/result.md"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
S = {n: json.loads((out / n / "summary.json").read_text()) for n in ("full", "salf", "salf-cache-bf16", "salf-cache-fp32")}
L = {n: [json.loads(l)["loss"] for l in (out / n / "metrics.jsonl").read_text().splitlines()] for n in S}
tps = lambda n: S[n]["tokens_per_s"]
print("| run | steps | train s (incl. cache build) | cache build s | tokens/s | vs full | vs salf | held-out acc |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for n, s in S.items():
    pc = s.get("prefix_cache") or {}
    print(f"| {n} | {s['steps']} | {s['train_seconds']:.1f} | {pc.get('build_seconds', 0):.1f} | {tps(n):.0f} | "
          f"{tps(n) / tps('full'):.2f}x | {tps(n) / tps('salf'):.2f}x | {s['eval']['accuracy']:.4f} |")
for n in ("salf-cache-bf16", "salf-cache-fp32"):
    d = max(abs(a - b) for a, b in zip(L["salf"], L[n]))
    print(f"\nmax |loss(salf) - loss({n})| over {len(L[n])} steps: {d:.2e}")
print(f"\nsalf cut: {S['salf']['salf']['cut']} (frozen blocks {S['salf']['salf']['frozen_blocks']}); cache: "
      + json.dumps({k: S['salf-cache-bf16']['prefix_cache'][k] for k in ('depth', 'dtype', 'bytes', 'examples', 'tokens')}))
PY
