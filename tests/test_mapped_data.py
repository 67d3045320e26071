"""Memory-mapped data (``data.memory_map``): files read through ``datasets.load_dataset`` and tokenized as batches are
read train the same weights as the in-memory path; hub dataset ids come from huggingface_hub's cache."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_chat import MARKED
from test_resume import args, assert_same, final_state
from transformers import AutoTokenizer

from layerwise.cli import main
from layerwise.data import DataConfig, load_splits, make_loader, tokenize_splits
from layerwise.errors import DataError


def rows(n: int) -> list[dict]:
    return [{"text": f"review {i} " + ("great fun" if i % 3 else "dull and slow") * (1 + i % 4), "label": "pos" if i % 3 else "neg"}
            for i in range(n)]


def write(path: Path, items: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return str(path)


def test_memory_mapped_splits_and_batches_equal_the_in_memory_ones(tokenizer, tmp_path):
    src = write(tmp_path / "d.jsonl", rows(60))
    loaded = {}
    for mode in ("off", "on"):
        cfg = DataConfig(source=src, memory_map=mode, max_length=16, eval_size=12)
        splits = tokenize_splits(load_splits(cfg, "classification"), tokenizer, cfg, "classification")
        loader = make_loader(splits.train, tokenizer, cfg, batch_size=8, shuffle=True, seed=3)
        loaded[mode] = (splits, [b for b in loader])
    (plain, plain_batches), (mapped, mapped_batches) = loaded["off"], loaded["on"]
    assert mapped.layout is not None and plain.layout is None
    assert mapped.label_names == plain.label_names == ["neg", "pos"]
    # The rows stay in the Arrow file (datasets' cache), not in Python lists.
    assert mapped.train.cache_files and not plain.train.cache_files
    assert len(mapped.eval) == len(plain.eval) == 12
    assert [mapped.eval[i] for i in range(12)] == [plain.eval[i] for i in range(12)]
    assert len(plain_batches) == len(mapped_batches)
    for a, b in zip(plain_batches, mapped_batches):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_memory_mapped_training_matches_and_resumes_exactly(tiny_bert_dir, tmp_path):
    data = write(tmp_path / "d.jsonl", rows(80))
    plain, mapped, resumed = tmp_path / "plain", tmp_path / "mapped", tmp_path / "resumed"
    assert main(args(tiny_bert_dir, data, plain, "--method", "lift")) == 0
    assert main(args(tiny_bert_dir, data, mapped, "--method", "lift", "--set", "data.memory_map=on")) == 0
    assert_same(final_state(plain), final_state(mapped))
    assert main(args(tiny_bert_dir, data, resumed, "--method", "lift", "--set", "data.memory_map=on", "--stop-at", "4")) == 0
    assert main(["train", "--resume", str(resumed)]) == 0
    assert_same(final_state(mapped), final_state(resumed))
    a, b = load_file(plain / "model" / "model.safetensors"), load_file(resumed / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_memory_mapped_chats_keep_the_assistant_only_loss(tokenizer, tmp_path):
    tok = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = MARKED
    chats = [{"messages": [{"role": "user", "content": f"word {i}?"}, {"role": "assistant", "content": f"answer {i % 3}"}]}
             for i in range(30)]
    src = write(tmp_path / "chats.jsonl", chats)
    out = {}
    for mode in ("off", "on"):
        cfg = DataConfig(source=src, memory_map=mode, max_length=32, eval_size=5)
        splits = tokenize_splits(load_splits(cfg, "causal_lm"), tok, cfg, "causal_lm")
        out[mode] = [splits.train[i] for i in range(len(splits.train))]
    assert out["on"] == out["off"]


def test_memory_mapped_bad_rows_fail_at_load(tmp_path):
    src = write(tmp_path / "bad.jsonl", rows(10) + [{"text": "no label here"}] + rows(5))
    with pytest.raises(DataError, match="label"):
        load_splits(DataConfig(source=src, memory_map="on", eval_size=2), "classification")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a", "label": 1}\n{"text": "b", "lab\n')
    with pytest.raises(DataError, match="cannot read"):
        load_splits(DataConfig(source=str(broken), memory_map="on", eval_size=1), "classification")


def test_a_hub_dataset_id_loads_from_the_cache_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    home = tmp_path / "hf"
    repo = home / "hub" / "datasets--someone--reviews"
    snapshot = repo / "snapshots" / ("ab" * 20)
    (snapshot / "data").mkdir(parents=True)
    write(snapshot / "data" / "train.jsonl", rows(40))
    write(snapshot / "data" / "test.jsonl", rows(7))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("ab" * 20)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    splits = load_splits(DataConfig(source="someone/reviews"), "classification")
    assert splits.layout is not None and (len(splits.train), len(splits.eval)) == (40, 7)
    with pytest.raises(DataError, match="hf download someone/missing --repo-type dataset"):
        load_splits(DataConfig(source="someone/missing"), "classification")
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def resident_bytes(paths: set[str]) -> tuple[int, int]:
    """(mappings of ``paths`` in this process, their resident bytes) from /proc/self/smaps."""
    count, rss, inside = 0, 0, False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
            inside = len(fields) == 6 and fields[5] in paths
            count += inside
        elif inside and fields[0] == "Rss:":
            rss += int(fields[1]) * 1024
    return count, rss


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps; releasing pages is Linux only")
def test_rows_read_from_a_memory_mapped_file_do_not_stay_resident(tokenizer, tmp_path):
    src = write(tmp_path / "d.jsonl", rows(5000))
    cfg = DataConfig(source=src, memory_map="on", max_length=16, eval_size=100)
    splits = load_splits(cfg, "classification")
    paths = {os.path.realpath(f["filename"]) for f in splits.train.cache_files}
    assert resident_bytes(paths) == (1, 0)  # mapped; what loading read was handed back
    raw = [splits.train[i] for i in range(0, 4900, 97)]
    assert resident_bytes(paths)[1] > 0  # a plain read leaves its pages resident
    tokenized = tokenize_splits(splits, tokenizer, cfg, "classification")
    assert resident_bytes(paths)[1] == 0
    batch = tokenized.train.__getitems__(list(range(0, 4900, 97)))
    assert resident_bytes(paths)[1] == 0  # the tokenizing read hands its pages back
    assert [tokenized.label_names[b["labels"]] for b in batch] == [r["label"] for r in raw]
