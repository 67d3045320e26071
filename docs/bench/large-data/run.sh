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
for name in small large; do
  rm -rf "$work/run-$name"
  # Peak RSS from the kernel (VmHWM) and, sampled every 0.1 s, its two parts: anonymous memory (what the process
  # allocated) and file-backed pages (mapped files: libraries, the model's safetensors, the memory-mapped Arrow data).
  python - "$work/peaks-$name.json" layerwise train --data "$work/$name.jsonl" --output "$work/run-$name" "${common[@]}" <<'PY'
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
done
# Where the large run's extra memory goes: anonymous and file-backed (mapped pages of the Arrow cache) memory
# after each loading step, in a fresh process with the Arrow cache already built.
python - "$work" > "$work/breakdown.json" <<'PY'
import json, sys
from layerwise.data import DataConfig, load_splits
import datasets
steps = []
def note(what):
    status = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(("RssAnon", "RssFile"))}
    steps.append({"after": what, "anonymous_bytes": status["RssAnon"], "file_backed_bytes": status["RssFile"]})
note("import layerwise.data")
ds = datasets.load_dataset("json", data_files=f"{sys.argv[1]}/large.jsonl")["train"]
note("load_dataset (Arrow cache built: memory-mapped)")
ds.unique("label")
note("distinct labels")
load_splits(DataConfig(source=f"{sys.argv[1]}/large.jsonl", eval_size=1000), "classification")
note("layerwise's load_splits (the above, the column layout, the seeded split)")
print(json.dumps(steps))
PY
python - "$work" "$here/results.json" <<'PY'
import json, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
res = {}
for name in ("small", "large"):
    s = json.loads((work / f"run-{name}" / "summary.json").read_text())
    res[name] = {"file_bytes": (work / f"{name}.jsonl").stat().st_size, **json.loads((work / f"peaks-{name}.json").read_text()),
                 "rss_when_training_began_bytes": s["memory"]["measured_baseline"],
                 "training_loop_growth_bytes": s["memory"]["measured_peak"], "steps": s["steps"], "eval": s["eval"]}
for key in ("peak_rss_bytes", "peak_anonymous_bytes", "peak_file_backed_bytes"):
    res[key.replace("peak_", "difference_in_peak_")] = res["large"][key] - res["small"][key]
res["loading_breakdown_large"] = json.loads((work / "breakdown.json").read_text())
res["command"] = "bash docs/bench/large-data/run.sh"
out.write_text(json.dumps(res, indent=2) + "\n")
print(json.dumps(res, indent=2))
PY
