"""scripts/gpu-check.sh in its CPU mode, and the report it ends with (layerwise/measure/gpu_check.py)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from layerwise.cli import main
from layerwise.measure.report import PHASES

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu-check.sh"
MIB = 2**20


def table_rows(md: str, header_start: str) -> list[list[str]]:
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def worker_result(tokens_per_s: list[float], peak: int, accounted: int, model: int = 100 * MIB) -> dict:
    """A worker's result and its timing repeats (tokens/s of each run, in order)."""
    timing = [{"tokens_per_s": t, "step_seconds": 512 / t, "phases": dict.fromkeys(PHASES, 0.0)} for t in tokens_per_s]
    return {"equal_batch": {"batch_size": 8, "seq_len": 64, **timing[0], "memory": {"total": accounted},
                            "measured_peak": {"bytes": peak, "process_bytes": model + peak,
                                             "kind": "cuda_max_memory_allocated"}},
            "repeats": timing[1:]}


def test_report_ratios_from_hand_made_results(tmp_path):
    (tmp_path / "suite").mkdir()
    # Medians over three interleaved runs: 1000 and 2500 tokens/s.
    runs = {"full": worker_result([900.0, 1000.0, 1100.0], 200 * MIB, 300 * MIB),
            "lift_bottom_up": worker_result([2500.0, 2600.0, 2400.0], 50 * MIB, 80 * MIB)}
    suite = {"models": {"minilm": {"runs": {"bf16": runs}}}}
    (tmp_path / "suite" / "suite.json").write_text(json.dumps(suite))
    machine = {"device": "cuda", "name": "H200", "capability": "9.0", "gpu_count": 2, "torch": "2.13", "cuda": "12.8"}
    (tmp_path / "machine.json").write_text(json.dumps(machine))
    ddp = {"model": "minilm", "method": "lift", "tokens_per_s": 12345.0, "memory": {"measured_peak": 64 * MIB},
           "distributed": {"world_size": 2, "weights_identical": True}}
    (tmp_path / "ddp-summary.json").write_text(json.dumps(ddp))
    assert main(["measure", "gpu-check-report", str(tmp_path)]) == 0
    md = (tmp_path / "summary.md").read_text()
    rows = {r[2]: r for r in table_rows(md, "| model |")}
    assert rows["full"][4:10] == ["1000", "1.00", "200.0", "1.00", "300.0", "300.0"]
    # lift: 2.5x full's tokens/s, a quarter of its measured peak.
    assert rows["lift_bottom_up"][4:10] == ["2500", "2.50", "50.0", "0.25", "150.0", "80.0"]
    assert rows["full"][10:] == ["3", "900-1100"] and rows["lift_bottom_up"][10:] == ["3", "2400-2600"]
    (dist,) = table_rows(md, "| run |")
    assert dist[1:] == ["minilm", "lift", "2", "True", "12345", "64.0"]


@pytest.mark.slow
def test_script_cpu_mode_end_to_end(tmp_path):
    out = tmp_path / "check"
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_MODELS": "tiny-llama", "GPU_CHECK_PRECISIONS": "fp32",
           "GPU_CHECK_METHODS": "full,lift_bottom_up", "GPU_CHECK_REPEATS": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert json.loads((out / "machine.json").read_text())["device"] == "cpu"
    md = (out / "summary.md").read_text()
    rows = table_rows(md, "| model |")
    assert [(r[0], r[1], r[2]) for r in rows] == [("tiny-llama", "fp32", "full"), ("tiny-llama", "fp32", "lift_bottom_up")]
    for r in rows:
        assert float(r[4]) > 0 and float(r[6]) > 0, r
    assert "Not run: fewer than 2 GPUs." in md
    steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
    assert [(s[0], s[2]) for s in steps] == [("machine", "0"), ("suite", "0"), ("report", "0")]
    # A second run into the same folder is refused before anything runs.
    again = subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, env=env, timeout=60)
    assert again.returncode == 2 and "is not empty" in again.stderr
