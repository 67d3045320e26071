"""layerwise methods inside transformers.Trainer (issue 7, deliverable 3; every method: issue 19)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import Rows, tiny_bert
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments, default_data_collator

from layerwise.engine import Trainer as EngineTrainer
from layerwise.engine.settings import TrainConfig
from layerwise.errors import ConfigError
from layerwise.integrations.hf import LayerwiseCallback, train_loader_from
from layerwise.methods import RunContext, method_config, setup

STEPS = 6


def training_args(tmp_path, **kw) -> TrainingArguments:
    return TrainingArguments(**{
        "output_dir": str(tmp_path), "max_steps": STEPS, "per_device_train_batch_size": 4, "learning_rate": 1e-2,
        "report_to": [], "save_strategy": "no", "logging_strategy": "no", "use_cpu": True, "disable_tqdm": True,
        "dataloader_num_workers": 0, "seed": 0, **kw,
    })


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


def test_trainer_refusals(tmp_path, monkeypatch):
    model = tiny_bert()
    args = training_args(tmp_path)
    with pytest.raises(ConfigError, match="method.k"):
        LayerwiseCallback(model, "lift", args=args, k=0)
    cb = LayerwiseCallback(model, "lift", args=args, switch_every=2)
    trainer = Trainer(model=cb.model, args=args, train_dataset=Rows(model), callbacks=[cb])
    with pytest.raises(ConfigError, match="optimizers=\\(callback.optimizer, None\\)"):
        trainer.train()
    # IST's probe batches from a held-out split: the Trainer gives callbacks none; refused before the first step.
    cb = LayerwiseCallback(tiny_bert(), "ist", args=args, importance_batch="heldout")
    trainer = Trainer(model=cb.model, args=args, train_dataset=Rows(model), optimizers=(cb.optimizer, None), callbacks=[cb])
    with pytest.raises(ConfigError, match="importance_batch=heldout needs a held-out split"):
        trainer.train()
    assert cb.history == []
    # torchrun started 2 processes, but TrainingArguments on a CPU without use_cpu=True see one: each would train alone.
    cb = LayerwiseCallback(tiny_bert(), "lift", args=args, k=1)
    with monkeypatch.context() as env:
        env.setenv("WORLD_SIZE", "2")
        with pytest.raises(ConfigError, match="launched with 2 processes, but the TrainingArguments see one"):
            cb.on_train_begin(args, TrainerState(), TrainerControl(), optimizer=cb.optimizer,
                              train_dataloader=DataLoader(Rows(model), collate_fn=default_data_collator))
    # Several processes, but the callback was not told (no args=): the Trainer's DDP wrapper would fix SALF's set.
    cb = LayerwiseCallback(tiny_bert(), "salf", samples=16)
    several = SimpleNamespace(world_size=2, per_device_train_batch_size=4)
    with pytest.raises(ConfigError, match="build the callback with the Trainer's arguments"):
        cb.on_train_begin(several, TrainerState(), TrainerControl(), optimizer=cb.optimizer,
                          train_dataloader=DataLoader(Rows(model), collate_fn=default_data_collator))


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


def snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed_names(model, before: dict) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


# One config per method, trained by the Trainer with the callback and by layerwise's engine.
SAME_AS_ENGINE = {
    "full": {},
    "freeze": {"top": 2},
    "lift": {"k": 1, "switch_every": 2, "schedule": "bottom_up"},
    "lisa": {"k": 1, "switch_every": 2},
    "lora": {"r": 4, "dropout": 0.0},
    "ist": {"r": 4, "dropout": 0.0, "probe_every": 2, "importance_batch_size": 8},
    "salf": {"samples": 16},
    "meft": {"r": 4, "dropout": 0.0, "reversible_layers": [1, 2, 3]},
}


@pytest.mark.parametrize("method", sorted(SAME_AS_ENGINE))
def test_callback_trains_the_parameters_the_engine_trains(tmp_path, method):
    """Same seed, config and batches (the Trainer's sampler in order): the same plan every step, and the same
    parameters changed and bitwise unchanged, as `layerwise train`'s engine."""
    rows = Rows(tiny_bert())
    args = training_args(tmp_path, train_sampling_strategy="sequential")
    cb = LayerwiseCallback(tiny_bert(), method, args=args, **SAME_AS_ENGINE[method])
    before = snapshot(cb.model)
    Trainer(model=cb.model, args=args, train_dataset=rows, optimizers=(cb.optimizer, None), callbacks=[cb]).train()

    # The engine gets the training data as the callback hands it to the method (SALF's probe, IST's importance batches).
    context = RunContext(train_loader=train_loader_from(DataLoader(rows, collate_fn=default_data_collator), 4, seed=0))
    engine_method, engine_model = setup(method_config({"name": method, **SAME_AS_ENGINE[method]}), tiny_bert(), task="classification",
                                        seed=0, max_steps=STEPS, context=context)
    engine_before = snapshot(engine_model)
    batches = iter([default_data_collator([rows[i] for i in range(4 * s, 4 * s + 4)]) for s in range(STEPS)])
    engine = EngineTrainer(engine_model, engine_method, TrainConfig(lr=1e-2, warmup_steps=0, max_steps=STEPS, weight_decay=0.0, device="cpu"),
                           batches)
    plans = [engine.train_step().plan for _ in range(STEPS)]

    assert [plan for _, plan in cb.history] == plans
    changed = changed_names(cb.model, before)
    assert changed == changed_names(engine_model, engine_before)
    assert changed and set(before) == set(engine_before)  # so the parameters left bitwise equal match too


def test_trainer_with_salf_lora_probes_the_trainer_data_before_the_first_step(tmp_path):
    model = tiny_bert()
    args = training_args(tmp_path)
    cb = LayerwiseCallback(model, "salf", args=args, samples=16, adapter="lora", r=2, dropout=0.0, target_modules=["query", "value"])
    assert cb.method.probe is None and cb.plan.blocks == ()  # the cut waits for the data
    before = snapshot(cb.model)
    Trainer(model=cb.model, args=args, train_dataset=Rows(model), optimizers=(cb.optimizer, None), callbacks=[cb]).train()
    cut = cb.method.cut
    assert cb.method.probe["samples"] == 16 and cut == cb.method.probe["recommendation"]["k_star"]
    assert all(plan.blocks == tuple(range(cut, 4)) for _, plan in cb.history) and cb.switches == 0
    changed = changed_names(cb.model, before)
    assert changed and all("lora_" in n or "classifier" in n for n in changed), changed
    lora_b = {n for n in before if "lora_B" in n}
    assert {n for n in lora_b if f"layer.{cut}." in n} <= changed  # the lowest trained block's adapters moved
    assert not {n for n in lora_b for b in range(cut) if f"layer.{b}." in n} & changed  # none below the cut


def sft_trainer(tmp_path, tokenizer, method: str, **options):
    """TRL's SFTTrainer (gradient checkpointing on, its default) for 4 steps of a tiny Llama with ``method``: the callback,
    the trainer and the weights before."""
    trl = pytest.importorskip("trl")
    import copy

    import datasets
    from conftest import tiny_llama

    tok = copy.deepcopy(tokenizer)
    tok.eos_token = tok.sep_token  # the fixture's (BERT) tokenizer has no EOS, which SFTTrainer appends
    ds = datasets.Dataset.from_dict({"text": [f"review {i}: a good film with a fine plot" for i in range(24)]})
    args = trl.SFTConfig(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[], save_strategy="no",
        logging_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, max_length=16, dataloader_num_workers=0,
    )
    cb = LayerwiseCallback(tiny_llama(), method, args=args, **options)
    trainer = trl.SFTTrainer(model=cb.model, args=args, train_dataset=ds, processing_class=tok, optimizers=(cb.optimizer, None),
                             callbacks=[cb])
    return cb, trainer, snapshot(cb.model)


def test_trl_sft_trainer_with_lift(tmp_path, tokenizer):
    cb, trainer, before = sft_trainer(tmp_path, tokenizer, "lift", k=2, switch_every=2, schedule="top_down")
    trainer.train()
    assert [p.blocks for _, p in cb.history] == [(2, 3), (2, 3), (0, 1), (0, 1)]
    assert changed_groups(cb, before) == {"block.0", "block.1", "block.2", "block.3", "head"}


def test_trl_sft_trainer_with_ist(tmp_path, tokenizer):
    cb, trainer, before = sft_trainer(tmp_path, tokenizer, "ist", r=2, dropout=0.0, probe_every=2, importance_batch_size=8)
    embedded = []
    cb.model.get_input_embeddings().register_forward_hook(lambda m, a, out: embedded.append(out.requires_grad))
    trainer.train()
    assert trainer.args.gradient_checkpointing and embedded and not any(embedded)  # backward stops at the selected layers
    selected = [plan.blocks for _, plan in cb.history]
    assert selected == [tuple(s) for s in cb.method.history["selected"]] and len(selected) == 4
    assert cb.method.probe_rounds == 1 and cb.method.probe_forwards == 3  # the importance loop at step 2, on SFT batches
    # Only the LoRA weights of the layers selected in some step moved (a causal-LM head is not an adapter).
    assert changed_groups(cb, before) == {f"block.{b}" for blocks in selected for b in blocks}
    assert all("lora_" in n for n in changed_names(cb.model, before))


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


RESUMED = {
    "lift": {"k": 1, "switch_every": 2, "schedule": "bottom_up"},
    "ist": {"r": 4, "dropout": 0.0, "probe_every": 2, "importance_batch_size": 8},
}


@pytest.mark.parametrize("method", sorted(RESUMED))
def test_resume_from_checkpoint_continues_like_the_uninterrupted_run(tmp_path, method):
    """Stopped after step 3 (mid-phase: the active set has one step of AdamW state) and resumed by the Trainer from
    checkpoint-3: the same plans for steps 3-5 and bitwise the same weights, optimizer state and IST scores."""

    def run(folder, resume=None):
        model = tiny_bert()
        args = training_args(folder, save_strategy="steps", save_steps=3)
        cb = LayerwiseCallback(model, method, args=args, **RESUMED[method])
        Trainer(model=cb.model, args=args, train_dataset=Rows(model), optimizers=(cb.optimizer, None),
                callbacks=[cb]).train(resume_from_checkpoint=resume)
        return cb

    whole = run(tmp_path / "whole")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "whole" / "checkpoint-3"))
    assert [(s, p) for s, p in resumed.history] == whole.history[3:]
    assert resumed.switches == whole.switches
    mine, theirs = dict(resumed.model.named_parameters()), dict(whole.model.named_parameters())
    assert all(torch.equal(mine[n], theirs[n]) for n in theirs), [n for n in theirs if not torch.equal(mine[n], theirs[n])][:3]
    names = {id(p): n for n, p in whole.model.named_parameters()}
    names_r = {id(p): n for n, p in resumed.model.named_parameters()}
    state = {names[id(p)]: s for p, s in whole.optimizer.state.items()}
    state_r = {names_r[id(p)]: s for p, s in resumed.optimizer.state.items()}
    assert state.keys() == state_r.keys() and state
    assert all(torch.equal(state[n][k], state_r[n][k]) for n in state for k in state[n])
    if method == "ist":
        assert torch.equal(resumed.method.scores, whole.method.scores) and resumed.method.probe_rounds == whole.method.probe_rounds


def test_resume_from_a_checkpoint_without_the_callbacks_state_is_refused(tmp_path):
    model = tiny_bert()
    args = training_args(tmp_path / "plain", save_strategy="steps", save_steps=3, max_steps=3)
    Trainer(model=model, args=args, train_dataset=Rows(model)).train()
    cb = LayerwiseCallback(tiny_bert(), "lift", args=training_args(tmp_path / "lift"), k=1)
    trainer = Trainer(model=cb.model, args=training_args(tmp_path / "lift"), train_dataset=Rows(model), optimizers=(cb.optimizer, None), callbacks=[cb])
    with pytest.raises(ConfigError, match="optimizer.pt holds no LayerwiseCallback state"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "plain" / "checkpoint-3"))
    # A checkpoint of the callback's run without its optimizer.pt (save_only_model=True): nothing to continue the plan from.
    cb = LayerwiseCallback(tiny_bert(), "lift", args=training_args(tmp_path / "lift"), k=1)
    args = training_args(tmp_path / "model-only", save_strategy="steps", save_steps=3, max_steps=3, save_only_model=True)
    Trainer(model=cb.model, args=args, train_dataset=Rows(model), optimizers=(cb.optimizer, None), callbacks=[cb]).train()
    cb = LayerwiseCallback(tiny_bert(), "lift", args=training_args(tmp_path / "lift"), k=1)
    trainer = Trainer(model=cb.model, args=training_args(tmp_path / "lift"), train_dataset=Rows(model), optimizers=(cb.optimizer, None), callbacks=[cb])
    with pytest.raises(ConfigError, match="the checkpoint has no optimizer.pt written through LayerwiseCallback"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "model-only" / "checkpoint-3"))


class _Held:
    """A saved tensor, held by reference so that one still kept for backward can be told from one already freed."""

    __slots__ = ("t", "__weakref__")


def test_trainer_checkpointing_keeps_no_bytes_below_the_plan(tmp_path):
    """Bytes autograd keeps for backward at the end of the forward, per block, with the Trainer's gradient checkpointing
    (which keeps each checkpointed block's input): LIFT's top block keeps its input, the frozen blocks below keep
    nothing. With the input-grad hook back (the usual work-around), every frozen block keeps its input as well."""
    import weakref

    from transformers import TrainerCallback

    class InputGradHook(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            model.enable_input_require_grads()

    def kept_per_block(*extra) -> list[int]:
        model = tiny_bert()
        args = training_args(tmp_path, gradient_checkpointing=True, max_steps=1)
        cb = LayerwiseCallback(model, "lift", args=args, k=1, switch_every=1, schedule="top_down")
        alive = [weakref.WeakSet() for _ in cb.method.anatomy.blocks]
        kept = []
        for b, block in enumerate(cb.method.anatomy.blocks):
            def pack(t, b=b):
                held = _Held()
                held.t = t
                alive[b].add(held)
                return held

            hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda held: held.t)
            block.register_forward_pre_hook(lambda m, a, hooks=hooks: hooks.__enter__())
            block.register_forward_hook(lambda m, a, out, hooks=hooks: hooks.__exit__(None, None, None))
        model.register_forward_hook(lambda m, a, out: kept.append([sum(h.t.nbytes for h in s) for s in alive]))
        Trainer(model=cb.model, args=args, train_dataset=Rows(model), optimizers=(cb.optimizer, None), callbacks=[cb, *extra]).train()
        return kept[0]

    hidden = 4 * 12 * 32 * 4  # one block input: batch x length x width, float32
    assert kept_per_block() == [0, 0, 0, hidden]
    assert kept_per_block(InputGradHook()) == [hidden] * 4


@pytest.mark.parametrize("method", sorted(SAME_AS_ENGINE))
def test_sft_trainer_trains_exactly_the_planned_parameters(tmp_path, tokenizer, method):
    """Every method under TRL's SFTTrainer (tiny Llama, gradient checkpointing on, 4 steps): the parameters that moved
    are those its plans made trainable, every weight matrix among them moved (LoRA: every B), and everything else is bitwise unchanged."""
    cb, trainer, before = sft_trainer(tmp_path, tokenizer, method, **SAME_AS_ENGINE[method])
    trainer.train()
    assert len(cb.history) == 4
    names = {id(p): n for n, p in cb.model.named_parameters()}
    planned = {names[id(p)] for _, plan in cb.history for p in cb.method.parameters(plan)}
    changed = changed_names(cb.model, before)
    assert changed <= planned, sorted(changed - planned)[:3]
    # (A LoRA A matrix gets a zero gradient until its B has left zero: an adapter IST selects once may not move.)
    must_move = {n for n in planned if before[n].ndim >= 2 and "lora_A" not in n}
    assert must_move and must_move <= changed, sorted(must_move - changed)[:3]
