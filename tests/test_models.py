"""Model resolution and loading: packaged MiniLM, local folders, offline errors, GGUF conversion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import BertConfig

from layerwise import models
from layerwise.errors import ModelError
from layerwise.models import PACKAGED_MODELS, default_task_for, load_model_and_tokenizer, resolve_model_path


def test_minilm_loads_for_classification(tokenizer):
    model, tok, info = load_model_and_tokenizer("minilm", "classification", label_names=["rotten", "fresh"])
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_labels == 2 and model.config.id2label == {0: "rotten", 1: "fresh"}
    assert info["model_type"] == "bert" and info["source"] == "minilm" and Path(info["path"]).is_dir()
    assert 20e6 < info["num_parameters"] < 25e6
    assert info["newly_initialized"] == ["classifier.bias", "classifier.weight"]
    assert model.dtype == torch.float32 and tok.pad_token_id == 0
    with torch.no_grad():
        logits = model(**tok(["a fine film"], return_tensors="pt")).logits
    assert logits.shape == (1, 2)
    assert default_task_for("minilm") == "classification"
    assert set(PACKAGED_MODELS) == {"minilm", "smollm2"}


@pytest.mark.parametrize("spec", ["bert-base-uncased", "some-org/not-here", "./no/such/folder"])
def test_unknown_model_is_an_offline_model_error(spec):
    with pytest.raises(ModelError) as info:
        resolve_model_path(spec)
    msg = str(info.value)
    assert "offline" in msg and spec in msg and "hf download" in msg and "\n" not in msg


def hub_cache(home: Path, repo_id: str, files: Path, revision: str = "0123456789abcdef0123456789abcdef01234567") -> None:
    """Lay ``files`` out as huggingface_hub's cache keeps a downloaded model: snapshots/REV/... and refs/main."""
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for f in files.iterdir():
        (snapshot / f.name).symlink_to(f.resolve())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)


def test_a_hub_id_trains_from_the_local_cache_offline(tmp_path, cls_jsonl):
    from conftest import minilm_path

    home = tmp_path / "hf"
    hub_cache(home, "sentence-transformers/all-MiniLM-L6-v2", Path(minilm_path()))
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    common = ["--data", cls_jsonl, "--max-steps", "2", "--set", "train.batch_size=4", "--set", "data.max_length=16",
              "--set", "train.progress=false", "--set", "train.save_model=false", "--set", "train.eval_before=false"]
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "layerwise", "train", "--model", "sentence-transformers/all-MiniLM-L6-v2",
                           *common, "--output", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "sentence-transformers/all-MiniLM-L6-v2" and summary["steps"] == 2
    assert summary["model_info"]["path"].startswith(str(home / "hub" / "models--sentence-transformers--all-MiniLM-L6-v2"))
    # Not in the cache while offline: one line naming the id and the fix; no run folder.
    proc = subprocess.run([sys.executable, "-m", "layerwise", "train", "--model", "sentence-transformers/not-cached",
                           *common, "--output", str(tmp_path / "none")], env=env, capture_output=True, text=True, timeout=300)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert "'sentence-transformers/not-cached'" in err[0] and "hf download" in err[0] and "offline" in err[0]
    assert not (tmp_path / "none").exists()


def test_folder_without_config_and_bad_task(tmp_path):
    with pytest.raises(ModelError, match="config.json"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(ModelError, match="causal_lm"):
        load_model_and_tokenizer("minilm", "translation")


def test_local_folder_round_trip(tiny_bert_dir, tiny_llama_dir):
    model, tok, info = load_model_and_tokenizer(tiny_bert_dir, "classification", num_labels=2)
    assert info["path"] == str(Path(tiny_bert_dir).resolve()) and info["newly_initialized"] == []
    assert model.config.hidden_size == 32 and default_task_for(tiny_bert_dir) == "classification"
    # Another number of classes than the checkpoint's head: the head is replaced, not an error.
    model, _, info = load_model_and_tokenizer(tiny_bert_dir, "classification", label_names=["a", "b", "c"])
    assert model.config.num_labels == 3 and "classifier.weight" in info["newly_initialized"]
    assert model.classifier.weight.shape == (3, 32)
    # A decoder folder: causal_lm by default, and seq-cls works since pad_token_id is set.
    assert default_task_for(tiny_llama_dir) == "causal_lm"
    lm, tok, info = load_model_and_tokenizer(tiny_llama_dir, "causal_lm")
    assert info["model_type"] == "llama" and lm.config.pad_token_id is not None
    cls, tok, _ = load_model_and_tokenizer(tiny_llama_dir, "classification", num_labels=2)
    batch = tok(["short", "a longer input here"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(cls(**batch).logits).all()


def test_default_task_for_configs():
    assert default_task_for(BertConfig()) == "classification"
    from transformers import LlamaConfig

    assert default_task_for(LlamaConfig()) == "causal_lm"
    assert default_task_for(LlamaConfig(architectures=["LlamaForSequenceClassification"])) == "classification"


def test_tokenizer_without_pad_gets_eos(tmp_path, tiny_llama_dir):
    folder = tmp_path / "nopad"
    folder.mkdir()
    for f in Path(tiny_llama_dir).iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    cfg_path = folder / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg["eos_token"] = "[SEP]"
    tok_cfg["pad_token"] = None
    cfg_path.write_text(json.dumps(tok_cfg))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(folder).pad_token is None
    model, tok, _ = load_model_and_tokenizer(str(folder), "causal_lm")
    assert tok.pad_token == "[SEP]" and tok.pad_token_id == tok.eos_token_id


def test_broken_gguf_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERWISE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelError, match="broken.gguf"):
        resolve_model_path(str(bad))
    left = list((tmp_path / "cache" / "models").iterdir())
    assert left == [], left  # no half-written folder (or temp folder) that could later look valid


def test_gguf_cache_naming_and_reuse(tmp_path, monkeypatch):
    """Without converting: one folder per (path, size, mtime), reused while the file is unchanged."""
    monkeypatch.setenv("LAYERWISE_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_convert(gguf, target, log=None):
        calls.append(gguf)
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
        (target / "model.safetensors").write_bytes(b"")

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    g = tmp_path / "My-Model.Q8_0.gguf"
    g.write_bytes(b"x" * 10)
    first = resolve_model_path(str(g))
    assert resolve_model_path(str(g)) == first and len(calls) == 1
    assert Path(first).parent == tmp_path / "cache" / "models" and Path(first).name.startswith("my-model.q8_0-")
    g.write_bytes(b"y" * 20)
    assert resolve_model_path(str(g)) != first and len(calls) == 2


@pytest.mark.slow
def test_smollm2_converts_once_to_a_float_folder(tmp_path, monkeypatch):
    # The conversion takes ~20 s on 2 CPU cores, so the test converts into its own cache.
    monkeypatch.setenv("LAYERWISE_CACHE", str(tmp_path / "cache"))
    start = time.perf_counter()
    path = Path(resolve_model_path("smollm2"))
    first = time.perf_counter() - start
    start = time.perf_counter()
    assert Path(resolve_model_path("smollm2")) == path
    cached = time.perf_counter() - start
    print(f"smollm2 conversion: first {first:.1f} s, cached {cached * 1000:.1f} ms")
    assert cached < 1.0
    assert path == tmp_path / "cache" / "models" / "smollm2-135m-instruct"
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert sorted(p.name for p in path.parent.iterdir()) == ["smollm2-135m-instruct"]  # no temp folders left
    assert default_task_for(str(path)) == "causal_lm"
    model, tok, info = load_model_and_tokenizer("smollm2", "causal_lm")
    assert info["model_type"] == "llama" and 130e6 < info["num_parameters"] < 140e6
    assert model.dtype == torch.float32 and tok.pad_token is not None and model.config.pad_token_id is not None
    batch = tok(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()
    assert os.access(path / "model.safetensors", os.R_OK)
