"""FSDP2 (train.fsdp=true): torchrun, 2 CPU processes (gloo), lift switching every 2 steps."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import torchrun_train
from safetensors.torch import load_file

from layerwise.cli import main
from layerwise.engine.checkpoint import find_latest

STEPS = 6
LIFT = ["--method", "lift", "--set", "method.switch_every=2", "--set", "method.k=1"]


def args(model_dir, data, out, *extra):
    return [
        "train", "--model", model_dir, "--data", data, "--max-steps", str(STEPS), "--output", str(out),
        "--set", "train.batch_size=4", "--set", "train.progress=false", "--set", "train.log_every=2",
        "--set", "data.max_length=24", "--set", "train.warmup_steps=0", "--set", "train.eval_before=false",
        "--set", "train.eval_after=false", *extra,
    ]


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
def test_fsdp_lift_two_processes_match_single_process(tiny_bert_dir, cls_jsonl, tmp_path):
    single = tmp_path / "single"
    assert main(args(tiny_bert_dir, cls_jsonl, single, *LIFT)) == 0
    sharded = tmp_path / "fsdp"
    torchrun_train(args(tiny_bert_dir, cls_jsonl, sharded, *LIFT, "--set", "train.fsdp=true"))
    summary = json.loads((sharded / "summary.json").read_text())
    d = summary["distributed"]
    assert d["world_size"] == 2 and d["weights_identical"] and d["mechanism"].startswith("FSDP2"), d
    assert summary["switches"] == json.loads((single / "summary.json").read_text())["switches"] == 2
    # The checkpoint holds whole tensors (gathered from the shards), comparable with one process.
    a = load_file(find_latest(sharded) / "model.safetensors")
    b = load_file(find_latest(single) / "model.safetensors")
    assert a.keys() == b.keys()
    floats = [k for k in a if a[k].is_floating_point()]
    x = torch.cat([a[k].reshape(-1).double() for k in floats])
    y = torch.cat([b[k].reshape(-1).double() for k in floats])
    assert float((x - y).norm() / y.norm()) <= 1e-5
    # Per element too, as in test_distributed (key biases exempt: their exact gradient is 0, see there).
    bad = [k for k in floats if not k.endswith("attention.self.key.bias") and not torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6)]
    assert not bad, bad[:3]
    # The saved model (gathered on every rank, written by rank 0) matches too.
    m, n = load_file(sharded / "model" / "model.safetensors"), load_file(single / "model" / "model.safetensors")
    assert m.keys() == n.keys() and all(torch.allclose(m[k], n[k], rtol=1e-5, atol=1e-6) for k in m)
    rows = [[json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] for run in (sharded, single)]
    assert [r["active_blocks"] for r in rows[0]] == [r["active_blocks"] for r in rows[1]]
    for r, s in zip(*rows):
        assert r["loss"] == pytest.approx(s["loss"], rel=1e-5)


def test_fsdp_refusals(tiny_bert_dir, cls_jsonl, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(tiny_bert_dir, cls_jsonl, out, *LIFT, "--set", "train.fsdp=true")) == 2
    assert "launch with torchrun" in capsys.readouterr().err
    assert main(args(tiny_bert_dir, cls_jsonl, out, "--method", "lisa", "--set", "train.fsdp=true")) == 2
    assert "supports the methods full, freeze, lift, not 'lisa'" in capsys.readouterr().err
    assert main(args(tiny_bert_dir, cls_jsonl, out, "--method", "lora", "--set", "train.fsdp=true")) == 2
    assert "train.fsdp=true with lora" in capsys.readouterr().err
    assert not out.exists()
