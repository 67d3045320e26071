"""The GPU check (``scripts/gpu-check.sh``, docs/benchmarks.md "GPU check"): the machine's facts and the report
``layerwise measure gpu-check-report OUT_DIR`` writes from what the script left in OUT_DIR:

- ``machine.json``: device, capability, torch and CUDA versions, GPU count (:func:`write_machine`);
- ``suite/suite.json``: the paper suite's equal-batch rows;
- ``ddp-summary.json`` / ``fsdp-summary.json``: the data-parallel runs' summaries (only with 2 or more GPUs);
- ``steps.tsv``: one line per step of the script (name, seconds, exit status, command).
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
from pathlib import Path

import torch

from layerwise.measure.report import timings

DISTRIBUTED = (("ddp", "data parallel (active-gradient all_reduce)"), ("fsdp", "FSDP2 (`train.fsdp=true`)"))


def machine_facts(device: str) -> dict:
    """What the numbers were measured on. On CUDA, ``nvidia-smi``'s view beside torch's."""
    facts = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
             "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        facts.update(name=props.name, capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                     memory_bytes=props.total_memory, bf16_supported=torch.cuda.is_bf16_supported())
        if shutil.which("nvidia-smi"):
            query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
            facts["nvidia_smi"] = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
    else:
        facts["name"] = platform.processor() or platform.machine()
    return facts


def write_machine(out_dir: str | Path, device: str) -> dict:
    facts = machine_facts(device)
    (Path(out_dir) / "machine.json").write_text(json.dumps(facts, indent=2))
    return facts


def equal_batch_rows(suite: dict) -> list[dict]:
    """One row per model, precision and method: tokens/s (median over the interleaved repeats, and their range) and
    measured peak (above the loaded model, from the first run) vs full's."""
    rows = []
    for model, entry in suite["models"].items():
        for precision, runs in entry["runs"].items():
            full_peak = runs["full"]["equal_batch"]["measured_peak"]["bytes"]
            full_rate = timings(runs["full"])["tokens_per_s"]
            for label, run in runs.items():
                eb = run["equal_batch"]
                peak = eb["measured_peak"]["bytes"]
                t = timings(run)
                rows.append({"model": model, "precision": precision, "method": label, "batch": eb["batch_size"],
                             "seq_len": eb["seq_len"], "tokens_per_s": t["tokens_per_s"], "runs": t["n"],
                             "tokens_range": (t["tokens_min"], t["tokens_max"]),
                             "speed_x": t["tokens_per_s"] / full_rate, "measured_peak": peak,
                             "memory_ratio": peak / full_peak if full_peak else None,
                             "accounted_peak": eb["memory"]["total"], "process_peak": eb["measured_peak"].get("process_bytes"),
                             "kind": eb["measured_peak"]["kind"]})
    return rows


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def _ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def render_summary(out_dir: str | Path) -> str:
    out = Path(out_dir)
    machine = json.loads((out / "machine.json").read_text())
    suite = json.loads((out / "suite" / "suite.json").read_text())
    lines = ["# GPU check", "",
             f"Device: {machine['device']} ({machine.get('name', '?')}, capability {machine.get('capability', 'n/a')}, "
             f"{machine['gpu_count']} GPU(s)); torch {machine['torch']}, CUDA {machine['cuda']}. "
             f"Raw: `machine.json`, `suite/suite.json`. This page: `layerwise measure gpu-check-report {out}`.", "",
             "## Equal batch (the paper suite)", "",
             "Measured peak: the worker's peak above the loaded model over its training window "
             "(`max_memory_allocated` after `reset_peak_memory_stats` on CUDA, peak RSS on CPU); "
             "ratios are against `full` at the same model and precision. The accounted peak (layerwise's meter: weights, "
             "gradients, optimizer state, bytes saved for backward) includes the model's weights: compare it with the "
             "measured peak including the model (the allocator's or the process's whole peak), not with the peak above it.", "",
             "| model | precision | method | batch x length | tokens/s | speed vs full | measured peak MiB | "
             "peak vs full | measured peak incl. model MiB | accounted peak MiB | runs | tokens/s min-max |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in equal_batch_rows(suite):
        lines.append(f"| {r['model']} | {r['precision']} | {r['method']} | {r['batch']} x {r['seq_len']} | "
                     f"{r['tokens_per_s']:.0f} | {r['speed_x']:.2f} | {_mib(r['measured_peak'])} | "
                     f"{_ratio(r['memory_ratio'])} | {'n/a' if r['process_peak'] is None else _mib(r['process_peak'])} | "
                     f"{_mib(r['accounted_peak'])} | {r['runs']} | "
                     f"{r['tokens_range'][0]:.0f}-{r['tokens_range'][1]:.0f} |")
    dist = [(name, title, json.loads((out / f"{name}-summary.json").read_text()))
            for name, title in DISTRIBUTED if (out / f"{name}-summary.json").exists()]
    lines += ["", "## Data parallel", ""]
    if dist:
        lines += ["| run | model | method | processes | weights identical | tokens/s | measured peak MiB (rank 0) |",
                  "|---|---|---|---:|---|---:|---:|"]
        for name, title, s in dist:
            d = s["distributed"]
            lines.append(f"| {title} | {s['model']} | {s['method']} | {d['world_size']} | {d['weights_identical']} | "
                         f"{s['tokens_per_s']:.0f} | {_mib(s['memory']['measured_peak'])} |")
    else:
        lines.append("Not run: fewer than 2 GPUs.")
    steps = out / "steps.tsv"
    if steps.exists():
        lines += ["", "## Commands", "", "| step | seconds | exit | command |", "|---|---:|---:|---|"]
        for line in steps.read_text().splitlines():
            name, seconds, code, command = line.split("\t", 3)
            lines.append(f"| {name} | {seconds} | {code} | `{command}` |")
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | Path) -> Path:
    path = Path(out_dir) / "summary.md"
    path.write_text(render_summary(out_dir))
    return path
