"""`layerwise plan`: predicted peak training memory against measured runs on tiny models."""

from __future__ import annotations

import json

import pytest

from layerwise.config import resolve
from layerwise.errors import ConfigError
from layerwise.measure.memory import max_batch, parse_memory, plan_command
from layerwise.run import train

METHODS = ("full", "lift", "lora", "meft")
SEQ, BATCH, STEPS = 32, 8, 4


def _raw(model_dir: str, data: str, method: dict, out) -> dict:
    return {
        "model": model_dir,
        "output": str(out) if out else None,
        "method": method,
        "data": {"source": data, "max_length": SEQ, "padding": "max_length"},
        "train": {"batch_size": BATCH, "max_steps": STEPS, "progress": False, "eval_before": False, "eval_after": False,
                  "save_model": False, "memory_check": False, "disk_check": False, "log_every": 2},
    }


def test_parse_memory():
    assert parse_memory("8GiB") == 8 * 2**30
    assert parse_memory("1.5 GB") == 1_500_000_000
    assert parse_memory("512MiB") == 512 * 2**20
    assert parse_memory("1000") == 1000
    for bad in ("eight", "8XB", "0GiB"):
        with pytest.raises(ConfigError):
            parse_memory(bad)


@pytest.mark.parametrize("which", ["llama", "bert"])
def test_plan_within_15_percent_of_measured(which, tiny_llama_dir, tiny_bert_dir, lm_jsonl, cls_jsonl, tmp_path):
    model_dir, data = (tiny_llama_dir, lm_jsonl) if which == "llama" else (tiny_bert_dir, cls_jsonl)
    overrides = {"lift": {"switch_every": 1}}
    result = plan_command(_raw(model_dir, data, {"name": "full"}, None), memory="64MiB", seq_len=SEQ, methods=",".join(METHODS),
                          batch_size=BATCH, output=str(tmp_path / "plan.json"), speed=which == "llama",
                          method_overrides=overrides, log=lambda *a, **k: None)
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["methods"].keys() == set(METHODS)
    for name in METHODS:
        entry = result["methods"][name]
        assert "error" not in entry, entry
        cfg, mcfg = resolve(_raw(model_dir, data, {"name": name, **overrides.get(name, {})}, tmp_path / f"run-{name}"))
        summary = train(cfg, mcfg, log=lambda *a, **k: None)
        measured = summary["memory"]["total"]
        predicted = entry["predicted"]["total"]
        assert abs(predicted - measured) <= 0.15 * measured, (name, predicted, measured, entry["predicted"], summary["memory"])
        # The components the meter reports are predicted one by one too.
        for key in ("weights", "grads", "optimizer"):
            assert abs(entry["predicted"][key] - summary["memory"][key]) <= 0.15 * max(summary["memory"][key], 4096), (name, key)
        # The largest batch that fits is consistent with the per-example slope.
        assert entry["max_batch"] == max_batch(entry, 64 * 2**20)
        if entry["max_batch"]:
            fixed = entry["predicted"]["total"] - entry["predicted"]["activations"] + entry["activations_fixed"]
            assert fixed + entry["max_batch"] * entry["activations_per_example"] <= 64 * 2**20
    if which == "llama":
        assert result["methods"]["full"]["tokens_per_s"] > 0
        # MEFT's recomputed forwards are charged (Method.recomputed_blocks): it is predicted like every method.
        assert result["methods"]["meft"]["tokens_per_s"] > 0


def test_plan_cli(tiny_llama_dir, tmp_path, capsys):
    from layerwise.cli import main

    out = tmp_path / "p"
    rc = main(["plan", "--model", tiny_llama_dir, "--memory", "1GiB", "--seq-len", "16", "--methods", "lift,salf,freeze",
               "--batch-size", "2", "--no-speed", "--output", str(out), "--set", "lift.switch_every=1", "--set", "train.max_steps=3"])
    assert rc == 0
    plan = json.loads((out / "plan.json").read_text())
    assert set(plan["methods"]) == {"lift", "salf", "freeze"}
    assert all("predicted" in e for e in plan["methods"].values())
    assert "max batch" in capsys.readouterr().out
    assert main(["plan", "--model", tiny_llama_dir, "--memory", "lots", "--no-speed"]) == 2


def test_plan_writes_no_file_unless_asked(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    from layerwise.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["plan", "--model", tiny_llama_dir, "--memory", "1GiB", "--seq-len", "16", "--methods", "freeze", "--no-speed",
                 "--set", "train.max_steps=2"]) == 0
    assert "max batch" in capsys.readouterr().out and list(tmp_path.iterdir()) == []
