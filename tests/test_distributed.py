"""Data parallel with torchrun (2 CPU processes, gloo) while the trainable set changes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from conftest import torchrun_train
from safetensors.torch import load_file

from layerwise.cli import main
from layerwise.engine.checkpoint import find_latest

STEPS = 6
METHODS = {
    "lift": ["--method", "lift", "--set", "method.switch_every=2", "--set", "method.k=1"],
    # dropout 0: a dropout mask over 2 shards cannot equal the one over the whole batch.
    "ist": ["--method", "ist", "--set", "method.probe_every=2", "--set", "method.importance_batch_size=4",
            "--set", "method.heatmap=false", "--set", "method.dropout=0.0"],
}


def args(model_dir, data, out, *extra):
    return [
        "train", "--model", model_dir, "--data", data, "--max-steps", str(STEPS), "--output", str(out),
        "--set", "train.batch_size=4", "--set", "train.progress=false", "--set", "train.log_every=2",
        "--set", "data.max_length=24", "--set", "train.warmup_steps=0", "--set", "train.eval_before=false",
        "--set", "train.eval_after=false", "--set", "train.save_model=false", *extra,
    ]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
@pytest.mark.parametrize("method", list(METHODS))
def test_torchrun_two_processes_match_single_process(method, tiny_bert_dir, cls_jsonl, tmp_path):
    single = tmp_path / "single"
    assert main(args(tiny_bert_dir, cls_jsonl, single, *METHODS[method])) == 0
    ddp = tmp_path / "ddp"
    torchrun_train(args(tiny_bert_dir, cls_jsonl, ddp, *METHODS[method]))
    summary = json.loads((ddp / "summary.json").read_text())
    d = summary["distributed"]
    assert d["world_size"] == 2 and d["weights_identical"], d["weights_sha256"]
    assert summary["switches"] == json.loads((single / "summary.json").read_text())["switches"]
    a = load_file(find_latest(ddp) / "model.safetensors")
    b = load_file(find_latest(single) / "model.safetensors")
    assert a.keys() == b.keys()
    floats = [k for k in a if a[k].is_floating_point()]
    whole = rel_err(torch.cat([a[k].reshape(-1) for k in floats]), torch.cat([b[k].reshape(-1) for k in floats]))
    assert whole <= 1e-5, whole
    # Per element too (rtol 1e-5; atol a thousandth of one Adam step, at least 1e-6: parameters that start at 0,
    # biases and LoRA's B, have the relative error of a few updates, and Adam turns a rounding-level difference in
    # a near-zero gradient into a visible part of an lr-sized step, while a missing or wrong all-reduce moves
    # elements by whole steps), except attention KEY biases: softmax is invariant to them, so their exact gradient
    # is 0 and what backward returns is rounding noise (~1e-10), which Adam divides by its own size: two summation
    # orders give different noise and different lr-sized steps. Nothing else is exempt.
    lr = yaml.safe_load((single / "config.yaml").read_text())["train"]["lr"]
    atol = max(1e-6, 1e-3 * lr)
    bad = [k for k in floats if not k.endswith("attention.self.key.bias") and not torch.allclose(a[k], b[k], rtol=1e-5, atol=atol)]
    assert not bad, [(k, float((a[k] - b[k]).abs().max())) for k in bad[:3]]
    # Frozen parameters are never communicated: only the active set's gradient bytes moved.
    all_grads = STEPS * 4 * summary["total_parameters"]
    assert 0 < d["grad_sync_bytes_per_rank"] < all_grads / 10, (d["grad_sync_bytes_per_rank"], all_grads)
    rows_single = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
    rows_ddp = [json.loads(x) for x in (ddp / "metrics.jsonl").read_text().splitlines()]
    assert [r["active_blocks"] for r in rows_ddp] == [r["active_blocks"] for r in rows_single]
    for r, s in zip(rows_ddp, rows_single):
        assert r["loss"] == pytest.approx(s["loss"], rel=1e-5)
