"""The cost model charges what really trains and runs, and its uncalibrated prediction meets a measured step."""

from __future__ import annotations

import copy
import dataclasses
import statistics

import pytest
import torch
from conftest import batch_for, tiny_llama
from transformers import LlamaConfig, LlamaForCausalLM

from layerwise.anatomy import find_anatomy
from layerwise.engine import Trainer
from layerwise.engine.settings import TrainConfig
from layerwise.measure.costmodel import (
    BlockCost,
    charge_for,
    full_charge,
    measure_block_cost,
    method_block_cost,
    profile_model,
)
from layerwise.methods import method_config, setup


def tied_llama(layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        pad_token_id=0, tie_word_embeddings=True))


def prepared(raw: dict, model, max_steps: int = 8):
    return setup(method_config(raw), model, task="causal_lm", max_steps=max_steps)


def test_charge_reads_what_trains():
    method, _ = prepared({"name": "full"}, tiny_llama())
    c = charge_for(method, method.plan(0))
    assert c.trainable_blocks == (0, 1, 2, 3) and c.embeddings and c.head_weight and not c.adapter_only

    # LoRA's plan names the embeddings and the head, but only adapters train: no embedding backward, no head weight gradient.
    method, _ = prepared({"name": "lora"}, tiny_llama())
    plan = method.plan(0)
    assert plan.embeddings and plan.head
    c = charge_for(method, plan)
    assert c.trainable_blocks == (0, 1, 2, 3) and c.adapter_blocks == (0, 1, 2, 3)
    assert not c.embeddings and not c.head_weight and not c.head_group and c.adapter_only
    assert c.n_trainable == sum(p.numel() for p in method.parameters(plan)) < 10_000

    # A tied LM head: the head group holds only the final norm, so LIFT with head "always" computes no head weight gradient;
    # untied, the same plan trains lm_head's weight.
    for model, head_weight in ((tied_llama(), False), (tiny_llama(), True)):
        method, _ = prepared({"name": "lift", "switch_every": 2}, model)
        c = charge_for(method, method.plan(0))
        assert c.trainable_blocks == (3,) and not c.embeddings and c.head_weight is head_weight and c.head_group

    method, _ = prepared({"name": "meft"}, tiny_llama())
    assert charge_for(method, method.plan(0)).recomputed_blocks == (0, 1, 2, 3)

    method, _ = prepared({"name": "ist", "probe_every": 5, "probes": 2, "importance_batch_size": 3}, tiny_llama())
    assert [charge_for(method, method.plan(0), step).extra_forward_examples for step in (0, 4, 5, 10)] == [0, 0, 6, 6]


def test_frozen_head_and_embeddings_cost_less_in_the_profile():
    model = tiny_llama(layers=2)
    prof = profile_model(model, find_anatomy(model), batch_for(model, 8, 32), reps=2)
    assert prof.backward_head_frozen > 0 and prof.backward_head > 0 and prof.backward_embeddings > 0
    assert prof.batch_size == 8 and prof.clip_per_param > 0 and prof.optimizer_per_param > 0
    assert len(prof.forward_blocks_nograd) == len(prof.forward_blocks) == 2
    full = full_charge(prof)
    no_head = dataclasses.replace(full, head_weight=False, embeddings=False)
    # Without the head's weight gradient and the embeddings' backward, exactly those measured times come off, and block 0
    # becomes the lowest trainable block (no input gradient: its weight-only fraction).
    saved = (prof.backward_head - prof.backward_head_frozen + prof.backward_embeddings
             + prof.backward_blocks[0] * (1 - prof.weight_only_fraction))
    assert prof.predict(full) - prof.predict(no_head) == pytest.approx(saved)


def test_frozen_forwards_are_profiled_as_the_engine_runs_them_after_a_training_step():
    """A block that does not train runs with grad mode on and no parameter requiring a gradient (no graph), in eval
    mode or in train mode; the profile times it so, each time right after a training step, and leaves the model as it
    found it (train mode, every parameter trainable)."""
    model = tiny_llama(layers=2)
    calls = []  # (training, grad mode, block's weights require a gradient) at each forward of block 0
    block = find_anatomy(model).blocks[0]
    hook = block.register_forward_pre_hook(lambda m, a: calls.append(
        (m.training, torch.is_grad_enabled(), next(m.parameters()).requires_grad)))
    prof = profile_model(model, find_anatomy(model), batch_for(model, 4, 16), reps=2)
    hook.remove()
    step, frozen_eval, frozen_train = (True, True, True), (False, True, False), (True, True, False)
    # 3 rounds (one warm-up) of: step, frozen eval forward, step, frozen train-mode forward; then the frozen-head backwards.
    assert calls[:12] == [step, frozen_eval, step, frozen_train] * 3
    assert calls[12:] == [step] * 3
    assert len(prof.forward_blocks_eval) == len(prof.forward_blocks_nograd) == 2
    assert min(prof.forward_blocks_eval + prof.forward_blocks_nograd) > 0
    assert model.training and all(p.requires_grad for p in model.parameters())


def _measured_step(model, raw: dict, batch: dict, steps: int = 7) -> tuple[float, object, object]:
    method, model = prepared(raw, model, max_steps=steps)
    tcfg = TrainConfig(max_steps=steps, batch_size=batch["input_ids"].shape[0], warmup_steps=0, progress=False, device="cpu",
                       frozen_dropout=True)
    trainer = Trainer(model, method, tcfg, iter(lambda: batch, None), device=torch.device("cpu"))
    times = [trainer.train_step().seconds for _ in range(steps)]
    return statistics.median(times[1:]), method, model


def test_importance_loop_is_priced_at_the_adapters_eval_mode_forward():
    """IST's probe forwards run in eval mode without a graph, where its adapters skip their dropout: they are priced
    with the adapter factor measured that way, not with the train-mode one."""
    model = tiny_llama()
    batch = batch_for(model, 4, 16)
    plain = copy.deepcopy(model)
    prof = profile_model(plain, find_anatomy(plain), batch, reps=1)
    method, model = prepared({"name": "ist", "probe_every": 2, "probes": 2, "importance_batch_size": 8}, model)
    measured = method_block_cost(method, model, batch)
    assert measured.eval_forward_factor is not None and measured.eval_forward_factor > 0
    charge = charge_for(method, method.plan(2), 2)
    assert charge.extra_forward_examples == 16
    block = dataclasses.replace(measured, forward_factor=3.0, eval_forward_factor=1.5)
    f_eval = prof.forward_blocks_eval
    adapters = set(charge.adapter_blocks)
    expected = 16 / prof.batch_size * (prof.forward_embeddings + prof.forward_head
                                       + sum(t * (1.5 if i in adapters else 1.0) for i, t in enumerate(f_eval)))
    assert prof.phases(charge, block)["method_hook"] == pytest.approx(expected)
    # Without an eval-mode measurement (older results) the train-mode factor stands in.
    assert prof.phases(charge, dataclasses.replace(block, eval_forward_factor=None))["method_hook"] > expected
    # The layers it does not select run in eval mode (frozen_dropout off): their adapters are priced the same way.
    assert set(charge.adapter_blocks) == set(range(4))
    frozen = tuple(i for i in range(4) if i not in charge.trainable_blocks)
    in_eval = dataclasses.replace(charge, eval_blocks=frozen)
    forward = prof.forward_embeddings + prof.forward_head + sum(
        f_eval[i] * 1.5 if i in frozen else prof.forward_blocks[i] * 3.0 for i in range(4))
    assert frozen and prof.phases(in_eval, block)["forward"] == pytest.approx(forward)


def test_uncalibrated_prediction_meets_a_measured_step():
    """LoRA on a decoder whose output layer dominates the step: the model must not charge lm_head's weight gradient
    nor the embeddings' backward, which do not happen (the earlier charge of both misses by far more than the tolerance)."""
    torch.manual_seed(0)
    # One narrow-MLP block under a 30,522 x 1,024 output layer: lm_head's weight gradient alone would be about a third
    # of LoRA's step.
    cfg = LlamaConfig(vocab_size=30522, hidden_size=1024, intermediate_size=256, num_hidden_layers=1, num_attention_heads=8,
                      num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, tie_word_embeddings=False)
    base = LlamaForCausalLM(cfg)
    batch = batch_for(base, 8, 16)
    # Profile, then measure, in turn, three times: each round's ratios, then their medians (the machine may be shared).
    right, wrong = [], []
    for _ in range(3):
        plain = copy.deepcopy(base)
        prof = profile_model(plain, find_anatomy(plain), batch, reps=2)
        step, method, model = _measured_step(copy.deepcopy(base), {"name": "lora"}, batch)
        block = measure_block_cost(model, method.anatomy, batch, method.adapter_params)
        charge = charge_for(method, method.plan(1), 1)
        right.append(prof.predict(charge, block) / step)
        wrong.append(prof.predict(dataclasses.replace(charge, head_weight=True, embeddings=True), block) / step)
    assert statistics.median(right) == pytest.approx(1.0, abs=0.25), right
    assert statistics.median(wrong) > 1.25, (wrong, right)


def test_meft_block_is_timed_as_it_runs_and_priced_once():
    """MEFT's reversible layer is timed as MEFT runs it (its backward includes the recomputed forward, so the
    prediction adds no second forward), and timing it leaves the method's stack and trainable set as they were."""
    model = tiny_llama()
    batch = batch_for(model, 4, 16)
    plain = copy.deepcopy(model)
    prof = profile_model(plain, find_anatomy(plain), batch, reps=1)
    method, model = prepared({"name": "meft"}, model)
    grads = [p.requires_grad for p in model.parameters()]
    block = method_block_cost(method, model, batch)
    assert block.reversible and block.forward_factor > 0 and block.adapter_fraction > 0 and block.adapter_lowest_fraction > 0
    assert [p.requires_grad for p in model.parameters()] == grads and "run" not in vars(method.runner.stack)
    charge = charge_for(method, method.plan(0))
    phases = prof.phases(charge, block)
    lowest = min(charge.trainable_blocks)
    expected = sum(b * (block.adapter_lowest_fraction if i == lowest else block.adapter_fraction)
                   for i, b in enumerate(prof.backward_blocks))
    assert phases["backward"] == pytest.approx(expected + prof.backward_head_frozen + prof.clip_per_param * charge.n_trainable)
    # Charged as a plain block instead, each block's forward (recomputed with a graph) is added on top of its input-only backward.
    plain = prof.phases(charge, BlockCost())
    assert plain["backward"] == pytest.approx(
        sum(b * prof.input_only_fraction for b in prof.backward_blocks) + sum(prof.forward_blocks)
        + prof.backward_head_frozen + prof.clip_per_param * charge.n_trainable)


def test_suite_prices_every_method_with_the_median_of_all_its_profiles(tmp_path):
    """One method's profiles taken on fast minutes and another's on slow ones: both are priced with the section's
    median profile, not each with its own."""
    import json

    from layerwise.measure.costmodel import Profile, predict_charges
    from layerwise.measure.suite import price_with_every_profile

    def profile(scale: float) -> Profile:
        return Profile(forward_blocks=[scale * 0.1] * 4, backward_blocks=[scale * 0.2] * 4, forward_embeddings=scale * 0.01,
                       backward_embeddings=scale * 0.02, forward_head=scale * 0.03, backward_head=scale * 0.04,
                       optimizer_per_param=scale * 1e-9, weight_only_fraction=0.9, input_only_fraction=0.6,
                       step_seconds=scale * 1.3, total_params=1000, batch_size=4)

    fast, middle, slow = profile(0.5), profile(1.0), profile(2.0)
    for name, p in (("fast", fast), ("middle", middle), ("slow", slow)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"profile": dataclasses.asdict(p)}))
    charges = [dataclasses.asdict(full_charge(middle))]
    block = dataclasses.asdict(BlockCost())
    entry = {"profiles": {"fp32": {"a": [{"path": "fast.json"}], "b": [{"path": "middle.json"}, {"path": "slow.json"}]}},
             "runs": {"fp32": {"a": {"equal_batch": {"predicted": predict_charges(fast, charges, block)}},
                               "b": {"equal_batch": {"predicted": predict_charges(slow, charges, block)}}}}}
    price_with_every_profile(entry, "fp32", tmp_path)
    expected = predict_charges(middle, charges, block)["predicted_step_seconds"]
    for label, own in (("a", fast), ("b", slow)):
        eb = entry["runs"]["fp32"][label]["equal_batch"]
        assert eb["predicted"]["predicted_step_seconds"] == pytest.approx(expected)
        assert eb["predicted_first_profile"]["predicted_step_seconds"] == pytest.approx(predict_charges(own, charges, block)["predicted_step_seconds"])
    assert entry["pooled_profiles"]["fp32"] == 3
