"""A new method is one class: defined and registered here, it runs through ``layerwise train``, ``layerwise bench``
(whose subprocesses load it through ``LAYERWISE_PLUGINS``) and the ``transformers.Trainer`` callback, and what
it declares (plan known ahead, Trainer support, FSDP) decides what the engine lets it do. Nothing outside this
file names it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import batch_for, tiny_bert
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from layerwise.anatomy import find_anatomy
from layerwise.cli import main
from layerwise.engine.prefix_cache import prefix_depth
from layerwise.errors import ConfigError
from layerwise.integrations.hf import LayerwiseCallback
from layerwise.methods import METHODS, Method, Plan, create_method, method_config, register

HERE = Path(__file__).resolve().parent


@dataclass
class TopHalfConfig:
    name: str = "top_half"
    head: bool = True


@register
class TopHalf(Method):
    """Trains the top half of the blocks (and the head): backward stops at block L // 2."""

    name = "top_half"
    Config = TopHalfConfig
    plan_known_ahead = trainer_ok = True

    def plan(self, step: int) -> Plan:
        return Plan(tuple(range(self.num_blocks // 2, self.num_blocks)), head=self.config.head)


def common(model_dir, data, out, steps=4):
    return ["--model", model_dir, "--data", data, "--max-steps", str(steps), "--output", str(out), "--set", "train.batch_size=4",
            "--set", "train.progress=false", "--set", "data.max_length=32", "--set", "train.warmup_steps=0"]


def test_train_changes_only_the_top_half(tiny_bert_dir, cls_jsonl, tmp_path):
    out = tmp_path / "run"
    assert main(["train", *common(tiny_bert_dir, cls_jsonl, out), "--method", "top_half"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "top_half" and summary["steps"] == 4
    before = load_file(str(Path(tiny_bert_dir) / "model.safetensors"))
    after = load_file(str(out / "model" / "model.safetensors"))
    for i in range(4):  # tiny_bert: 4 blocks; 2 and 3 train, 0 and 1 stay bitwise equal
        key = f"bert.encoder.layer.{i}.attention.self.query.weight"
        assert torch.equal(before[key], after[key]) == (i < 2), key
    assert torch.equal(before["bert.embeddings.word_embeddings.weight"], after["bert.embeddings.word_embeddings.weight"])


def test_bench_runs_it_in_its_own_processes(tiny_bert_dir, cls_jsonl, tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERWISE_PLUGINS", "test_new_method")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])))
    out = tmp_path / "bench"
    assert main(["bench", "--model", tiny_bert_dir, "--data", cls_jsonl, "--methods", "full,top_half", "--steps", "3",
                 "--batch-size", "4", "--seq-len", "16", "--output", str(out)]) == 0
    results = {r["label"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert results["top_half"]["method"] == "top_half" and results["top_half"]["tokens_per_s"] > 0
    # The cost model planned it too: half the blocks' backward is skipped, so it predicts a gain over full.
    assert results["top_half"]["predicted"]["predicted_speedup"] > 1.0


def test_trainer_callback_trains_it(tmp_path):
    model = tiny_bert()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
                             save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    batch = batch_for(model, batch=12, length=12, seed=1)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(12)]
    cb = LayerwiseCallback(model, "top_half", args=args)
    Trainer(model=cb.model, args=args, train_dataset=rows, optimizers=(cb.optimizer, None), callbacks=[cb]).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    groups = {g: {n for n, p in model.named_parameters() if any(p is q for q in ps)} for g, ps in cb.method.anatomy.groups().items()}
    assert changed and changed <= groups["block.2"] | groups["block.3"] | groups["head"]
    assert not changed & (groups["block.0"] | groups["block.1"] | groups["embeddings"])


@dataclass
class SilentConfig:
    name: str = "top_half_silent"
    head: bool = True


class Silent(TopHalf):
    """The same plan, declaring nothing."""

    name = "top_half_silent"
    Config = SilentConfig
    plan_known_ahead = trainer_ok = False


def test_declared_abilities_decide():
    model = tiny_bert()
    method = create_method(method_config({"name": "top_half"}), find_anatomy(model), task="classification", max_steps=10)
    assert prefix_depth(method, 10)[0] == 2  # its plan is known ahead: blocks 0..1 are a fixed frozen prefix
    register(Silent)
    try:
        silent = create_method(method_config({"name": "top_half_silent"}), find_anatomy(model), task="classification", max_steps=10)
        depth, why = prefix_depth(silent, 10)
        assert depth == 0 and "not known before training (supported: full, freeze, lift, lisa, salf, top_half)" in why
        with pytest.raises(ConfigError, match="cannot run inside transformers.Trainer"):
            LayerwiseCallback(tiny_bert(), "top_half_silent")
    finally:
        del METHODS["top_half_silent"]
