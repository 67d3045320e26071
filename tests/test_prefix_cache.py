"""Frozen-prefix cache (train.prefix_cache): exactness against the uncached forward (BERT and Llama),
staleness, the size refusal, crash safety, config errors and resume."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_bert, tiny_llama

from layerwise.config import resolve
from layerwise.data import make_collate, make_loader
from layerwise.engine import prefix_cache as pc
from layerwise.errors import ConfigError, ResourceError
from layerwise.run import Run, TrainingStopped, load_inputs, train

QUIET = dict(progress=False, eval_before=False, save_model=False, log_every=1, memory_check=False, disk_check=False)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer):
    """Tiny BERT (dropout on, so the upper blocks' random stream is checked too) and tiny Llama folders."""
    out = {}
    for name, make in (("bert", lambda: tiny_bert(dropout=0.1)), ("llama", tiny_llama)):
        path = tmp_path_factory.mktemp(f"pc-{name}")
        make().save_pretrained(path)
        tokenizer.save_pretrained(path)
        out[name] = str(path)
    return out


def _raw(model_dir, data, out, *, method=None, **train_kw):
    return {
        "model": model_dir, "output": str(out), "method": method or {"name": "freeze", "top": 2},
        "data": {"source": data, "max_length": 24},
        "train": {"batch_size": 8, "max_steps": 12, **QUIET, **train_kw},
    }


def _losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _data(kind, cls_jsonl, lm_jsonl):
    # Llama: causal LM on the same texts (of 4..13 words, so batches need padding); lm_jsonl's rows are all one length.
    return cls_jsonl


# ---------------------------------------------------------------------------------------------
# Exactness


@pytest.mark.parametrize("kind,padding", [("bert", "longest"), ("llama", "longest"), ("bert", "max_length"), ("llama", "max_length")])
def test_cached_run_has_the_same_loss_curve(kind, padding, model_dirs, cls_jsonl, lm_jsonl, tmp_path):
    """fp32 cache: the loss curve of a shuffled run is the uncached one (dropout in the trained blocks included),
    with dynamic padding and with max_length padding (the build pads each batch to its longest example only)."""
    data = _data(kind, cls_jsonl, lm_jsonl)
    summaries = {}
    for mode in ("off", "on"):
        raw = _raw(model_dirs[kind], data, tmp_path / mode, prefix_cache=mode, prefix_cache_dtype="fp32",
                   prefix_cache_dir=str(tmp_path / "cache"), eval_after=True)
        raw["data"]["padding"] = padding
        cfg, mcfg = resolve(raw)
        summaries[mode] = train(cfg, mcfg, log=lambda *a, **k: None)
    a, b = _losses(tmp_path / "off"), _losses(tmp_path / "on")
    assert len(a) == 12 and max(abs(x - y) for x, y in zip(a, b)) < 1e-5
    assert summaries["on"]["prefix_cache"]["used"] and summaries["on"]["prefix_cache"]["depth"] == 2
    assert "prefix_cache" not in summaries["off"]
    key = "accuracy" if kind == "bert" else "loss"
    assert summaries["on"]["eval"][key] == pytest.approx(summaries["off"]["eval"][key], abs=1e-5)


def _setup(kind, model_dirs, cls_jsonl, lm_jsonl, tmp_path, depth=2, dtype="fp32", **data_kw):
    raw = _raw(model_dirs[kind], _data(kind, cls_jsonl, lm_jsonl), tmp_path / "run", prefix_cache="on",
               prefix_cache_dtype=dtype, prefix_cache_dir=str(tmp_path / "cache"))
    raw["data"].update(data_kw)
    cfg, _ = resolve(raw)
    task, splits, model, tok, _, anatomy = load_inputs(cfg)
    return cfg, splits, model, tok, anatomy, pc.Decision("on", depth, "")


def _open(cfg, decision, model, anatomy, tok, ds, log=None):
    return pc.open_or_build(cfg, decision, model, anatomy, tok, ds, make_collate(tok, cfg.data), device=torch.device("cpu"),
                            autocast=contextlib.nullcontext, log=log or (lambda *a, **k: None))


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_cached_forward_gives_the_same_loss_and_gradients(kind, model_dirs, cls_jsonl, lm_jsonl, tmp_path):
    cfg, splits, model, tok, anatomy, decision = _setup(kind, model_dirs, cls_jsonl, lm_jsonl, tmp_path)
    cache = _open(cfg, decision, model, anatomy, tok, splits.train)
    assert cache.built
    batch = next(iter(make_loader(splits.train, tok, cfg.data, batch_size=8, shuffle=True, seed=3, with_index=True)))
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < lengths.max()  # rows of different lengths: re-padding is exercised
    trainable = [p for b in anatomy.blocks[2:] for p in b.parameters()] + anatomy.head_parameters()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    model.eval()  # dropout off: the two forwards must be comparable

    def run(feed):
        b = dict(batch)
        ctx = cache.feed(b) if feed else contextlib.nullcontext()
        b.pop(pc.INDEX_KEY, None)
        with ctx:
            loss = model(**b).loss
        grads = torch.autograd.grad(loss, trainable)
        return loss.detach(), grads

    loss_a, grads_a = run(False)
    loss_b, grads_b = run(True)
    assert float(loss_a) == pytest.approx(float(loss_b), abs=1e-6)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)
    # The stubs are gone afterwards: the blocks run for real again.
    assert all("forward" not in b.__dict__ for b in anatomy.blocks)


def test_bf16_cache_is_close(model_dirs, cls_jsonl, lm_jsonl, tmp_path):
    cfg, splits, model, tok, anatomy, decision = _setup("llama", model_dirs, cls_jsonl, lm_jsonl, tmp_path, dtype="bf16")
    cache = _open(cfg, decision, model, anatomy, tok, splits.train)
    assert cache.manifest["files"]["hidden.bin"] == int(cache.offsets[-1]) * cache.hidden * 2
    batch = next(iter(make_loader(splits.train, tok, cfg.data, batch_size=8, shuffle=False, seed=0, with_index=True)))
    model.eval()
    with torch.no_grad():
        b = dict(batch)
        with cache.feed(b):
            cached = float(model(**b).loss)
        ref = float(model(**b).loss)
    assert abs(cached - ref) < 1e-2 * abs(ref)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_batch_rows_are_each_examples_stored_rows_then_zeros(dtype, model_dirs, cls_jsonl, lm_jsonl, tmp_path):
    cfg, splits, model, tok, anatomy, decision = _setup("bert", model_dirs, cls_jsonl, lm_jsonl, tmp_path, dtype=dtype)
    cache = _open(cfg, decision, model, anatomy, tok, splits.train)
    raw = np.asarray(cache._rows)
    index = [5, 0, 5, len(cache.offsets) - 2, 3]  # repeats and the last example
    n = [int(cache.offsets[i + 1] - cache.offsets[i]) for i in index]
    width = max(n) + 3
    h, lengths = cache.hidden_for(index, width, torch.device("cpu"))
    assert h.shape == (len(index), width, cache.hidden) and lengths == n
    for row, i in enumerate(index):
        stored = torch.from_numpy(raw[cache.offsets[i] : cache.offsets[i + 1]].copy())
        stored = stored.view(torch.bfloat16).float() if dtype == "bf16" else stored
        assert torch.equal(h[row, : n[row]].float(), stored)
        assert not h[row, n[row] :].any()
    with pytest.raises(RuntimeError, match=f"example {index[n.index(max(n))]} has {max(n)} cached positions but the batch is {max(n) - 1} wide"):
        cache.hidden_for(index, max(n) - 1, torch.device("cpu"))


# ---------------------------------------------------------------------------------------------
# Validity


def test_stale_cache_is_never_used(model_dirs, cls_jsonl, lm_jsonl, tmp_path):
    cfg, splits, model, tok, anatomy, decision = _setup("bert", model_dirs, cls_jsonl, lm_jsonl, tmp_path)
    first = _open(cfg, decision, model, anatomy, tok, splits.train)
    again = _open(cfg, decision, model, anatomy, tok, splits.train)
    assert first.built and not again.built and again.path == first.path
    # Changed prefix weights: a new cache (a block above the prefix does not matter).
    with torch.no_grad():
        anatomy.blocks[3].output.dense.weight.add_(0.1)
    assert _open(cfg, decision, model, anatomy, tok, splits.train).path == first.path
    with torch.no_grad():
        anatomy.blocks[0].output.dense.weight.add_(0.1)
    changed = _open(cfg, decision, model, anatomy, tok, splits.train)
    assert changed.built and changed.path != first.path
    # Changed data and changed depth: new caches too.
    other = _open(cfg, decision, model, anatomy, tok, splits.train.select(range(len(splits.train) - 1)))
    deeper = _open(cfg, pc.Decision("on", 3, ""), model, anatomy, tok, splits.train)
    assert other.built and deeper.built and len({changed.path, other.path, deeper.path}) == 3
    assert deeper.depth == 3 and other.manifest["examples"] == len(splits.train) - 1
    # A manifest whose key differs (tampered, or a hash collision) is stale: rebuilt, with a message.
    manifest = json.loads((deeper.path / pc.MANIFEST).read_text())
    manifest["key"]["depth"] = 1
    (deeper.path / pc.MANIFEST).write_text(json.dumps(manifest))
    said = []
    rebuilt = _open(cfg, pc.Decision("on", 3, ""), model, anatomy, tok, splits.train, log=said.append)
    assert rebuilt.built and any("stale: built for a different depth" in s for s in said)


def test_stale_cache_is_rebuilt_in_a_run(model_dirs, cls_jsonl, lm_jsonl, tmp_path):
    """Through `layerwise train`: a second run reuses the cache; after max_length changes it builds a new one."""
    summaries = []
    for i, length in enumerate((24, 24, 16)):
        raw = _raw(model_dirs["bert"], cls_jsonl, tmp_path / f"run{i}", prefix_cache="on", prefix_cache_dir=str(tmp_path / "cache"), max_steps=2)
        raw["data"]["max_length"] = length
        cfg, mcfg = resolve(raw)
        summaries.append(train(cfg, mcfg, log=lambda *a, **k: None)["prefix_cache"])
    assert [s["built"] for s in summaries] == [True, False, True]
    assert summaries[0]["path"] == summaries[1]["path"] != summaries[2]["path"]


def test_refused_when_it_does_not_fit(model_dirs, cls_jsonl, lm_jsonl, tmp_path, monkeypatch):
    import layerwise.engine.prefix_cache

    cfg, splits, model, tok, anatomy, decision = _setup("bert", model_dirs, cls_jsonl, lm_jsonl, tmp_path)
    monkeypatch.setattr(layerwise.engine.prefix_cache, "free_disk", lambda path: 1000)
    with pytest.raises(ResourceError) as err:
        _open(cfg, decision, model, anatomy, tok, splits.train)
    msg = str(err.value)
    assert "prefix cache needs about" in msg and "0.0 MiB free" in msg and "train.prefix_cache_dir" in msg and "prefix_cache=off" in msg
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    said = []
    assert _open(cfg, pc.Decision("auto", 2, ""), model, anatomy, tok, splits.train, log=said.append) is None
    assert any(s.startswith("prefix cache: off (") for s in said)


def test_estimate_matches_the_written_size(model_dirs, cls_jsonl, lm_jsonl, tmp_path):
    cfg, splits, model, tok, anatomy, decision = _setup("bert", model_dirs, cls_jsonl, lm_jsonl, tmp_path)
    cache = _open(cfg, decision, model, anatomy, tok, splits.train)
    est = pc.estimate_bytes(cache.manifest["tokens"], cache.manifest["examples"], cache.hidden, "fp32")
    assert cache.manifest["bytes"] <= est <= cache.manifest["bytes"] + 8192


# ---------------------------------------------------------------------------------------------
# Crash safety


def test_crash_mid_build_leaves_nothing_that_is_used(model_dirs, cls_jsonl, lm_jsonl, tmp_path, monkeypatch):
    cfg, splits, model, tok, anatomy, decision = _setup("bert", model_dirs, cls_jsonl, lm_jsonl, tmp_path)
    real_save = np.save

    def crash(*a, **k):
        raise KeyboardInterrupt("killed mid-build")

    monkeypatch.setattr(np, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        _open(cfg, decision, model, anatomy, tok, splits.train)
    assert not any((tmp_path / "cache").iterdir())  # the half-written build was removed
    monkeypatch.setattr(np, "save", real_save)
    # A build killed hard (no cleanup) leaves a temp folder: never read, removed by the next build.
    cache = _open(cfg, decision, model, anatomy, tok, splits.train)
    dead = cache.path.parent / f"{cache.path.name}.tmp-999999999-deadbeef"
    dead.mkdir()
    (dead / "hidden.bin").write_bytes(b"\0" * 10)
    # A final folder with a truncated data file is not used either: rebuilt.
    with open(cache.path / "hidden.bin", "r+b") as f:
        f.truncate(100)
    said = []
    fresh = _open(cfg, decision, model, anatomy, tok, splits.train, log=said.append)
    assert fresh.built and any("wrong size" in s for s in said)
    assert not dead.exists()
    assert (fresh.path / "hidden.bin").stat().st_size == fresh.manifest["files"]["hidden.bin"]


# ---------------------------------------------------------------------------------------------
# Config and eligibility


def test_config_values(model_dirs, cls_jsonl, tmp_path):
    with pytest.raises(ConfigError, match="'train.prefix_cache': 'sometimes' is not one of off, auto, on"):
        resolve(_raw(model_dirs["bert"], cls_jsonl, tmp_path / "r", prefix_cache="sometimes"))
    with pytest.raises(ConfigError, match="prefix_cache_dtype"):
        resolve(_raw(model_dirs["bert"], cls_jsonl, tmp_path / "r", prefix_cache_dtype="fp16"))
    # YAML reads a bare on/off as true/false.
    assert resolve(_raw(model_dirs["bert"], cls_jsonl, tmp_path / "r", prefix_cache=True))[0].train.prefix_cache == "on"
    assert resolve(_raw(model_dirs["bert"], cls_jsonl, tmp_path / "r", prefix_cache=False))[0].train.prefix_cache == "off"


@pytest.mark.parametrize(
    "method, train_kw, why",
    [
        ({"name": "lora"}, {}, "not known before training"),
        ({"name": "lift", "schedule": "bottom_up", "switch_every": 2}, {}, "block 0 trains at step 1"),
        ({"name": "freeze", "top": 2, "embeddings": True}, {}, "the embeddings train"),
        ({"name": "freeze", "top": 2}, {"frozen_dropout": True}, "frozen_dropout=true"),
    ],
)
def test_on_is_refused_where_the_prefix_moves(method, train_kw, why, model_dirs, cls_jsonl, tmp_path):
    cfg, mcfg = resolve(_raw(model_dirs["bert"], cls_jsonl, tmp_path / "r", method=method, prefix_cache="on", **train_kw))
    with pytest.raises(ConfigError, match=why):
        Run(cfg, mcfg, log=lambda *a, **k: None)
    assert not (tmp_path / "r").exists()


def test_lift_top_down_caches_below_its_lowest_phase(model_dirs, cls_jsonl, tmp_path):
    # 4 blocks, top_down, 3 steps a phase, 6 steps: blocks 3 then 2 train, so blocks 0..1 are a fixed prefix.
    method = {"name": "lift", "schedule": "top_down", "switch_every": 3}
    cfg, mcfg = resolve(_raw(model_dirs["bert"], cls_jsonl, tmp_path / "r", method=method, prefix_cache="on", max_steps=6,
                             prefix_cache_dir=str(tmp_path / "cache"), prefix_cache_dtype="fp32"))
    summary = Run(cfg, mcfg, log=lambda *a, **k: None).execute()
    assert summary["prefix_cache"]["depth"] == 2
    cfg, mcfg = resolve(_raw(model_dirs["bert"], cls_jsonl, tmp_path / "ref", method=method, max_steps=6))
    train(cfg, mcfg, log=lambda *a, **k: None)
    assert max(abs(x - y) for x, y in zip(_losses(tmp_path / "r"), _losses(tmp_path / "ref"))) < 1e-5


def test_salf_caches_below_its_cut(model_dirs, cls_jsonl, tmp_path):
    """salf probes with the training loader before the run opens the cache; the cache then covers the blocks below the cut."""
    method = {"name": "salf", "budget": 0.5, "samples": 16}
    losses = []
    for mode in ("on", "off"):
        cfg, mcfg = resolve(_raw(model_dirs["bert"], cls_jsonl, tmp_path / mode, method=method, prefix_cache=mode, max_steps=6,
                                 prefix_cache_dir=str(tmp_path / "cache"), prefix_cache_dtype="fp32"))
        summary = train(cfg, mcfg, log=lambda *a, **k: None)
        losses.append(_losses(tmp_path / mode))
        if mode == "on":
            assert summary["prefix_cache"]["depth"] == summary["salf"]["cut"] > 0
    assert max(abs(x - y) for x, y in zip(*losses)) < 1e-5


def test_auto_needs_two_passes(model_dirs, cls_jsonl, tmp_path):
    said = []
    # 108 training examples, 12 steps of 8: 0.89 passes.
    cfg, mcfg = resolve(_raw(model_dirs["bert"], cls_jsonl, tmp_path / "r", prefix_cache="auto"))
    run = Run(cfg, mcfg, log=said.append)
    assert not run.prefix_decision.enabled and any("0.89 passes" in s for s in said)
    cfg, mcfg = resolve(_raw(model_dirs["bert"], cls_jsonl, tmp_path / "r2", prefix_cache="auto", max_steps=30))
    assert Run(cfg, mcfg, log=said.append).prefix_decision.depth == 2


# ---------------------------------------------------------------------------------------------
# Resume


def test_resume_reuses_the_cache(model_dirs, cls_jsonl, tmp_path):
    def raw(out):
        return _raw(model_dirs["bert"], cls_jsonl, out, prefix_cache="on", prefix_cache_dtype="fp32",
                    prefix_cache_dir=str(tmp_path / "cache"), max_steps=20)

    cfg, mcfg = resolve(raw(tmp_path / "whole"))
    whole = train(cfg, mcfg, log=lambda *a, **k: None)
    cfg, mcfg = resolve(raw(tmp_path / "split"))
    with pytest.raises(TrainingStopped):
        train(cfg, mcfg, log=lambda *a, **k: None, stop_at=7)  # mid-epoch (13.5 batches an epoch)
    resumed = train(cfg, mcfg, log=lambda *a, **k: None, resume=True)
    assert whole["prefix_cache"]["built"] and not resumed["prefix_cache"]["built"]
    assert _losses(tmp_path / "whole") == _losses(tmp_path / "split")
