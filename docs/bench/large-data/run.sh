#!/usr/bin/env bash
# Peak memory of `layerwise train` on a generated 2 GB JSONL against the same rows cut to 2 MB (docs/data.md).
# Rows: the packaged BoolQ (question, passage, yes/no) repeated with a counter, ~0.7 KB each; MiniLM, classification.
# The 2 GB file goes through datasets.load_dataset (data.memory_map=auto memory-maps files over 256 MiB), the 2 MB one
# is read into memory. Linux (/proc). Usage: bash docs/bench/large-data/run.sh [WORK_DIR]   (writes results.json next to this script)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-$(mktemp -d)}"
mkdir -p "$work"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_DATASETS_CACHE="$work/datasets-cache"
python - "$work" <<'PY'
import json, sys
from pathlib import Path
from layerwise.data.sources import boolq
data, _ = boolq()
rows = [json.dumps({"text": q, "text_pair": p, "label": "yes" if y else "no"})
        for q, p, y in zip(data["question"], data["passage"], data["label"])]
work = Path(sys.argv[1])
for name, size in (("small.jsonl", 2 * 10**6), ("large.jsonl", 2 * 10**9)):
    written, i = 0, 0
    with open(work / name, "w") as f:
        while written < size:
            line = rows[i % len(rows)][:-1] + f', "copy": {i // len(rows)}}}\n'
            f.write(line)
            written += len(line.encode())
            i += 1
    print(name, written, "bytes", i, "rows")
PY
common=(--model minilm --method lift --max-steps 20 --set train.batch_size=16 --set data.max_length=128
        --set data.eval_size=1000 --set data.max_eval_samples=256 --set train.save_model=false --set train.progress=false)
# Three repeats, interleaved; each large run starts without the Arrow cache, so it also converts the file (a first run).
for repeat in 1 2 3; do for name in small large; do
  rm -rf "$work/run-$name-$repeat" "$work/datasets-cache"
  # Peak RSS from the kernel (VmHWM) and, sampled every 0.1 s, its two parts: anonymous memory (what the process
  # allocated) and file-backed pages (mapped files: libraries, the model's safetensors, the memory-mapped Arrow data).
  python - "$work/peaks-$name-$repeat.json" layerwise train --data "$work/$name.jsonl" --output "$work/run-$name-$repeat" "${common[@]}" <<'PY'
import json, subprocess, sys, time
proc = subprocess.Popen(sys.argv[2:])
peak = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
start = time.time()
while proc.poll() is None:
    try:
        for line in open(f"/proc/{proc.pid}/status"):
            key = line.split(":")[0]
            if key in peak:
                peak[key] = max(peak[key], int(line.split()[1]) * 1024)
    except OSError:
        pass
    time.sleep(0.1)
assert proc.returncode == 0, proc.returncode
json.dump({"peak_rss_bytes": peak["VmHWM"], "peak_anonymous_bytes": peak["RssAnon"], "peak_file_backed_bytes": peak["RssFile"],
           "wall_seconds": round(time.time() - start, 1)}, open(sys.argv[1], "w"))
PY
done; done
# Where the large run's memory goes: anonymous and file-backed (mapped pages of the Arrow cache) memory after each
# loading step, in a fresh process with the Arrow cache already built.
python - "$work" > "$work/breakdown.json" <<'PY'
import json, sys
from layerwise.data import DataConfig, load_splits
from layerwise.data.sources import read_source
steps = []
def note(what):
    status = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(("RssAnon", "RssFile"))}
    steps.append({"after": what, "anonymous_bytes": status["RssAnon"], "file_backed_bytes": status["RssFile"]})
note("import layerwise.data")
read_source(f"{sys.argv[1]}/large.jsonl")
note("read_source (datasets.load_dataset: the Arrow cache memory-mapped, the pages read while opening it released)")
load_splits(DataConfig(source=f"{sys.argv[1]}/large.jsonl", eval_size=1000), "classification")
note("load_splits (the above again, the column layout, distinct labels, the first rows checked, the seeded split)")
print(json.dumps(steps))
PY
python - "$work" "$here/results.json" <<'PY'
import json, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
import statistics
res = {}
for name in ("small", "large"):
    runs = []
    for repeat in (1, 2, 3):
        s = json.loads((work / f"run-{name}-{repeat}" / "summary.json").read_text())
        runs.append({**json.loads((work / f"peaks-{name}-{repeat}.json").read_text()),
                     "rss_when_training_began_bytes": s["memory"]["measured_baseline"],
                     "training_loop_growth_bytes": s["memory"]["measured_peak"], "steps": s["steps"], "eval": s["eval"]})
    res[name] = {"file_bytes": (work / f"{name}.jsonl").stat().st_size, "runs": runs,
                 **{f"median_{k}": statistics.median(r[k] for r in runs) for k in ("peak_rss_bytes", "peak_anonymous_bytes", "peak_file_backed_bytes")}}
for key in ("peak_rss_bytes", "peak_anonymous_bytes", "peak_file_backed_bytes"):
    res[key.replace("peak_", "difference_in_median_peak_")] = res["large"][f"median_{key}"] - res["small"][f"median_{key}"]
    res[key.replace("peak_", "largest_repeat_difference_in_peak_")] = max(
        l[key] - s[key] for l, s in zip(res["large"]["runs"], res["small"]["runs"]))
res["loading_breakdown_large"] = json.loads((work / "breakdown.json").read_text())
res["command"] = "bash docs/bench/large-data/run.sh"
out.write_text(json.dumps(res, indent=2) + "\n")
print(json.dumps(res, indent=2))
PY
