"""Peer libraries in ``layerwise bench``: BAdam beside lift, a plain PEFT loop beside lora, on the same data and batch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_bench_runs_badam_and_peft_beside_their_counterparts(tiny_bert_dir, cls_jsonl, tmp_path):
    pytest.importorskip("badam")
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "layerwise", "bench", "--methods", "full,lift,badam,lora,peft_lora", "--model", tiny_bert_dir,
           "--data", cls_jsonl, "--steps", "4", "--batch-size", "4", "--seq-len", "16", "--eval", "16", "--output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    data = json.loads((out / "results.json").read_text())
    r = {x["label"]: x for x in data["results"]}
    assert list(r) == ["full", "lift", "badam", "lora", "peft_lora"]
    full = r["full"]
    for label in ("badam", "peft_lora"):
        peer = r[label]
        assert peer["peer"]["library"] in ("badam", "peft") and peer["peer"]["version"]
        assert peer["tokens_per_s"] > 0 and peer["measured_peak"] > 0 and 0 < peer["memory"]["measured_baseline"]
        assert peer["tokens_per_s_ratio"] == pytest.approx(peer["tokens_per_s"] / full["tokens_per_s"])
        assert peer["measured_memory_saving_x"] == pytest.approx(full["measured_peak"] / peer["measured_peak"])
        assert peer["predicted"] is None and "accuracy" in peer["eval"]
        # A plain loop keeps every block in train mode: stated as dropout on.
        assert peer["frozen_dropout"] is True
    # The same trainable sets as the layerwise method each stands beside: PEFT's LoRA = layerwise's lora (adapters and
    # the classifier); BAdam's largest = one block and the head, as lift's.
    assert r["peft_lora"]["trainable_parameters_max"] == r["lora"]["trainable_parameters_max"]
    assert r["badam"]["trainable_parameters_max"] == r["lift"]["trainable_parameters_max"]
    assert r["badam"]["memory"]["optimizer"] == r["lift"]["memory"]["optimizer"]
    # Which entries differ in dropout regime is said in the report.
    assert "lift eval mode" in data["meta"]["dropout_regime"] and "badam on" in data["meta"]["dropout_regime"]
    md = (out / "results.md").read_text()
    assert "| badam |" in md and "| peft_lora |" in md


def test_unknown_peer_is_one_line(tmp_path, capsys):
    from layerwise.cli import main

    assert main(["measure", "peer", str(tmp_path / "x.yaml"), "--peer", "deepspeed", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--peer 'deepspeed': choose from badam, peft_lora" in err[0]
