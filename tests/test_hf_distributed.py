"""LayerwiseCallback under torchrun (2 CPU processes, gloo): lift, lisa and ist inside transformers.Trainer and lift
and ist inside TRL's SFTTrainer switch their trainable set while the Trainer runs data parallel (issue 19). Rank 1
starts from other weights (the callback copies rank 0's), and one spec accumulates two micro-batches per step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import hf_worker
import pytest
import torch
from safetensors.torch import load_file

TRAINER = ["trainer:lift", "trainer:lisa", "trainer:ist", "trainer:lift:accum2"]
SFT = ["sft:lift", "sft:ist"]  # TRL's SFTTrainer, where trl is installed
BF16 = "trainer:lift:bf16"


def trl_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    """One torchrun of every spec: 4 rows per rank per step."""
    out = tmp_path_factory.mktemp("hf-two-processes")
    specs = TRAINER + (SFT if trl_installed() else []) + [BF16]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = Path(hf_worker.__file__)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(worker), str(out), "4", *specs]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=worker.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def ranks(folder: Path) -> tuple[dict, dict]:
    return tuple(json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1))


@pytest.mark.parametrize("spec", TRAINER + SFT)
def test_two_processes_switch_like_one_process_with_the_same_global_batch(spec, two_processes, tmp_path):
    kind, method, *flags = spec.split(":")
    if kind == "sft" and not trl_installed():
        pytest.skip("trl is not installed")
    hf_worker.run(kind, method, 8, tmp_path)  # one process, the two ranks' rows in one batch (no accumulation)
    one = json.loads((tmp_path / "rank0.json").read_text())
    r0, r1 = ranks(two_processes / spec.replace(":", "-"))
    # Every rank ends with bitwise the same weights, after the same plans (and switches) as one process.
    assert r0["digest"] == r1["digest"]
    assert r0["plans"] == r1["plans"] == one["plans"] and r0["switches"] == one["switches"] > 0
    # The logged loss (the Trainer's mean over ranks) follows one process's curve.
    assert r0["losses"] == pytest.approx(one["losses"], rel=1e-5)
    a, b = load_file(two_processes / spec.replace(":", "-") / "weights.safetensors"), load_file(tmp_path / "weights.safetensors")
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k].double() - b[k].double()).reshape(-1) for k in a]).norm()
    assert diff <= 1e-5 * torch.cat([b[k].double().reshape(-1) for k in b]).norm(), diff
    # The active parameters' gradients were communicated, and nothing else (frozen ones have none).
    assert r0["active_bytes"] / 2 < r0["sync_bytes"] <= r0["active_bytes"] < hf_worker.STEPS * 4 * r0["parameters"]


def test_two_processes_in_bf16_autocast_the_forward(two_processes):
    """Kept out of accelerate's DDP wrapper, the model still runs under the Trainer's bf16 autocast."""
    r0, r1 = ranks(two_processes / BF16.replace(":", "-"))
    assert r0["digest"] == r1["digest"] and r0["linear_output_dtypes"] == ["torch.bfloat16"]
    assert r0["switches"] == 2 and all(torch.isfinite(torch.tensor(r0["losses"])))

