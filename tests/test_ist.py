"""IST: sparse per-layer adapter updates, importance scores, exact suppression, truncated backward."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import batch_for, repeat, tiny_bert, tiny_llama
from peft.tuners.ia3.layer import IA3Layer
from peft.tuners.lora.layer import LoraLayer

from layerwise.anatomy import find_anatomy
from layerwise.cli import main
from layerwise.engine import Trainer
from layerwise.engine.meter import SavedTensorMeter
from layerwise.engine.settings import TrainConfig
from layerwise.errors import ConfigError
from layerwise.methods import create_method, method_config
from layerwise.methods.base import RunContext


def make_ist(model, task="classification", seed=0, **cfg):
    anatomy = find_anatomy(model)
    method = create_method(method_config({"name": "ist", **cfg}), anatomy, task=task, seed=seed)
    model = method.prepare(model)
    method.anatomy = find_anatomy(model)  # as the run does after prepare()
    return method, model


def make_trainer(model, batch, task="classification", seed=0, **cfg):
    method, model = make_ist(model, task=task, seed=seed, **cfg)
    tcfg = TrainConfig(lr=1e-2, warmup_steps=0, max_steps=100, device="cpu", weight_decay=0.1)
    trainer = Trainer(model, method, tcfg, repeat(batch))
    method.set_probe_batches(repeat(batch_for(model, batch=16, seed=1)))
    return trainer


def layer_params(method):
    return {b: ps for b, ps in zip(method.layers, method._layer_params)}


def force(method, block):
    """Scores that make ``block`` (almost surely) the one selected layer."""
    s = torch.full((method.num_layers,), 50.0, dtype=torch.float64)
    s[method.layers.index(block)] = -50.0
    method.scores = s


# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("adapter", ["lora", "dora", "ia3"])
def test_only_selected_layers_adapters_change_and_head_trains(adapter):
    model = tiny_bert(layers=4)
    trainer = make_trainer(model, batch_for(model), adapter=adapter, probe_every=2)
    method = trainer.method
    assert method.layers == [0, 1, 2, 3] and method.update_count == 1
    by_layer = layer_params(method)
    head = [p for p in method.anatomy.head_parameters() if id(p) in method.adapter_params]
    assert head, "peft's trainable classifier copy should be in the head"
    times_selected = {b: 0 for b in method.layers}
    for _ in range(4):  # includes an importance loop at step 2
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        rec = trainer.train_step()
        (chosen,) = rec.plan.blocks
        times_selected[chosen] += 1
        after = dict(trainer.model.named_parameters())
        changed = {n for n, p in after.items() if not torch.equal(p.detach(), before[n])}
        ids = {id(p): n for n, p in after.items()}
        assert any(ids[id(p)] in changed for p in by_layer[chosen]), f"selected layer {chosen} did not change"
        for b, ps in by_layer.items():
            if b == chosen:
                continue
            for p in ps:
                assert ids[id(p)] not in changed, f"unselected layer {b}: {ids[id(p)]} moved"
                assert p.grad is None and not p.requires_grad
        # Nothing outside the adapters and the head's trainable copy moves.
        allowed = {ids[id(p)] for p in by_layer[chosen] + head}
        assert changed <= allowed, changed - allowed
        assert all(ids[id(p)] in changed for p in head if p.ndim == 2)
        # One optimizer over all adapters: layers trained before keep their state, counted per selection.
        for b, ps in by_layer.items():
            st = trainer.optimizer.state.get(ps[0])
            assert (float(st["step"]) if st else 0) == times_selected[b], (b, st and st["step"], times_selected)
    assert method.probe_forwards == 3 and method.probe_rounds == 1
    assert trainer.model.training  # back in train mode after the probes


def test_unselected_layers_keep_optimizer_state_bitwise():
    model = tiny_bert(layers=4)
    trainer = make_trainer(model, batch_for(model), probe_every=0)
    method = trainer.method
    force(method, 1)
    trainer.train_step()
    p = layer_params(method)[1][0]
    saved = {k: v.clone() for k, v in trainer.optimizer.state[p].items()}
    force(method, 3)
    trainer.train_step()
    trainer.train_step()
    assert all(torch.equal(saved[k], v) for k, v in trainer.optimizer.state[p].items())
    assert trainer.optimizer.stashed_bytes() == 0


def test_adapter_lr_scale_multiplies_only_the_adapters_step():
    # First AdamW step from the same weights: the update is -lr * (wd * p + m_hat / (sqrt(v_hat) + eps)),
    # linear in lr. With adapter_lr_scale=3 the selected layer's adapters move 3x as far; the head's
    # update is bitwise the one at scale 1. Groups follow the scale through the lr schedule.
    deltas = {}
    for scale in (1.0, 3.0):
        torch.manual_seed(0)
        model = tiny_bert(layers=4)
        trainer = make_trainer(model, batch_for(model), probe_every=0, adapter_lr_scale=scale)
        method = trainer.method
        force(method, 2)
        params = dict(trainer.model.named_parameters())
        before = {n: p.detach().clone() for n, p in params.items()}
        trainer.train_step()
        deltas[scale] = {n: params[n].detach() - before[n] for n in params}
        lrs = {id(p): g["lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
        adapters = {id(p) for p in layer_params(method)[2]}
        head = [p for p in method.anatomy.head_parameters() if p.requires_grad]
        assert adapters <= set(lrs) and head
        base = trainer.optimizer.param_groups[0]["lr"]
        assert all(lrs[i] == pytest.approx(scale * base) for i in adapters)
        assert all(lrs[id(p)] == pytest.approx(base) for p in head)
        names = {id(p): n for n, p in params.items()}
        adapter_names, head_names = [names[i] for i in adapters], [names[id(p)] for p in head]
    moved = 0
    for n in adapter_names:
        d1, d3 = deltas[1.0][n], deltas[3.0][n]
        moved += bool(d1.abs().max() > 0)
        assert torch.allclose(d3, 3 * d1, rtol=1e-3, atol=1e-7), n
    assert moved > 0
    for n in head_names:
        assert torch.equal(deltas[3.0][n], deltas[1.0][n]), n
    with pytest.raises(ConfigError, match="adapter_lr_scale"):
        method_config({"name": "ist", "adapter_lr_scale": 0})


def test_score_update_matches_hand_computation():
    method, _ = make_ist(tiny_bert(layers=4))
    # rewards exp(-loss) = 0.5, 0.25, 0.75 -> mean 0.5, advantages 0, -0.25, +0.25; p = 0.5, p(1-p) = 0.25
    losses = [-math.log(0.5), -math.log(0.25), -math.log(0.75)]
    method.update_scores([[0, 1], [1, 2], [2, 3]], losses)
    # s1: 10 * -0.25 * 0.25; s2: -0.625 + 0.625 with p from BEFORE the loop (else it would not cancel)
    assert method.scores.tolist() == pytest.approx([0.0, -0.625, 0.0, 0.625], abs=1e-12)

    # The whole loop, with losses injected: sets drawn by sigmoid(score), p fixed before the loop.
    method.scores = torch.tensor([0.3, -0.2, 1.0, 0.0], dtype=torch.float64)
    method.set_probe_batches(repeat(batch_for(method.model, batch=16)))
    injected = iter([0.9, 0.4, 0.7])
    seen = []

    def fake_loss(batch, suppressed):
        assert not method.model.training and not torch.is_grad_enabled()
        seen.append(suppressed)
        return next(injected)

    method.probe_loss = fake_loss
    method.model.train()
    s0 = method.scores.clone()
    sets = [method.sample_suppressed(10, k) for k in range(3)]  # drawn from the scores before the update
    method.importance_loop(10)
    assert seen == sets and all(len(s) == 2 for s in seen)
    r = [math.exp(-x) for x in (0.9, 0.4, 0.7)]
    expected = s0.tolist()
    for s_k, r_k in zip(seen, r):
        for i in s_k:
            p = 1 / (1 + math.exp(-s0[i].item()))
            expected[i] += 10 * (r_k - sum(r) / 3) * p * (1 - p)
    assert method.scores.tolist() == pytest.approx(expected, abs=1e-12)
    assert method.model.training and method.probe_seconds > 0


def test_suppressed_layers_are_sampled_by_sigmoid_score():
    method, _ = make_ist(tiny_bert(layers=8))
    method.scores = torch.tensor([5.0, 5, 5, 5, -5, -5, -5, -5], dtype=torch.float64)
    hits = torch.zeros(8)
    for step in range(50):
        for i in method.sample_suppressed(step, 0):
            hits[i] += 1
    assert hits[:4].sum() > 5 * hits[4:].sum()  # high score = unimportant = suppressed more
    sel = torch.zeros(8)
    for step in range(50):
        for b in method.select(step):
            sel[b] += 1
    assert sel[4:].sum() > 5 * sel[:4].sum()  # low score = important = trained more


def perturb(model):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "ia3_l" in n or "lora_magnitude" in n:
                p.add_(0.5 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("adapter", ["lora", "dora", "ia3"])
def test_suppression_scales_then_restores_exactly(adapter):
    model = tiny_bert(layers=4)
    method, model = make_ist(model, adapter=adapter, r=7, alpha=3)
    perturb(model)
    model.eval()
    batch = batch_for(model)
    with torch.no_grad():
        base = model(**batch).logits
    modules = [m for m in model.modules() if isinstance(m, (LoraLayer, IA3Layer))]
    scaling = {id(m): dict(m.scaling) for m in modules if isinstance(m, LoraLayer)}
    vectors = {id(m): {k: v.detach().clone() for k, v in m.ia3_l.items()} for m in modules if isinstance(m, IA3Layer)}
    assert scaling or vectors
    suppressed = [0, 2]
    in_suppressed = {id(m) for i in suppressed for m in method._layer_modules[i]}
    with pytest.raises(RuntimeError, match="boom"):
        with method.suppress(suppressed):
            for m in modules:
                if isinstance(m, LoraLayer):
                    for k, v in m.scaling.items():
                        assert v == (scaling[id(m)][k] * 0.25 if id(m) in in_suppressed else scaling[id(m)][k])
                else:
                    for k, v in m.ia3_l.items():
                        want = 1 + 0.25 * (vectors[id(m)][k] - 1) if id(m) in in_suppressed else vectors[id(m)][k]
                        torch.testing.assert_close(v.detach(), want, rtol=0, atol=1e-6)
            with torch.no_grad():
                assert not torch.allclose(model(**batch).logits, base)
            raise RuntimeError("boom")  # restored even when the probe fails
    for m in modules:
        if isinstance(m, LoraLayer):
            assert m.scaling == scaling[id(m)]
        else:
            assert all(torch.equal(v, vectors[id(m)][k]) for k, v in m.ia3_l.items())
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base)
    if adapter == "dora":  # only the low-rank branch is scaled: the magnitude vectors stay as they are
        assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters())


def test_saved_bytes_shrink_as_lowest_selected_layer_rises():
    model = tiny_llama(layers=4)
    trainer = make_trainer(model, batch_for(model), task="causal_lm", probe_every=0, target_modules=["q_proj", "v_proj", "down_proj"])
    assert isinstance(trainer.meter, SavedTensorMeter)
    saved = []
    for block in range(4):
        force(trainer.method, block)
        rec = trainer.train_step()
        assert rec.plan.blocks == (block,)
        saved.append(rec.bytes["activations"])
    assert all(a > b for a, b in zip(saved, saved[1:])), saved
    # The same model and batch with every block's adapters trainable (plain LoRA) saves more than any IST step.
    _, model2 = make_ist(tiny_llama(layers=4), task="causal_lm", target_modules=["q_proj", "v_proj", "down_proj"])
    meter = SavedTensorMeter(model2)
    for n, p in model2.named_parameters():
        p.requires_grad_("lora_" in n)
    with meter.track():
        model2(**batch_for(model2)).loss
    assert meter.last_bytes > saved[0]


def test_selection_reproducible_from_seed_and_state_round_trip():
    a, _ = make_ist(tiny_bert(layers=8), seed=7)
    b, _ = make_ist(tiny_bert(layers=8), seed=7)
    c, _ = make_ist(tiny_bert(layers=8), seed=8)
    sel_a = [a.select(s) for s in range(40)]
    assert sel_a == [b.select(s) for s in range(40)]
    assert sel_a != [c.select(s) for s in range(40)]
    assert all(len(set(s)) == 2 for s in sel_a)
    assert set().union(*sel_a) == set(range(8))
    # Scores and the probe position are state; after loading, the next draws are identical.
    for m in (a, b):
        m.set_probe_batches(repeat(batch_for(m.model, batch=16)))
        losses = iter([0.5, 0.9, 0.2, 0.7, 0.3, 0.4])
        m.probe_loss = lambda batch, s, it=losses: next(it)
    a.importance_loop(10)
    a.importance_loop(20)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.scores.tolist() == a.scores.tolist() and b.scores.abs().sum() > 0
    assert [a.select(s) for s in range(20, 40)] == [b.select(s) for s in range(20, 40)]
    assert [a.sample_suppressed(30, k) for k in range(3)] == [b.sample_suppressed(30, k) for k in range(3)]


def test_probe_stream_is_separate_seeded_and_resumable():
    examples = [{"input_ids": torch.tensor([i]), "labels": torch.tensor(i)} for i in range(40)]
    held = [{"input_ids": torch.tensor([1000 + i]), "labels": torch.tensor(0)} for i in range(20)]

    def collate(items):
        return {k: torch.stack([x[k] for x in items]) for k in items[0]}

    def loader(ds):
        return torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate)

    def ctx():
        return RunContext(train_loader=lambda epoch: loader(examples), eval_loader=loader(held))

    m, _ = make_ist(tiny_bert(layers=4))
    m.context = ctx()
    first = [m.next_probe_batch()["input_ids"].flatten().tolist() for _ in range(2)]
    assert all(len(x) == 16 for x in first) and not set(first[0]) & set(first[1])
    state = m.state_dict()
    third = m.next_probe_batch()["input_ids"].flatten().tolist()  # epoch 1 (only 8 left in epoch 0)
    m2, _ = make_ist(tiny_bert(layers=4))
    m2.context = ctx()
    assert [m2.next_probe_batch()["input_ids"].flatten().tolist() for _ in range(2)] == first  # seeded
    m2.load_state_dict(state)
    assert m2.next_probe_batch()["input_ids"].flatten().tolist() == third
    h, _ = make_ist(tiny_bert(layers=4), importance_batch="heldout")
    h.context = ctx()
    ids = h.next_probe_batch()["input_ids"].flatten().tolist()
    assert len(ids) == 16 and all(v >= 1000 for v in ids)  # the held-out split


def test_config_errors():
    with pytest.raises(ConfigError, match="update_layers=9"):
        make_ist(tiny_bert(layers=4), update_layers=9)
    with pytest.raises(ConfigError, match="adapter"):
        method_config({"name": "ist", "adapter": "prefix"})
    with pytest.raises(ConfigError, match="feedforward_modules"):
        method_config({"name": "ist", "feedforward_modules": ["x"]})
    method, _ = make_ist(tiny_bert(layers=4), update_layers=3, suppress_layers=1)
    assert len(method.select(0)) == 3 and len(method.sample_suppressed(10, 0)) == 1
    with pytest.raises(RuntimeError, match="probe batches"):
        method.importance_loop(10)  # no run context and nothing injected


def test_cli_run_writes_heatmap_and_scores(tiny_bert_dir, cls_jsonl, tmp_path):
    out = tmp_path / "run"
    args = [
        "train", "--model", tiny_bert_dir, "--data", cls_jsonl, "--max-steps", "11", "--output", str(out),
        "--method", "ist", "--set", "method.probe_every=5", "--set", "method.importance_batch_size=8",
        "--set", "train.batch_size=4", "--set", "train.progress=false", "--set", "train.log_every=5",
        "--set", "data.max_length=32", "--set", "train.eval_batch_size=32", "--set", "train.warmup_steps=0",
        "--set", "train.eval_before=false", "--set", "train.save_model=false", "--set", "train.lr=1e-2",
    ]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 11]
    for r in rows:
        assert len(r["ist_scores"]) == 4 and r["ist_layers"] == [0, 1, 2, 3]
        assert r["ist_selected"] == r["active_blocks"] and len(r["active_blocks"]) == 1
    assert rows[0]["ist_probe_forwards"] == 0 and rows[-1]["ist_probe_forwards"] == 6
    assert rows[-1]["ist_probe_seconds"] > 0
    assert rows[0]["ist_scores"] == [0.0] * 4 and rows[-1]["ist_scores"] != [0.0] * 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ist"]["probe_forwards"] == 6 and summary["ist"]["probe_rounds"] == 2
    assert summary["ist"]["heatmap"] == "importance.png"
    assert sum(summary["ist"]["selection_counts"].values()) == 11
    per_step = [json.loads(line) for line in (out / "importance.jsonl").read_text().splitlines()]
    assert [r["step"] for r in per_step] == list(range(11))
    assert [r["selected"] for r in per_step][-1] == rows[-1]["ist_selected"]
    assert per_step[4]["scores"] == [0.0] * 4 and per_step[5]["scores"] != [0.0] * 4  # first loop at step 5
    png = (out / "importance.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
