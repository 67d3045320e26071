"""SALF: the probe (latents, per-latent deviation, fit, cut, budget), the `salf` method and `layerwise probe`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import batch_for, repeat, tiny_bert, tiny_llama

from layerwise.anatomy import find_anatomy
from layerwise.engine import SavedTensorMeter, Trainer
from layerwise.engine.settings import TrainConfig
from layerwise.errors import ConfigError
from layerwise.methods import create_method, method_config
from layerwise.methods.base import RunContext
from layerwise.methods.salf.probe import (
    budget_blocks,
    collect_latents,
    cost_fractions,
    fit_power_law,
    recommend,
    run_probe,
    write_outputs,
)


def cls_batches(n_batches: int = 3, size: int = 16, length: int = 12):
    """Separable toy data: half the tokens of an example are its class token."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n_batches):
        y = torch.randint(0, 2, (size,), generator=g)
        ids = torch.randint(1000, 1500, (size, length), generator=g)
        ids[:, : length // 2] = 2000 + y[:, None]  # a class-specific token
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": y})
    return out


def lm_batches(n_batches: int = 2):
    model = tiny_llama()
    out = []
    for i in range(n_batches):
        b = batch_for(model, batch=4, length=12, seed=i)
        b["labels"][:, :6] = -100  # a prompt without loss, like the prompt/response data
        out.append(b)
    return out


@pytest.mark.parametrize("make", [tiny_llama, tiny_bert], ids=["llama", "bert"])
def test_probe_latents_equal_ordinary_forward(make):
    model = make(layers=3).eval()
    anatomy = find_anatomy(model)
    batch = batch_for(model)
    latents = collect_latents(model, anatomy, batch)
    assert len(latents) == anatomy.num_blocks + 1
    with torch.no_grad():
        hs = model(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True).hidden_states
    for s in range(anatomy.num_blocks):
        assert torch.equal(latents[s], hs[s]), s
    last = latents[-1]
    if anatomy.final_norm:  # HF reports the last hidden state after the final norm
        with torch.no_grad():
            last = anatomy.final_norm[0](last)
    assert torch.equal(last, hs[-1])


def test_decoder_deviation_per_latent_and_last_equals_model_loss():
    model = tiny_llama(layers=3)
    anatomy = find_anatomy(model)
    batches = lm_batches()
    probe = run_probe(model, anatomy, batches, "causal_lm")
    assert len(probe["deviation"]) == 4 and len(probe["gain"]) == 3 and len(probe["fit"]["values"]) == 4
    assert probe["label_tokens"] == sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    # The last latent decoded by the model's own norm + head is the model's loss (token-weighted).
    with torch.no_grad():
        total = sum(float(model(**b).loss) * int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    assert probe["deviation"][-1] == pytest.approx(total / probe["label_tokens"], rel=1e-5)
    # Each latent gets its own value; an earlier latent decoded differently.
    assert len(set(round(d, 6) for d in probe["deviation"])) == 4
    assert model.training  # the probe restores the mode


def test_encoder_probe_deviation_per_latent_and_separable_data_is_easy():
    model = tiny_bert(layers=3)
    probe = run_probe(model, find_anatomy(model), cls_batches(), "classification")
    assert len(probe["deviation"]) == 4 and probe["samples"] == 48
    assert all(d >= 0 for d in probe["deviation"])
    # Labels are linearly readable from the mean-pooled embeddings: well below chance (ln 2).
    assert probe["deviation"][0] < 0.5
    assert probe["recommendation"]["train_blocks"] == list(range(probe["recommendation"]["k_star"], 3))


def test_fit_gain_and_cut_on_a_known_curve():
    L = 8
    dev = [0.1 + 2.0 * (s + 1.0) ** -1.5 for s in range(L + 1)]
    fit = fit_power_law(dev)
    assert fit["r2"] > 0.999 and fit["alpha"] == pytest.approx(1.5, rel=0.05)
    rec = recommend(fit["values"])
    gains = rec["gain"]
    assert len(gains) == L and all(a > b for a, b in zip(gains, gains[1:]))
    k = rec["k_star"]
    # k* = the first block whose fitted gain falls below the mean gain.
    assert all(g > rec["mean_gain"] for g in gains[:k]) and gains[k] <= rec["mean_gain"]
    assert rec["net_gain"][k] == max(rec["net_gain"]) and 0 < k < L
    # A flat curve gives no reason to freeze anything.
    assert recommend(fit_power_law([1.0] * (L + 1))["values"])["k_star"] == 0


#: (c, a, s0, alpha, L): shallow and deep stacks, slow and fast decay.
KNOWN_CURVES = [(0.1, 2.0, 1.0, 1.5, 8), (0.05, 1.0, 2.0, 0.8, 30), (0.3, 0.5, 0.5, 2.5, 12), (0.0, 3.0, 4.0, 1.0, 24),
                (0.2, 1.5, 1.5, 1.2, 6)]


@pytest.mark.parametrize("c, a, s0, alpha, L", KNOWN_CURVES)
def test_fit_recovers_known_parameters_from_noisy_curves(c, a, s0, alpha, L):
    s = np.arange(L + 1.0)
    clean = c + a * (s + s0) ** -alpha
    span = float(np.ptp(clean))
    exact = fit_power_law(clean.tolist())
    for key, true in (("c", c), ("a", a), ("s0", s0), ("alpha", alpha)):
        assert exact[key] == pytest.approx(true, rel=1e-4, abs=1e-6), key
    rng = np.random.default_rng(L)
    for trial in range(5):
        # Noise of 0.1% of the curve's range: each parameter close; 0.5%: the parameters trade off
        # against each other (a, s0 and alpha are nearly collinear) but the fitted curve stays close.
        fit = fit_power_law((clean + rng.normal(0, 1e-3 * span, L + 1)).tolist())
        assert fit["alpha"] == pytest.approx(alpha, rel=0.2) and fit["s0"] == pytest.approx(s0, rel=0.3)
        assert abs(fit["c"] - c) < 0.02 * span and np.abs(np.array(fit["values"]) - clean).max() < 0.005 * span
        fit = fit_power_law((clean + rng.normal(0, 5e-3 * span, L + 1)).tolist())
        assert np.abs(np.array(fit["values"]) - clean).max() < 0.02 * span


def test_cut_respects_budget():
    for L, h in ((6, 0.0), (30, 8.0), (4, 0.5)):
        fr = cost_fractions(L, h)
        assert fr[L] == pytest.approx(1.0) and all(a < b for a, b in zip(fr, fr[1:]))
        for budget in (0.05, 0.25, 0.5, 0.75, 1.0):
            m = budget_blocks(fr, budget)
            assert fr[m] <= budget + 1e-9 or m == 0
            assert m == L or fr[m + 1] > budget
    model = tiny_llama(layers=4)
    probe = run_probe(model, find_anatomy(model), lm_batches(1), "causal_lm", budget=0.5)
    # The LM head runs on every token: in this tiny model it costs more than all blocks, so
    # half the backward of full fine-tuning does not even cover the head: no block trains.
    h = probe["cost"]["head_units"]
    assert h > 4 and probe["budget"]["train_top"] == 0 and probe["budget"]["cut"] == 4
    fr = probe["cost"]["fraction_by_trained_blocks"]
    budget = (fr[2] + fr[3]) / 2  # room for two blocks but not three
    probe = run_probe(model, find_anatomy(model), lm_batches(1), "causal_lm", budget=budget)
    b = probe["budget"]
    assert b["cost_fraction"] <= budget and b["train_top"] == 2 and b["train_blocks"] == [2, 3]


# --------------------------------------------------------------------------------------------
# The method


@pytest.fixture(scope="module")
def bert_probe(tmp_path_factory):
    """A probe.json for tiny_bert(layers=4), so method tests need not probe again."""
    model = tiny_bert(layers=4)
    folder = tmp_path_factory.mktemp("bert-probe")
    probe = run_probe(model, find_anatomy(model), cls_batches(2), "classification")
    (folder / "probe.json").write_text(json.dumps(probe))
    return str(folder / "probe.json")


def make_salf_trainer(model, method: dict, batch: dict, task: str = "classification", loader=None):
    anatomy = find_anatomy(model)
    m = create_method(method_config(method), anatomy, task=task, seed=0)
    m.context = RunContext(train_loader=loader or (lambda epoch: iter(cls_batches())))
    model = m.prepare(model)
    if model is not anatomy.model:
        m.anatomy = find_anatomy(model)
    cfg = TrainConfig(lr=1e-2, warmup_steps=0, max_steps=10, device="cpu")
    return Trainer(model, m, cfg, repeat(batch))


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def block_names(model, anatomy, i):
    ids = {id(p) for p in anatomy.block_parameters(i)}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_salf_trains_only_above_cut_and_saves_nothing_below(bert_probe):
    batch = batch_for(tiny_bert(layers=4))
    model = tiny_bert(layers=4)
    trainer = make_salf_trainer(model, {"name": "salf", "budget": 0.5, "probe": bert_probe}, batch)
    method = trainer.method
    assert method.cut == 2 and method.plan(0).blocks == (2, 3) and method.plan(0).head
    before = snapshot(model)
    for _ in range(2):
        trainer.train_step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    for i in range(4):
        names = block_names(model, method.anatomy, i)
        assert (names <= changed) if i >= 2 else not (names & changed), i
    assert not any(n.startswith("bert.embeddings") for n in changed) and "classifier.weight" in changed

    # Saved-for-backward bytes: exactly those of `freeze` on the same blocks, less than full.
    def saved(method_raw):
        m = tiny_bert(layers=4)
        t = make_salf_trainer(m, method_raw, batch)
        t.train_step()
        return t.meter.last_bytes

    assert trainer.meter.last_bytes == saved({"name": "freeze", "layers": [2, 3]})
    assert trainer.meter.last_bytes < saved({"name": "full"})
    # And per block: nothing below the cut (hooks on blocks 0..1 see no saved tensor).
    meter = SavedTensorMeter(model)
    seen_in_block = []
    hooks = [method.anatomy.blocks[i].register_forward_hook(lambda *a, i=i: seen_in_block.append((i, len(track)))) for i in range(4)]
    with meter.track() as track:
        model(**batch).loss.backward()
    for h in hooks:
        h.remove()
    counts = dict(seen_in_block)
    assert counts[0] == 0 and counts[1] == 0 and counts[2] > 0


def test_salf_probes_at_start_and_writes_probe_files(tmp_path):
    model = tiny_bert(layers=4)
    trainer = make_salf_trainer(model, {"name": "salf", "samples": 32}, batch_for(model))
    m = trainer.method
    assert m.probe["samples"] == 32
    assert m.cut == m.probe["recommendation"]["k_star"]
    extra = m.finish(tmp_path)
    assert extra["salf"]["cut"] == m.cut and extra["salf"]["train_blocks"] == list(range(m.cut, 4))
    assert json.loads((tmp_path / "probe.json").read_text())["num_blocks"] == 4
    assert (tmp_path / "probe.png").stat().st_size > 1000


def test_salf_with_lora_trains_only_lora_in_chosen_blocks(bert_probe):
    model = tiny_bert(layers=4)
    raw = {"name": "salf", "budget": 0.5, "probe": bert_probe, "adapter": "lora", "r": 2, "target_modules": ["query", "value"]}
    trainer = make_salf_trainer(model, raw, batch_for(model))
    anatomy = trainer.method.anatomy
    before = snapshot(trainer.model)
    for _ in range(3):
        trainer.train_step()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all(("lora_" in n) or ("classifier" in n) for n in changed), changed
    for i in range(4):
        lora_b = {n for n in block_names(trainer.model, anatomy, i) if "lora_B" in n}
        assert lora_b and ((lora_b <= changed) if i >= 2 else not (lora_b & changed)), (i, lora_b & changed)


def test_salf_reads_probe_json_and_rejects_other_depth(tmp_path):
    model = tiny_llama(layers=4)
    anatomy = find_anatomy(model)
    probe = run_probe(model, anatomy, lm_batches(1), "causal_lm")
    probe["recommendation"]["k_star"] = 3  # the method must take the cut from the file
    write_outputs(probe, tmp_path)
    m = create_method(method_config({"name": "salf", "probe": str(tmp_path / "probe.json")}), anatomy, task="causal_lm")
    assert m.plan(0).blocks == (3,)
    trainer = make_salf_trainer(model, {"name": "salf", "probe": str(tmp_path / "probe.json")}, lm_batches(1)[0], task="causal_lm")
    trainer.train_step()
    with pytest.raises(ConfigError, match="4 blocks.*2 blocks"):
        create_method(method_config({"name": "salf", "probe": str(tmp_path / "probe.json")}), find_anatomy(tiny_llama(layers=2)), task="causal_lm")
    with pytest.raises(ConfigError, match="does not exist"):
        create_method(method_config({"name": "salf", "probe": str(tmp_path / "nope.json")}), anatomy, task="causal_lm")
    with pytest.raises(ConfigError, match="method.budget"):
        method_config({"name": "salf", "budget": 1.5})


def test_cli_probe_writes_json_and_png(tiny_bert_dir, cls_jsonl, tmp_path, capsys):
    from layerwise.cli import main

    out = tmp_path / "probe"
    args = ["probe", "--model", tiny_bert_dir, "--data", cls_jsonl, "--samples", "32", "--budget", "0.5",
            "--output", str(out), "--set", "data.max_length=32"]
    assert main(args) == 0
    probe = json.loads((out / "probe.json").read_text())
    assert probe["samples"] == 32 and len(probe["deviation"]) == 5 and probe["budget"]["cut"] == 2
    assert {"fit", "gain", "recommendation", "cost"} <= set(probe)
    assert (out / "probe.png").stat().st_size > 1000
    assert "k*" in capsys.readouterr().out
    # Existing output: one line, nothing overwritten.
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0]
