"""Data loading, column mapping, seeded splits, bad input, tokenization and padding."""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest
import torch

from layerwise.data import DataConfig, Splits, load_splits, make_loader, tokenize_splits
from layerwise.errors import ConfigError, DataError


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def reviews(n: int = 40) -> list[dict]:
    return [{"review": f"review number {i} " + ("great" if i % 2 else "awful"), "sentiment": "pos" if i % 2 else "neg", "id": i} for i in range(n)]


def cfg_for(source: str, **kw) -> DataConfig:
    return DataConfig(source=source, **kw)


# ---------------------------------------------------------------------------------------------
# Loading and column mapping


def test_jsonl_column_mapping_and_inferred_labels(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", reviews())
    s = load_splits(cfg_for(src, text_column="review", label_column="sentiment", eval_size=10), "classification")
    assert isinstance(s, Splits) and s.columns == ("text",)
    assert s.label_names == ["neg", "pos"]
    assert s.train.column_names == ["text", "label"] and s.eval.column_names == ["text", "label"]
    assert (s.train.num_rows, s.eval.num_rows) == (30, 10)
    for row in list(s.train) + list(s.eval):
        assert row["label"] == (1 if row["text"].endswith("great") else 0)


def test_given_label_order_and_int_ids(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", reviews())
    s = load_splits(cfg_for(src, text_column="review", label_column="sentiment", labels=["pos", "neg"]), "classification")
    assert s.label_names == ["pos", "neg"]
    assert all(r["label"] == (0 if r["text"].endswith("great") else 1) for r in s.train)
    # Int labels with names: the ints are ids into the given names.
    ints = write_jsonl(tmp_path / "i.jsonl", [{"text": f"t{i}", "label": i % 3} for i in range(30)])
    s = load_splits(cfg_for(ints, labels=["a", "b", "c"]), "classification")
    assert s.label_names == ["a", "b", "c"] and set(s.train["label"]) == {0, 1, 2}


def test_csv_parquet_json_and_jsonl_give_the_same_splits(tmp_path):
    rows = [{"text": f"example {i}", "label": i % 2} for i in range(50)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    got = []
    for ext in ("jsonl", "csv", "parquet", "json"):
        s = load_splits(cfg_for(str(tmp_path / f"d.{ext}")), "classification")
        assert s.label_names == ["0", "1"]
        got.append((list(s.train["text"]), list(s.train["label"]), list(s.eval["text"])))
    assert all(g == got[0] for g in got)
    assert len(got[0][2]) == 5  # eval_size 0.1 of 50


def test_text_pair_is_used_when_present(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{"text": f"q{i}", "text_pair": f"passage {i}", "label": i % 2} for i in range(20)])
    s = load_splits(cfg_for(src), "classification")
    assert s.columns == ("text", "text_pair") and "text_pair" in s.train.column_names
    src = write_jsonl(tmp_path / "p2.jsonl", [{"q": f"q{i}", "ctx": f"passage {i}", "y": i % 2} for i in range(20)])
    s = load_splits(cfg_for(src, text_column="q", text_pair_column="ctx", label_column="y"), "classification")
    assert s.train[0]["text_pair"].startswith("passage")


def test_save_to_disk_folders(tmp_path):
    import datasets

    rows = {"sentence": [f"s{i}" for i in range(30)], "label": [i % 2 for i in range(30)]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "single"))
    s = load_splits(cfg_for(str(tmp_path / "single"), text_column="sentence", eval_size=6), "classification")
    assert (s.train.num_rows, s.eval.num_rows) == (24, 6)
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_dict(rows),
        validation=datasets.Dataset.from_dict({"sentence": ["v0", "v1", "v2"], "label": [0, 1, 1]}),
    )
    dd.save_to_disk(str(tmp_path / "dict"))
    s = load_splits(cfg_for(str(tmp_path / "dict"), text_column="sentence"), "classification")
    # The named validation split is the eval set, as is (no random split).
    assert list(s.eval["text"]) == ["v0", "v1", "v2"] and s.train.num_rows == 30
    assert not any(p.name.startswith("cache-") for p in (tmp_path / "dict").rglob("*")), "nothing written into the saved folder"
    # A ClassLabel column names the classes.
    feats = datasets.Features(sentence=datasets.Value("string"), label=datasets.ClassLabel(names=["negative", "positive"]))
    datasets.Dataset.from_dict(rows, features=feats).save_to_disk(str(tmp_path / "named"))
    s = load_splits(cfg_for(str(tmp_path / "named"), text_column="sentence"), "classification")
    assert s.label_names == ["negative", "positive"] and set(s.train["label"]) == {0, 1}


def test_seeded_split_is_fixed_and_depends_on_the_seed(cls_jsonl):
    a = load_splits(cfg_for(cls_jsonl, seed=0), "classification")
    b = load_splits(cfg_for(cls_jsonl, seed=0), "classification")
    c = load_splits(cfg_for(cls_jsonl, seed=1), "classification")
    assert list(a.eval["text"]) == list(b.eval["text"]) and list(a.train["text"]) == list(b.train["text"])
    assert list(a.eval["text"]) != list(c.eval["text"])
    assert not set(a.train["text"]) & set(a.eval["text"])
    assert a.train.num_rows + a.eval.num_rows == 120 and a.eval.num_rows == 12


def test_max_samples_keep_the_first_n(cls_jsonl):
    full = load_splits(cfg_for(cls_jsonl), "classification")
    cut = load_splits(cfg_for(cls_jsonl, max_train_samples=7, max_eval_samples=3), "classification")
    assert list(cut.train["text"]) == list(full.train["text"])[:7]
    assert list(cut.eval["text"]) == list(full.eval["text"])[:3]


def test_causal_lm_columns(lm_jsonl, cls_jsonl):
    s = load_splits(cfg_for(lm_jsonl), "causal_lm")
    assert s.columns == ("prompt", "response") and s.label_names is None
    s = load_splits(cfg_for(cls_jsonl), "causal_lm")
    assert s.columns == ("text",) and s.train.column_names == ["text"]


# ---------------------------------------------------------------------------------------------
# Bad input: one DataError line naming the problem


def _bad_cases(tmp_path):
    good = [{"text": f"t{i}", "label": i % 2} for i in range(20)]
    write_jsonl(tmp_path / "good.jsonl", good)
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "notes.txt").write_text("hello\n")
    write_jsonl(tmp_path / "strs.jsonl", [{"text": f"t{i}", "label": ["neg", "pos", "meh"][i % 3]} for i in range(20)])
    write_jsonl(tmp_path / "ints.jsonl", [{"text": f"t{i}", "label": [0, 2][i % 2]} for i in range(20)])
    write_jsonl(tmp_path / "one.jsonl", [{"text": f"t{i}", "label": "pos"} for i in range(20)])
    (tmp_path / "broken.jsonl").write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1\n')
    (tmp_path / "broken.csv").write_text("text,label\na,0\nb,1,extra,fields\n")
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "p", "answer": "a"}] * 5)
    d = str(tmp_path)
    return [
        (cfg_for(f"{d}/missing.jsonl"), "classification", ["missing.jsonl", "does not exist"]),
        (cfg_for(f"{d}/notes.txt"), "classification", ["'.txt'", ".jsonl"]),
        (cfg_for(f"{d}/empty.jsonl"), "classification", ["empty", "0 rows"]),
        (cfg_for(f"{d}/good.jsonl", text_column="review"), "classification", ["'review'", "text, label", "data.text_column"]),
        (cfg_for(f"{d}/good.jsonl", label_column="y"), "classification", ["'y'", "data.label_column"]),
        (cfg_for(f"{d}/prompts.jsonl"), "causal_lm", ["'response'", "data.response_column"]),
        (cfg_for(f"{d}/strs.jsonl", labels=["neg", "pos"]), "classification", ["'meh'", "['neg', 'pos']"]),
        (cfg_for(f"{d}/ints.jsonl"), "classification", ["int label 2", "0..1"]),
        (cfg_for(f"{d}/one.jsonl"), "classification", ["fewer than 2 classes", "pos"]),
        (cfg_for(f"{d}/good.jsonl", labels=["neg"]), "classification", ["fewer than 2", "data.labels"]),
        (cfg_for(f"{d}/good.jsonl", eval_size=0.01), "classification", ["eval split", "empty"]),
        (cfg_for(f"{d}/good.jsonl", eval_size=20), "classification", ["eval_size", "none to train"]),
        (cfg_for(f"{d}/broken.jsonl"), "classification", ["broken.jsonl", "line 2"]),
        (cfg_for(f"{d}/broken.csv"), "classification", ["broken.csv", "Expected 2 fields"]),
        (cfg_for("imdb"), "classification", ["'imdb'", "rotten_tomatoes", "boolq", ".parquet"]),
    ]


def test_bad_input_raises_one_line_data_error(tmp_path):
    for cfg, task, needles in _bad_cases(tmp_path):
        with pytest.raises(DataError) as info:
            load_splits(cfg, task)
        msg = str(info.value)
        assert "\n" not in msg, msg
        for needle in needles:
            assert needle in msg, (needle, msg)


def test_config_validate_and_unknown_task():
    with pytest.raises(ConfigError, match="max_length"):
        DataConfig(max_length=1).validate()
    with pytest.raises(ConfigError, match="eval_size"):
        DataConfig(eval_size=0).validate()
    with pytest.raises(ConfigError, match="causal_lm"):
        load_splits(DataConfig(), "regression")


# ---------------------------------------------------------------------------------------------
# Tokenization and batching


def test_causal_lm_labels_mask_prompt_and_padding(tmp_path, tokenizer):
    rows = [{"prompt": f"question {i} about " + "words " * (i % 5), "response": " answer" + " yes" * (i % 3 + 1)} for i in range(12)]
    src = write_jsonl(tmp_path / "lm.jsonl", rows)
    cfg = cfg_for(src, eval_size=2, max_length=32)
    splits = load_splits(cfg, "causal_lm")
    tok = tokenize_splits(splits, tokenizer, cfg, "causal_lm")
    assert tok.tokenized and set(tok.train.column_names) == {"input_ids", "attention_mask", "labels"}
    prompts = {r["prompt"]: r["response"] for r in splits.train}
    loader = make_loader(tok.train, tokenizer, cfg, batch_size=4, shuffle=False, seed=0)
    row = 0
    for batch in loader:
        for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
            prompt = list(prompts)[row]
            row += 1
            p_len = len(tokenizer(prompt)["input_ids"])
            r_ids = tokenizer(prompts[prompt], add_special_tokens=False)["input_ids"]
            n = int(mask.sum())
            assert n == p_len + len(r_ids)  # MiniLM has no EOS to append
            assert (labels[:p_len] == -100).all() and (labels[n:] == -100).all()
            assert labels[p_len:n].tolist() == r_ids == ids[p_len:n].tolist()
            assert (ids[n:] == tokenizer.pad_token_id).all() and (mask[n:] == 0).all()
    assert row == splits.train.num_rows


def test_long_prompt_is_cut_from_the_left_and_empty_responses_are_dropped(tmp_path, tokenizer):
    rows = [{"prompt": "filler " * 100 + f"question {i}?", "response": " yes" if i % 4 else ""} for i in range(12)]
    src = write_jsonl(tmp_path / "long.jsonl", rows)
    cfg = cfg_for(src, eval_size=4, max_length=16)
    tok = tokenize_splits(load_splits(cfg, "causal_lm"), tokenizer, cfg, "causal_lm")
    yes = tokenizer(" yes", add_special_tokens=False)["input_ids"]
    for r in tok.train:
        assert len(r["input_ids"]) == 16
        assert r["input_ids"][0] == tokenizer.cls_token_id  # the leading special token survives
        assert [t for t in r["labels"] if t != -100] == yes
        assert "question" in tokenizer.decode(r["input_ids"])
    assert sum(tok.dropped.values()) == 3  # the empty responses (no EOS in MiniLM) have nothing to predict
    # Nothing left at all -> DataError.
    src = write_jsonl(tmp_path / "none.jsonl", [{"prompt": f"p{i}", "response": ""} for i in range(8)])
    cfg = cfg_for(src, eval_size=2)
    with pytest.raises(DataError, match="max_length"):
        tokenize_splits(load_splits(cfg, "causal_lm"), tokenizer, cfg, "causal_lm")


def test_text_gets_eos_only_when_it_fits(tmp_path, tokenizer):
    tok_eos = copy.deepcopy(tokenizer)
    tok_eos.eos_token = "[unused1]"
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": "short one"}] * 5 + [{"text": "long " * 50}] * 5)
    cfg = cfg_for(src, eval_size=2, max_length=12)
    tok = tokenize_splits(load_splits(cfg, "causal_lm"), tok_eos, cfg, "causal_lm")
    for r in list(tok.train) + list(tok.eval):
        assert r["labels"] == r["input_ids"] and len(r["input_ids"]) <= 12
        if len(r["input_ids"]) < 12:
            assert r["input_ids"][-1] == tok_eos.eos_token_id
        else:
            assert r["input_ids"][-1] != tok_eos.eos_token_id


def test_classification_tokens_and_max_length_padding(cls_jsonl, tokenizer):
    cfg = cfg_for(cls_jsonl, max_length=24, padding="max_length")
    tok = tokenize_splits(load_splits(cfg, "classification"), tokenizer, cfg, "classification")
    assert set(tok.train.column_names) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    batch = next(iter(make_loader(tok.train, tokenizer, cfg, batch_size=8, shuffle=True, seed=0)))
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert batch[key].shape == (8, 24)
    assert batch["labels"].shape == (8,) and set(batch["labels"].tolist()) <= {0, 1}
    longest = tokenize_splits(load_splits(cfg_for(cls_jsonl, max_length=24), "classification"), tokenizer, cfg, "classification")
    cfg_l = cfg_for(cls_jsonl, max_length=24)
    b = next(iter(make_loader(longest.train, tokenizer, cfg_l, batch_size=8, shuffle=False, seed=0)))
    assert b["input_ids"].shape[1] == max(len(x) for x in longest.train["input_ids"][:8]) < 24


def test_shuffle_is_reproducible_and_resumable(cls_jsonl, tokenizer):
    cfg = cfg_for(cls_jsonl)
    tok = tokenize_splits(load_splits(cfg, "classification"), tokenizer, cfg, "classification")

    def order(seed):
        return [b["input_ids"][:, 1].tolist() for b in make_loader(tok.train, tokenizer, cfg, batch_size=10, shuffle=True, seed=seed)]

    assert order(3) == order(3) and order(3) != order(4)
    loader = make_loader(tok.train, tokenizer, cfg, batch_size=10, shuffle=True, seed=3)
    it = iter(loader)
    first = [next(it) for _ in range(2)]
    state = loader.sampler.state_dict()
    resumed = make_loader(tok.train, tokenizer, cfg, batch_size=10, shuffle=True, seed=3)
    resumed.sampler.load_state_dict(state)
    rest = [b["input_ids"][:, 1].tolist() for b in resumed]
    assert [b["input_ids"][:, 1].tolist() for b in first] + rest == order(3)
    assert torch.equal(first[0]["labels"], next(iter(make_loader(tok.train, tokenizer, cfg, 10, True, 3)))["labels"])


def test_tokenizer_without_pad_token_pads_with_eos(tmp_path, tokenizer):
    tok_nopad = copy.deepcopy(tokenizer)
    tok_nopad.eos_token = "[unused1]"
    tok_nopad.pad_token = None
    src = write_jsonl(tmp_path / "v.jsonl", [{"text": "word " * (1 + i % 7)} for i in range(20)])
    cfg = cfg_for(src)
    tok = tokenize_splits(load_splits(cfg, "causal_lm"), tok_nopad, cfg, "causal_lm")
    batch = next(iter(make_loader(tok.train, tok_nopad, cfg, batch_size=16, shuffle=False, seed=0)))
    pads = batch["input_ids"][batch["attention_mask"] == 0]
    assert pads.numel() > 0 and (pads == tok_nopad.eos_token_id).all()


# ---------------------------------------------------------------------------------------------
# Packaged sets


def test_packaged_rotten_tomatoes(tokenizer):
    s = load_splits(DataConfig(source="rotten_tomatoes"), "classification")
    train, evalt = list(s.train["text"]), list(s.eval["text"])
    assert s.label_names == ["rotten", "fresh"]
    assert len(set(train)) == len(train) and len(set(evalt)) == len(evalt)
    assert not set(train) & set(evalt)
    assert len(evalt) >= 1000 and len(train) > 10_000
    assert set(s.train["label"]) == {0, 1} and set(s.eval["label"]) == {0, 1}
    assert all(t == t.strip() and t for t in train[:500])
    # A small eval_size is raised to 1000 for this set; causal_lm holds out the same texts.
    lm = load_splits(DataConfig(source="rotten_tomatoes", eval_size=0.01), "causal_lm")
    assert lm.columns == ("text",) and lm.eval.num_rows == 1000
    assert set(lm.eval["text"]) <= set(evalt) | set(train)


def test_packaged_boolq():
    s = load_splits(DataConfig(source="boolq"), "classification")
    assert s.columns == ("text", "text_pair") and s.label_names == ["no", "yes"]
    assert s.eval.num_rows >= 1000 and set(s.train["label"]) == {0, 1}
    pairs = list(zip(s.train["text"], s.train["text_pair"]))
    assert len(set(pairs)) == len(pairs)
    lm = load_splits(DataConfig(source="boolq", max_train_samples=50), "causal_lm")
    assert lm.columns == ("prompt", "response") and lm.train.num_rows == 50
    assert all(p.endswith("?\nAnswer:") and "\nQuestion: " in p for p in lm.train["prompt"])
    assert set(lm.train["response"]) <= {" yes", " no"}
