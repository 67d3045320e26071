"""MEFT (reversible adapters): gradients equal ordinary autograd, memory flat in depth, numerical
safety (check mode, bound, anchors), CLI run that changes only adapters and head."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import batch_for, minilm_path, tiny_bert, tiny_llama

from layerwise.cli import main
from layerwise.engine.meter import SavedTensorMeter
from layerwise.errors import ConfigError
from layerwise.methods import method_config
from layerwise.methods.meft.method import MeftConfig, adapter_parameters, apply_meft, load_meft
from layerwise.methods.meft.reversible import ReconstructionError


def meft_model(model, **cfg):
    m = copy.deepcopy(model)
    torch.manual_seed(1)
    cfg.setdefault("max_reconstruction_error", None)
    runner = apply_meft(m, MeftConfig(**cfg))
    m.train()
    for p in m.parameters():
        p.requires_grad_(False)
    trainable = adapter_parameters(m)
    head = m.classifier if hasattr(m, "classifier") else None
    if head is not None:
        trainable += list(head.parameters())
    for p in trainable:
        p.requires_grad_(True)
    return m, runner, trainable


def gradients(model, batch, **cfg):
    m, runner, params = meft_model(model, **cfg)
    torch.manual_seed(5)  # same dropout masks in both runs
    out = m(**batch)
    out.loss.backward()
    return torch.cat([p.grad.flatten() for p in params]), float(out.loss.detach()), runner


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("variant", [1, 2, 3])
def test_float64_gradients_equal_ordinary_autograd(arch, variant):
    model = (tiny_bert(4, dropout=0.1) if arch == "bert" else tiny_llama(4)).double()
    batch = batch_for(model, batch=3, length=12)
    ref, ref_loss, _ = gradients(model, batch, variant=variant, dropout=0.1, reversible_backward=False)
    got, loss, runner = gradients(model, batch, variant=variant, dropout=0.1)  # default anchors
    assert loss == ref_loss
    assert rel(got, ref) < 1e-10
    assert runner.stack.anchor_every == (2 if variant < 3 else 1) and runner.stack.errors  # measured at the anchors
    # Reconstruction in use: 2-block segments for every variant; without any anchor (the paper)
    # MEFT1/2 stay within 1e-10 over 4 blocks too (MEFT3 grows ~100x per block).
    for anchor in [2] + ([0] if variant < 3 else []):
        got_k, _, runner_k = gradients(model, batch, variant=variant, dropout=0.1, anchor_every=anchor, check=True)
        assert rel(got_k, ref) < 1e-10, anchor
        assert sorted(runner_k.stack.errors) == [0, 1, 2, 3]


@pytest.mark.parametrize("variant", [1, 2, 3])
def test_float64_gradients_exact_for_both_couplings_on_llama(variant):
    model = tiny_llama(4).double()
    batch = batch_for(model, batch=2, length=10)
    for coupling in ("paper", "centered"):
        ref, ref_loss, _ = gradients(model, batch, variant=variant, dropout=0.1, coupling=coupling, reversible_backward=False)
        got, loss, _ = gradients(model, batch, variant=variant, dropout=0.1, coupling=coupling, anchor_every=2)
        assert loss == ref_loss and rel(got, ref) < 1e-10, coupling


def _zero_adapters(m):
    with torch.no_grad():
        for p in adapter_parameters(m):
            p.zero_()


@pytest.mark.parametrize("variant", [1, 2, 3])
def test_centered_coupling_keeps_a_decoder_nearer_its_pretrained_function(variant):
    model = tiny_llama(6).double().eval()
    batch = batch_for(model, batch=2, length=12)
    with torch.no_grad():
        ref = model(**batch).logits
        err = {}
        for coupling in ("paper", "centered"):
            m, _, _ = meft_model(model, variant=variant, coupling=coupling)
            _zero_adapters(m)
            m.eval()
            err[coupling] = rel(m(**batch).logits, ref)
    assert err["centered"] < err["paper"], err
    # auto = centered on a decoder, paper on an encoder
    m_auto, _, _ = meft_model(model, variant=variant)
    m_cent, _, _ = meft_model(model, variant=variant, coupling="centered")
    for mm in (m_auto, m_cent):
        _zero_adapters(mm)
        mm.eval()
    with torch.no_grad():
        assert torch.equal(m_auto(**batch).logits, m_cent(**batch).logits)


def test_partial_reversibility_prefix_is_frozen_and_exact():
    model = tiny_bert(4, dropout=0.1).double()
    batch = batch_for(model)
    ref, _, _ = gradients(model, batch, variant=1, reversible_layers=[2, 3], reversible_backward=False)
    got, _, runner = gradients(model, batch, variant=1, reversible_layers=[2, 3])
    assert rel(got, ref) < 1e-10
    assert [layer.index for layer in runner.stack.layers] == [2, 3]
    m, _, _ = meft_model(model, reversible_layers=[2, 3])
    assert not any("meft" in n for n, _ in m.bert.encoder.layer[0].named_parameters())


@pytest.mark.slow
@pytest.mark.parametrize("variant", [1, 2, 3])
def test_float32_minilm_gradients_within_1e4(variant):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    batch = batch_for(model, batch=2, length=32)
    ref, _, _ = gradients(model, batch, variant=variant, reversible_backward=False)
    got, _, runner = gradients(model, batch, variant=variant)
    assert runner.stack.anchor_every == (2 if variant < 3 else 1)
    assert rel(got, ref) <= 1e-4


def saved_bytes(model, batch, **cfg):
    m, _, _ = meft_model(model, **cfg)
    meter = SavedTensorMeter(m)
    with meter.track():
        out = m(**batch)
    out.loss.backward()
    return meter.last_bytes


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_saved_bytes_flat_when_reversible_depth_doubles(arch):
    make = tiny_bert if arch == "bert" else tiny_llama
    small, big = make(4), make(8)
    batch = batch_for(small, batch=4, length=32)
    a = saved_bytes(small, batch, anchor_every=0)
    b = saved_bytes(big, batch, anchor_every=0)
    assert a > 0 and abs(b - a) / a <= 0.10, (a, b)
    # Ordinary autograd on the same network grows with depth.
    oa = saved_bytes(small, batch, reversible_backward=False)
    ob = saved_bytes(big, batch, reversible_backward=False)
    assert ob - oa > 20 * abs(b - a), (oa, ob, a, b)


@pytest.mark.slow
def test_minilm_saved_bytes_far_below_full():
    from transformers import AutoModelForSequenceClassification

    from layerwise.measure.meft import saved_bytes_report

    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    rep = saved_bytes_report(model, batch=4, length=64)
    assert rep["reduction"] >= 0.80, rep


def test_check_mode_bound_and_anchor_tightening():
    model = tiny_bert(6, dropout=0.0)
    batch = batch_for(model)
    # float32, no anchors, MEFT3: the error grows ~100x per block; a tight bound stops the run.
    m, runner, _ = meft_model(model, variant=3, anchor_every=0, check=True, max_reconstruction_error=1e-9, on_error="stop")
    with pytest.raises(ReconstructionError, match="anchor_every"):
        m(**batch).loss.backward()
    errs = runner.stack.errors
    assert sorted(errs) == list(range(6)) and errs[0] > errs[5]  # error grows with reconstruction depth
    # on_error=anchor: the next steps store exact streams more often.
    m, runner, _ = meft_model(model, variant=3, anchor_every=4, max_reconstruction_error=1e-9, on_error="anchor")
    m(**batch).loss.backward()
    assert runner.stack.anchor_every == 2 and runner.stack.tightened


def test_bf16_autocast_runs_with_fp32_streams():
    model = tiny_llama(4)
    batch = batch_for(model)
    grads = {}
    for rev in (False, True):
        m, runner, params = meft_model(model, reversible_backward=rev)
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(**batch)
        out.loss.backward()
        grads[rev] = torch.cat([p.grad.flatten() for p in params])
    assert runner.stack.anchor_every == 1  # default under bf16: no reconstruction is used
    assert torch.isfinite(grads[True]).all() and rel(grads[True], grads[False]) < 1e-2


def test_config_errors():
    with pytest.raises(ConfigError, match="variant"):
        method_config({"name": "meft", "variant": 4})
    with pytest.raises(ConfigError, match="contiguous"):
        apply_meft(tiny_bert(4), MeftConfig(reversible_layers=[0, 2]))
    with pytest.raises(ConfigError, match="does not exist"):
        apply_meft(tiny_bert(4), MeftConfig(reversible_layers=[4]))


def common(model_dir, data, out, steps=4):
    return [
        "--model", model_dir, "--data", data, "--max-steps", str(steps), "--output", str(out),
        "--set", "train.batch_size=4", "--set", "train.progress=false", "--set", "train.log_every=2",
        "--set", "data.max_length=32", "--set", "train.eval_batch_size=16", "--set", "train.warmup_steps=0",
        "--set", "train.lr=1e-2",
    ]


def test_cli_trains_only_adapters_and_head(tiny_bert_dir, cls_jsonl, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "run"
    rc = main(["train", *common(tiny_bert_dir, cls_jsonl, out), "--method", "meft", "--set", "method.variant=2"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "meft" and summary["meft"]["variant"] == 2
    assert summary["memory"]["activations"] > 0
    trained = load_meft(out / "model")
    original = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    before = original.state_dict()
    after = trained.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("classifier.", "bert.pooler.")) for k in changed), changed
    # The adapters trained too: their up-projection left its zero bias.
    assert any(float(v.abs().sum()) > 0 for k, v in after.items() if ".meft_" in k and k.endswith("up.bias"))


def test_cli_causal_lm_without_saving(tiny_llama_dir, lm_jsonl, tmp_path):
    out = tmp_path / "run"
    rc = main(["train", *common(tiny_llama_dir, lm_jsonl, out, steps=2), "--method", "meft", "--set", "method.variant=3",
               "--set", "train.save_model=false"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"]["loss"] > 0 and summary["meft"]["anchor_every"] == 1
    assert not (out / "model").exists()
