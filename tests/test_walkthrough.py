"""The README's offline chat walkthrough, shortened: the packaged SmolLM2 laid out in a temporary Hugging Face cache by
``layerwise cache``, trained by hub id on the packaged chats with TensorBoard, the model card naming the hub id."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def layerwise(*argv: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "layerwise", *argv], env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_chat_fine_tune_by_hub_id_from_a_prepared_cache(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = layerwise("cache", "smollm2", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "hf" / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "refs" / "main").is_file()
    again = layerwise("cache", "smollm2", env=env)  # never over a model already in the cache
    assert again.returncode == 2 and "already" in again.stderr and len(again.stderr.strip().splitlines()) == 1

    out = tmp_path / "chat"
    proc = layerwise("train", "--model", hub_id, "--data", "boolq_chat", "--method", "lift", "--max-steps", "3",
                     "--set", "train.batch_size=2", "--set", "data.max_length=192", "--set", "train.report_to=[tensorboard]",
                     "--set", "data.max_eval_samples=8", "--set", "train.progress=false", "--set", "train.log_every=1",
                     "--output", str(out), env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == hub_id and summary["steps"] == 3 and summary["data"] == "boolq_chat"
    assert summary["model_info"]["path"].startswith(str(tmp_path / "hf" / "hub"))
    events = EventAccumulator(str(out / "tensorboard" / out.name))  # the run is named after its folder
    events.Reload()
    assert {"train/loss", "eval/loss"} <= set(events.Tags()["scalars"])
    card = (out / "model" / "README.md").read_text()
    assert f"base_model: {hub_id}" in card
