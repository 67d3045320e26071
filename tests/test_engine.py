"""Engine behaviour: truncated backward, optimizer ownership, frozen weights, checkpointing, accumulation."""

from __future__ import annotations

import pytest
import torch
from conftest import batch_for, repeat, tiny_bert, tiny_llama

from layerwise.anatomy import find_anatomy
from layerwise.engine import SavedTensorMeter, Trainer
from layerwise.engine.settings import TrainConfig
from layerwise.methods import create_method, method_config


def make_trainer(model, method: dict, batch: dict, task: str = "classification", **train):
    anatomy = find_anatomy(model)
    method_obj = create_method(method_config(method), anatomy, task=task, seed=0)
    model = method_obj.prepare(model)
    if model is not anatomy.model:
        method_obj.anatomy = find_anatomy(model)
    cfg = TrainConfig(**{"lr": 1e-2, "warmup_steps": 0, "max_steps": 100, "device": "cpu", "weight_decay": 0.1, **train})
    return Trainer(model, method_obj, cfg, repeat(batch))


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def per_block_saved_bytes(model, anatomy, batch):
    """Bytes autograd saves inside each block during one forward."""
    saved = [0] * anatomy.num_blocks
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    stack = []

    def pre(i):
        def hook(*_):
            seen = set()

            def pack(t):
                ptr = t.untyped_storage().data_ptr()
                if ptr not in param_ptrs and ptr not in seen:
                    seen.add(ptr)
                    saved[i] += t.untyped_storage().nbytes()
                return t

            ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
            ctx.__enter__()
            stack.append(ctx)

        return hook

    def post(*_):
        stack.pop().__exit__(None, None, None)

    handles = []
    for i, b in enumerate(anatomy.blocks):
        handles += [b.register_forward_pre_hook(pre(i)), b.register_forward_hook(post)]
    try:
        model(**batch).loss
    finally:
        for h in handles:
            h.remove()
    return saved


@pytest.mark.parametrize("make", [tiny_llama, tiny_bert], ids=["llama", "bert"])
def test_backward_stops_at_lowest_trainable_block(make):
    model = make(layers=4)
    batch = batch_for(model)
    anatomy = find_anatomy(model)
    meter = SavedTensorMeter(model)
    totals = []
    for active in range(anatomy.num_blocks):
        for p in model.parameters():
            p.requires_grad_(False)
        for p in anatomy.block_parameters(active) + anatomy.head_parameters():
            p.requires_grad_(True)
        per_block = per_block_saved_bytes(model, anatomy, batch)
        # Nothing is saved for backward below the active block; the active block saves something.
        assert all(b == 0 for b in per_block[:active]), per_block
        assert per_block[active] > 0
        with meter.track():
            loss = model(**batch).loss
        totals.append(meter.last_bytes)
        loss.backward()
        for i in range(anatomy.num_blocks):
            grads = [p.grad for p in anatomy.block_parameters(i)]
            if i == active:
                assert all(g is not None for g in grads)
            else:
                assert all(g is None for g in grads)
        for p in model.parameters():
            p.grad = None
    # Bytes saved for backward fall strictly as the active block moves up.
    assert all(a > b for a, b in zip(totals, totals[1:])), totals


def test_lift_steps_change_only_active_block_and_state_stays_small():
    model = tiny_bert(layers=4)
    batch = batch_for(model)
    trainer = make_trainer(model, {"name": "lift", "switch_every": 1, "schedule": "random"}, batch)
    anatomy = trainer.method.anatomy
    max_active_bytes = max(
        sum(p.nbytes for p in anatomy.block_parameters(i) + anatomy.head_parameters()) for i in range(anatomy.num_blocks)
    )
    for _ in range(12):
        before = snapshot(model)
        rec = trainer.train_step()
        active_ids = {id(p) for p in trainer.optimizer.active}
        after = dict(model.named_parameters())
        for name, p in after.items():
            if id(p) in active_ids:
                continue
            assert torch.equal(p.detach(), before[name]), f"frozen {name} moved"
            assert p.grad is None
        for i in rec.plan.blocks:
            changed = [not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters() if id(p) in {id(q) for q in anatomy.block_parameters(i)}]
            assert any(changed), f"active block {i} did not change"
        # AdamW keeps two moments per parameter (+ scalar step): never more than the largest active set needs.
        assert trainer.optimizer.state_bytes() <= 2 * max_active_bytes + 8 * 64
    assert trainer.switches >= 5


def test_keep_policy_restores_state_and_reset_drops_it():
    for policy in ("keep", "reset"):
        model = tiny_bert(layers=2)
        trainer = make_trainer(model, {"name": "lift", "switch_every": 2, "schedule": "bottom_up"}, batch_for(model), optimizer_state=policy)
        block0 = trainer.method.anatomy.block_parameters(0)[0]
        for _ in range(6):  # block 0, block 1, block 0 again
            trainer.train_step()
        step = float(trainer.optimizer.state[block0]["step"])
        assert step == (4.0 if policy == "keep" else 2.0), (policy, step)
        if policy == "keep":
            assert trainer.optimizer.stashed_bytes() > 0  # block 1's state waits off the active set


def test_fused_adamw_follows_the_default_implementation_across_switches():
    # train.fused_optimizer (default on CPU): torch's fused AdamW kernel over the active set. Across LIFT switches
    # with stashed state (keep) it gives the default implementation's weights up to float rounding, and frozen
    # blocks stay bitwise untouched in both.
    runs = {}
    for fused in (True, False):
        model = tiny_bert(layers=3)
        trainer = make_trainer(model, {"name": "lift", "switch_every": 2, "schedule": "bottom_up"}, batch_for(model),
                               optimizer_state="keep", fused_optimizer=fused)
        assert trainer.optimizer.fused is fused
        assert bool(trainer.optimizer.param_groups[0]["fused"]) is fused
        before = snapshot(model)
        losses = [trainer.train_step().loss for _ in range(8)]  # blocks 0, 1, 2, 0: state stashed and restored
        runs[fused] = (losses, snapshot(model), before)
    (l_f, w_f, b_f), (l_d, w_d, _) = runs[True], runs[False]
    assert l_f == pytest.approx(l_d, rel=1e-4)
    moved = 0
    for name in w_d:
        # The key bias's true gradient is zero (softmax is shift invariant): its "gradient" is rounding noise, which
        # Adam's normalisation turns into full-size steps of either sign. Everything else must agree.
        # Elsewhere the two runs agree to 1% of the largest update each tensor received (measured: <= 0.13%).
        update = (w_d[name] - b_f[name]).abs().max()
        if not name.endswith("key.bias"):
            assert (w_f[name] - w_d[name]).abs().max() <= 1e-2 * update, name
        moved += not torch.equal(w_f[name], b_f[name])
        if torch.equal(w_d[name], b_f[name]):  # never trained in the default run: bitwise equal in the fused one too
            assert torch.equal(w_f[name], b_f[name]), name
    assert moved > 0


def test_block_chosen_before_optimizer_existed_trains():
    # LISA peers build the optimizer before the first selection and never train it; here step 0's blocks train.
    model = tiny_llama(layers=4)
    trainer = make_trainer(model, {"name": "lisa", "k": 1, "switch_every": 100}, batch_for(model), task="causal_lm")
    chosen = trainer.plan.blocks
    anatomy = trainer.method.anatomy
    before = [p.detach().clone() for p in anatomy.block_parameters(chosen[0])]
    trainer.train_step()
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, anatomy.block_parameters(chosen[0])))


def test_freeze_top_k_trains_only_top_blocks_and_head():
    model = tiny_bert(layers=4)
    trainer = make_trainer(model, {"name": "freeze", "top": 2}, batch_for(model))
    anatomy = trainer.method.anatomy
    before = snapshot(model)
    for _ in range(3):
        trainer.train_step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    for i in range(4):
        names = {n for n, p in model.named_parameters() if id(p) in {id(q) for q in anatomy.block_parameters(i)}}
        assert (names <= changed) if i >= 2 else not (names & changed)
    assert not any(n.startswith("bert.embeddings") for n in changed)
    assert "classifier.weight" in changed


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_lora_changes_only_adapters_and_head(checkpointing):
    model = tiny_bert(layers=2)
    trainer = make_trainer(model, {"name": "lora", "r": 2, "target_modules": ["query", "value"]}, batch_for(model),
                           gradient_checkpointing=checkpointing)
    # Checkpointing a PEFT model: no input-grad hook left (peft's wrapper once hid it from the engine).
    assert not [h for m in trainer.model.modules() for h in m._forward_hooks.values()
                if "make_inputs_require_grads" in getattr(h, "__qualname__", "")]
    before = snapshot(trainer.model)
    for _ in range(3):
        trainer.train_step()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all(("lora_" in n) or ("classifier" in n) for n in changed), changed
    assert any("lora_B" in n for n in changed)


def test_gradient_accumulation_matches_large_batch():
    """Two micro-batches of 2 accumulate to the gradient of one batch of 4 (compared before
    AdamW, which would amplify float rounding in near-zero gradients)."""
    big = batch_for(tiny_bert(), batch=4)
    halves = [{k: v[:2] for k, v in big.items()}, {k: v[2:] for k, v in big.items()}]

    def alternating():
        while True:
            yield from ({k: v.clone() for k, v in h.items()} for h in halves)

    def grads_of_first_step(trainer):
        seen = {}
        inner = trainer.optimizer.step

        def spy():
            seen.update({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
            inner()

        trainer.optimizer.step = spy
        trainer.train_step()
        return seen

    ta = make_trainer(tiny_bert(layers=2), {"name": "full"}, big, max_grad_norm=None)
    tb = make_trainer(tiny_bert(layers=2), {"name": "full"}, big, grad_accum=2, max_grad_norm=None)
    tb.batches = alternating()
    ga, gb = grads_of_first_step(ta), grads_of_first_step(tb)
    assert ga.keys() == gb.keys() and len(ga) > 10
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-7, msg=n)
    for (n, pa), (_, pb) in zip(ta.model.named_parameters(), tb.model.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=2e-5, msg=n)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradient_checkpointing_same_loss_and_grads_and_saves_less(dropout):
    results = []
    for gc in (False, True):
        model = tiny_bert(layers=3, dropout=dropout)
        model.train()
        if gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        batch = batch_for(model)
        meter = SavedTensorMeter(model)
        torch.manual_seed(123)
        with meter.track():
            loss = model(**batch).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, meter.last_bytes))
    (l0, g0, s0), (l1, g1, s1) = results
    torch.testing.assert_close(l0, l1)
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], rtol=1e-5, atol=1e-7, msg=n)
    assert s1 < s0


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_gradient_checkpointing_covers_frozen_blocks_above_the_active_one(family):
    """LIFT at its deepest plan: frozen blocks above the active one run in eval mode, and transformers
    checkpoints a layer only in training mode; the engine checkpoints them anyway, with dropout off."""
    runs = []
    for gc in (False, True):
        model = tiny_bert(layers=4, dropout=0.1) if family == "bert" else tiny_llama(layers=4)
        batch = batch_for(model)
        task = "classification" if family == "bert" else "causal_lm"
        trainer = make_trainer(model, {"name": "lift", "schedule": "bottom_up", "switch_every": 100}, batch, task=task,
                               gradient_checkpointing=gc, max_grad_norm=None)
        torch.manual_seed(7)
        rec = trainer.train_step()  # block 0 trains; blocks 1-3 are frozen and crossed by the gradient
        assert rec.plan.blocks == (0,)
        blocks = trainer.method.anatomy.blocks
        assert all(not m.training for b in blocks[1:] for m in b.modules() if m is not b)  # no dropout in frozen blocks
        runs.append((rec.loss, snapshot(trainer.model), rec.bytes["activations"]))
    (l0, w0, a0), (l1, w1, a1) = runs
    assert l0 == pytest.approx(l1, rel=1e-6)
    for n in w0:
        torch.testing.assert_close(w0[n], w1[n], rtol=1e-5, atol=1e-7, msg=n)
    # (The tiny Llama's saved bytes are mostly its 30k-vocabulary logits, which no block checkpoint touches.)
    assert a1 < (0.6 * a0 if family == "bert" else a0 - 200_000), (a1, a0)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_gradient_checkpointing_keeps_backward_stopping_at_the_active_block(family):
    """transformers 5 makes the embeddings' output require grad when checkpointing is enabled; the engine
    removes that, so blocks below the active one still record nothing: with only the top block active,
    checkpointing saves no more than no checkpointing, and the bottom blocks get no input gradient."""
    saved = []
    for gc in (False, True):
        model = tiny_bert(layers=4) if family == "bert" else tiny_llama(layers=4)
        task = "classification" if family == "bert" else "causal_lm"
        trainer = make_trainer(model, {"name": "lift", "schedule": "top_down", "switch_every": 100}, batch_for(model), task=task,
                               gradient_checkpointing=gc, max_grad_norm=None)
        seen = []
        handles = [b.register_forward_hook(lambda m, a, k, out: seen.append((out[0] if isinstance(out, tuple) else out).requires_grad),
                                           with_kwargs=True) for b in trainer.method.anatomy.blocks[:3]]
        rec = trainer.train_step()
        for h in handles:
            h.remove()
        assert rec.plan.blocks == (3,)
        assert seen == [False, False, False], seen  # blocks 0-2 build no graph
        saved.append(rec.bytes["activations"])
    assert saved[1] <= saved[0], saved


def test_bf16_autocast_trains():
    model = tiny_llama(layers=2)
    trainer = make_trainer(model, {"name": "lift", "switch_every": 1}, batch_for(model), task="causal_lm", bf16=True)
    losses = [trainer.train_step().loss for _ in range(6)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_a_trainer_without_an_lr_uses_the_methods_default():
    from layerwise.methods.lora import LoraConfig

    model = tiny_bert()
    trainer = make_trainer(model, {"name": "lora"}, batch_for(model), lr=None)
    assert {g["initial_lr"] for g in trainer.optimizer.param_groups} == {LoraConfig.default_lr}


def test_causal_lm_eval_scores_the_first_target_token_of_each_example():
    from layerwise.engine.trainer import evaluate

    model = tiny_llama().eval()
    ids = torch.randint(5, 1000, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        predicted = model(input_ids=ids).logits.argmax(-1)
    ids[0, 4] = predicted[0, 3]  # row 0's first target is what the model predicts there (logits before it unchanged)
    ids[1, 7] = (predicted[1, 6] + 1) % 1000  # row 1's is not
    labels = ids.clone()
    labels[0, :4], labels[1, :7], labels[2, :] = -100, -100, -100  # row 2 has no target
    result = evaluate(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}], "causal_lm",
                      torch.device("cpu"))
    assert result["examples"] == 2 and result["first_token_accuracy"] == 0.5
