"""Sample completions in a causal-LM run (summary.json, console, model card) and ``layerwise generate``: greedy,
the chat template when the tokenizer has one, bad input as one line, and training untouched by generation."""

from __future__ import annotations

import json
import shutil

import datasets
import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from layerwise.cli import main
from layerwise.data.tokenize import chat_tokens
from layerwise.generate import complete, held_out_prompts
from layerwise.methods.meft.method import MeftConfig, apply_meft

# A chat template in the test tokenizer's (BERT) vocabulary, rendered the same as a prefix of a longer chat.
TEMPLATE = ("{% for m in messages %}[CLS] {{ m['role'] }} : {{ m['content'] }} [SEP] {% endfor %}"
            "{% if add_generation_prompt %}[CLS] assistant : {% endif %}")
CHAT = [{"role": "user", "content": "is the film good"}, {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "and the plot"}, {"role": "assistant", "content": "dull"}]


def train_args(model_dir, data, out, *extra, steps: int = 6) -> list[str]:
    return [
        "train", "--model", str(model_dir), "--data", data, "--max-steps", str(steps), "--output", str(out),
        "--method", "lift", "--set", "method.switch_every=2", "--set", "train.batch_size=4",
        "--set", "train.progress=false", "--set", "data.max_length=24", "--set", "train.warmup_steps=1",
        "--set", "train.lr=3e-3",
        "--set", "train.sample_max_new_tokens=8", *extra,
    ]


@pytest.fixture(scope="module")
def dropout_llama_dir(tmp_path_factory, tokenizer):
    """The tiny Llama with attention dropout: training draws from torch's RNG every step, so a draw by generation
    would change the weights."""
    path = tmp_path_factory.mktemp("dropout-llama")
    model = tiny_llama()
    model.config.attention_dropout = 0.1
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sampled_run(dropout_llama_dir, lm_jsonl, tmp_path_factory):
    out = tmp_path_factory.mktemp("sampled") / "run"
    assert main(train_args(dropout_llama_dir, lm_jsonl, out)) == 0
    return out


@pytest.fixture(scope="module")
def chat_llama_dir(tiny_llama_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("chat-llama")
    shutil.copytree(tiny_llama_dir, path, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(path)
    return path


def test_samples_in_summary_and_card(sampled_run):
    summary = json.loads((sampled_run / "summary.json").read_text())
    samples = summary["samples"]
    assert len(samples) == 2
    for sample in samples:
        assert set(sample) == {"prompt", "before", "after", "reference"}
        assert sample["prompt"].startswith("review") and sample["reference"] and sample["before"] != sample["after"]
    card = (sampled_run / "model" / "README.md").read_text()
    assert "## Sample completions" in card and json.dumps(samples[0]["after"], ensure_ascii=False)[:60] in card
    # The after-sample is what the saved model generates from the same prompt ids.
    model = AutoModelForCausalLM.from_pretrained(sampled_run / "model")
    tokenizer = AutoTokenizer.from_pretrained(sampled_run / "model")
    prompt_ids = tokenizer(samples[0]["prompt"])["input_ids"]
    assert complete(model, tokenizer, prompt_ids, max_new_tokens=8, device=torch.device("cpu")) == samples[0]["after"]


def test_samples_are_logged(dropout_llama_dir, lm_jsonl, tmp_path, capsys):
    assert main(train_args(dropout_llama_dir, lm_jsonl, tmp_path / "run", "--set", "train.sample_generations=1",
                           "--set", "train.save_model=false", steps=2)) == 0
    logged = capsys.readouterr().out
    assert "sample 1: prompt" in logged and "sample 2" not in logged
    assert all(f"  {key}" in logged for key in ("reference", "before", "after"))
    assert len(json.loads((tmp_path / "run" / "summary.json").read_text())["samples"]) == 1


def test_generation_does_not_change_training(sampled_run, dropout_llama_dir, lm_jsonl, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(dropout_llama_dir, lm_jsonl, out, "--set", "train.sample_generations=0")) == 0
    assert "samples" not in json.loads((out / "summary.json").read_text())
    a, b = (load_file(run / "model" / "model.safetensors") for run in (sampled_run, out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_keeps_the_first_runs_samples_and_weights(sampled_run, dropout_llama_dir, lm_jsonl, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(dropout_llama_dir, lm_jsonl, out, "--stop-at", "3")) == 0
    assert main(["train", "--resume", str(out)]) == 0
    ref, got = (json.loads((run / "summary.json").read_text())["samples"] for run in (sampled_run, out))
    assert got == ref
    a, b = (load_file(run / "model" / "model.safetensors") for run in (sampled_run, out))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_no_samples_for_classification(tiny_bert_dir, cls_jsonl, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(tiny_bert_dir, cls_jsonl, out, "--set", "train.save_model=false", steps=2)) == 0
    assert "samples" not in json.loads((out / "summary.json").read_text())


def test_generate_prints_what_model_generate_gives(sampled_run, capsys):
    capsys.readouterr()
    assert main(["generate", str(sampled_run), "--prompt", "review 7:", "--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(sampled_run / "model")
    tokenizer = AutoTokenizer.from_pretrained(sampled_run / "model")
    ids = tokenizer("review 7:", return_tensors="pt")["input_ids"]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert printed == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) + "\n"


def test_generate_with_the_base_model(dropout_llama_dir, sampled_run, capsys):
    capsys.readouterr()
    for spec in (["--model", str(dropout_llama_dir)], [str(sampled_run)]):
        assert main(["generate", *spec, "--prompt", "review 7:", "--max-new-tokens", "12"]) == 0
    base, trained = capsys.readouterr().out.splitlines()
    assert base != trained


def test_chat_template_is_applied_when_present(chat_llama_dir, monkeypatch, capsys):
    passed = []
    original = LlamaForCausalLM.generate

    def spy(self, *args, **kwargs):
        passed.append(kwargs["input_ids"][0].tolist())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "generate", spy)
    tokenizer = AutoTokenizer.from_pretrained(chat_llama_dir)
    for flag in ([], ["--no-chat-template"]):
        argv = ["generate", "--model", str(chat_llama_dir), "--prompt", "is it good", "--max-new-tokens", "3", *flag]
        assert main(argv) == 0
    chat = [{"role": "user", "content": "is it good"}]
    rendered = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert passed == [list(rendered["input_ids"]), tokenizer("is it good")["input_ids"]]
    assert tokenizer.decode(passed[0]).endswith("[CLS] assistant :")


def test_held_out_prompts_cut_before_the_last_labelled_span(chat_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(chat_llama_dir)
    chat_ids, chat_labels = chat_tokens(tokenizer, CHAT)
    text_ids = list(range(100, 111))
    split = datasets.Dataset.from_dict({
        "input_ids": [chat_ids, [101, 7, 8, 9, 10, 11], text_ids],
        "labels": [chat_labels, [-100, -100, -100, 9, 10, 11], text_ids],
    })
    chat, pair, text = held_out_prompts(split, 5)
    before_last_answer = tokenizer.apply_chat_template(CHAT[:3], add_generation_prompt=True, tokenize=True,
                                                       return_dict=True)
    assert chat.prompt == list(before_last_answer["input_ids"]) and chat.reference == chat_ids[len(chat.prompt):]
    assert (pair.prompt, pair.reference) == ([101, 7, 8], [9, 10, 11])
    assert (text.prompt, text.reference) == (text_ids[:5], text_ids[5:])
    assert len(held_out_prompts(split, 2)) == 2


def test_generation_restores_each_modules_mode(tiny_llama_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model.train()
    model.model.layers[0].eval()  # a frozen block in a run
    modes = [m.training for m in model.modules()]
    complete(model, tokenizer, [101, 2000, 2001], max_new_tokens=2, device=torch.device("cpu"))
    assert [m.training for m in model.modules()] == modes


def test_meft_generates_without_a_kv_cache(tokenizer):
    """MEFT's reversible forward keeps no KV cache: every new token must be read with the whole sequence before it."""
    model = tiny_llama()
    apply_meft(model, MeftConfig(max_reconstruction_error=None))
    model.eval()
    prompt = [101, 2000, 2001, 2002]
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            sequence.append(int(model(torch.tensor([sequence])).logits[0, -1].argmax()))
    expected = tokenizer.decode(sequence[len(prompt):], skip_special_tokens=True)
    assert complete(model, tokenizer, prompt, max_new_tokens=6, device=torch.device("cpu")) == expected


@pytest.mark.parametrize("argv, message", [
    (["{run}/nothing"], "does not exist"),
    (["{run}"], "has no trained model"),
    (["--model", "{bert}"], "is a classification model"),
    (["--model", "{llama}", "--prompt", "  "], "--prompt is empty"),
    ([], "generate needs a model"),
    (["{run}", "--model", "{llama}"], "pass one"),
    (["--model", "{llama}", "--max-new-tokens", "0"], "--max-new-tokens 0"),
    (["--model", "{llama}", "--temperature", "0"], "greedy"),
])
def test_bad_input_is_one_line(argv, message, tmp_path, tiny_bert_dir, tiny_llama_dir, capsys):
    argv = [a.format(run=tmp_path, bert=tiny_bert_dir, llama=tiny_llama_dir) for a in argv]
    if "--prompt" not in argv:
        argv += ["--prompt", "hello"]
    capsys.readouterr()
    assert main(["generate", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


@pytest.mark.slow
def test_smollm2_answers_through_its_chat_template(capsys):
    """The packaged SmolLM2-135M-Instruct: the template's generation prompt, greedy and repeatable."""
    argv = ["generate", "--model", "smollm2", "--prompt", "What is the capital of France?", "--max-new-tokens", "12"]
    assert main(argv) == 0 and main(argv) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first == second and "Paris" in first
