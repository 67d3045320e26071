"""layerwise methods inside transformers.Trainer (issue 7, deliverable 3)."""

from __future__ import annotations

import pytest
import torch
from conftest import batch_for, tiny_bert
from transformers import Trainer, TrainingArguments

from layerwise.errors import ConfigError
from layerwise.integrations.hf import LayerwiseCallback

STEPS = 6


class Rows(torch.utils.data.Dataset):
    """A few fixed-length rows (no tokenizer, no collator beyond the default)."""

    def __init__(self, model, n: int = 24):
        b = batch_for(model, batch=n, length=12, seed=1)
        self.rows = [{k: v[i] for k, v in b.items()} for i in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def training_args(tmp_path, **kw) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, seed=0, **kw,
    )


def test_trainer_with_lift_changes_only_the_scheduled_blocks(tmp_path):
    model = tiny_bert()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = training_args(tmp_path)
    cb = LayerwiseCallback(model, "lift", args=args, k=1, switch_every=2, schedule="bottom_up")
    trainer = Trainer(model=cb.model, args=args, train_dataset=Rows(model), optimizers=(cb.optimizer, None), callbacks=[cb])
    trainer.train()
    assert trainer.state.global_step == STEPS
    # The plan of every step: blocks 0, 0, 1, 1, 2, 2 (+ head); three phases, two switches.
    assert [(s, p.blocks, p.head, p.embeddings) for s, p in cb.history] == [(s, (s // 2,), True, False) for s in range(STEPS)]
    assert cb.switches == 2
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g: [names[id(p)] for p in ps] for g, ps in cb.method.anatomy.groups().items()}
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    for g in ("block.0", "block.1", "block.2", "head"):
        # Every matrix of a scheduled group moved (biases may legitimately stay: attention key biases get no gradient).
        mats = [n for n in groups[g] if before[n].ndim >= 2]
        assert mats and set(mats) <= changed, (g, sorted(set(mats) - changed))
    for g in ("embeddings", "block.3"):
        assert not set(groups[g]) & changed, (g, sorted(set(groups[g]) & changed))
    assert changed <= {n for g in ("block.0", "block.1", "block.2", "head") for n in groups[g]}
    # The optimizer owns exactly the last phase's parameters, and the scheduler ran over it.
    owned = {names[id(p)] for g in cb.optimizer.param_groups for p in g["params"]}
    assert owned == set(groups["block.2"]) | set(groups["head"])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == owned
    assert cb.optimizer.param_groups[0]["lr"] < 1e-2  # linear decay from args.learning_rate
    # TrainingArguments.optim: transformers' default (adamw_torch_fused) gets torch's fused kernel, adamw_torch does not.
    assert "fused" in str(args.optim).lower() and cb.active.fused and cb.optimizer.param_groups[0]["fused"]
    plain = LayerwiseCallback(tiny_bert(), "lift", args=training_args(tmp_path, optim="adamw_torch"), k=1)
    assert not plain.active.fused and not plain.optimizer.param_groups[0]["fused"]


def test_trainer_refuses_its_own_optimizer_and_engine_only_methods(tmp_path):
    model = tiny_bert()
    args = training_args(tmp_path)
    with pytest.raises(ConfigError, match="needs the layerwise engine"):
        LayerwiseCallback(model, "ist", args=args)
    with pytest.raises(ConfigError, match="method.k"):
        LayerwiseCallback(model, "lift", args=args, k=0)
    cb = LayerwiseCallback(model, "lift", args=args, switch_every=2)
    trainer = Trainer(model=cb.model, args=args, train_dataset=Rows(model), callbacks=[cb])
    with pytest.raises(ConfigError, match="optimizers=\\(callback.optimizer, None\\)"):
        trainer.train()


def changed_groups(cb, before: dict) -> set[str]:
    names = {id(p): n for n, p in cb.model.named_parameters()}
    return {g for g, ps in cb.method.anatomy.groups().items() for p in ps if not torch.equal(p.detach(), before[names[id(p)]])}


def test_trainer_with_lora_trains_only_the_adapters(tmp_path):
    from conftest import tiny_llama

    model = tiny_llama()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = training_args(tmp_path)
    cb = LayerwiseCallback(model, "lora", args=args, r=4, dropout=0.0)
    assert cb.model is not model  # the PEFT model
    Trainer(model=cb.model, args=args, train_dataset=Rows(model), optimizers=(cb.optimizer, None), callbacks=[cb]).train()
    # The base weights did not move; the LoRA B matrices (zero at the start) did.
    for n, p in model.named_parameters():
        key = n.replace("base_layer.", "")
        if "lora_" not in n and key in base:
            assert torch.equal(p.detach(), base[key]), n
    assert any(("lora_B" in n) and p.abs().sum() > 0 for n, p in cb.model.named_parameters())
    assert cb.switches == 0


def test_trl_sft_trainer_with_lift(tmp_path, tokenizer):
    trl = pytest.importorskip("trl")
    import copy

    import datasets
    from conftest import tiny_llama

    tok = copy.deepcopy(tokenizer)
    tok.eos_token = tok.sep_token  # the fixture's (BERT) tokenizer has no EOS, which SFTTrainer appends
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ds = datasets.Dataset.from_dict({"text": [f"review {i}: a good film with a fine plot" for i in range(24)]})
    args = trl.SFTConfig(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[], save_strategy="no",
        logging_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, max_length=16, dataloader_num_workers=0,
    )
    cb = LayerwiseCallback(model, "lift", args=args, k=2, switch_every=2, schedule="top_down")
    trl.SFTTrainer(model=cb.model, args=args, train_dataset=ds, processing_class=tok, optimizers=(cb.optimizer, None), callbacks=[cb]).train()
    assert [p.blocks for _, p in cb.history] == [(2, 3), (2, 3), (0, 1), (0, 1)]
    assert changed_groups(cb, before) == {"block.0", "block.1", "block.2", "block.3", "head"}


def test_trainer_checkpointing_keeps_backward_stopping_at_the_plan(tmp_path):
    """With the Trainer's (non-reentrant) activation checkpointing, block 0 below LIFT's active blocks builds no graph."""
    model = tiny_bert()
    args = training_args(tmp_path, gradient_checkpointing=True)
    cb = LayerwiseCallback(model, "lift", args=args, k=1, switch_every=2, schedule="top_down")
    seen = []
    block0 = cb.method.anatomy.blocks[0]
    block0.register_forward_hook(lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out).requires_grad))
    trainer = Trainer(model=cb.model, args=args, train_dataset=Rows(model), optimizers=(cb.optimizer, None), callbacks=[cb])
    trainer.train()
    assert [p.blocks for _, p in cb.history] == [(3,), (3,), (2,), (2,), (1,), (1,)]
    assert len(seen) == STEPS and not any(seen), seen
