"""``layerwise eval``: the local lm-evaluation-harness tasks hold the rows training on packaged BoolQ holds out, in
its prompts; a run's model is scored through ``lm_eval.simple_evaluate``; bad input is one line. The slow test
fine-tunes SmolLM2 on BoolQ and checks that the harness scores it above the base model."""

from __future__ import annotations

import json
import math
import shlex
import shutil
import subprocess
import sys
import time

import pytest
from transformers import AutoTokenizer

from layerwise.cli import main
from layerwise.data import DataConfig, load_splits
from layerwise.harness import HELDOUT_FILE, heldout_boolq, write_tasks
from layerwise.preflight import cpu_has_bf16

lm_eval_tasks = pytest.importorskip("lm_eval.tasks")

# A chat template in the tiny models' (BERT) vocabulary.
TEMPLATE = ("{% for m in messages %}[CLS] {{ m['role'] }} : {{ m['content'] }} [SEP] {% endfor %}"
            "{% if add_generation_prompt %}[CLS] assistant : {% endif %}")


def harness_tasks(folder) -> dict:
    manager = lm_eval_tasks.TaskManager(include_path=str(folder), include_defaults=False)
    return manager.load(["boolq_layerwise", "boolq_layerwise_chat"])["tasks"]


@pytest.fixture(scope="module")
def decoder_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama with the begin/end tokens the harness needs and a chat template."""
    path = tmp_path_factory.mktemp("decoder")
    shutil.copytree(tiny_llama_dir, path, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.chat_template = "[CLS]", "[SEP]", TEMPLATE
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def run_dir(decoder_dir, tmp_path_factory):
    """A finished run on packaged BoolQ with a held-out split of its own (data.seed=1)."""
    out = tmp_path_factory.mktemp("eval") / "run"
    assert main(["train", "--model", str(decoder_dir), "--data", "boolq", "--method", "lift", "--max-steps", "2",
                 "--output", str(out), "--set", "data.seed=1", "--set", "data.max_length=64",
                 "--set", "data.max_train_samples=16", "--set", "data.max_eval_samples=8",
                 "--set", "train.progress=false", "--set", "train.eval_before=false"]) == 0
    return out


def test_tasks_hold_the_held_out_rows_in_the_training_prompts(tmp_path):
    folder = write_tasks(tmp_path / "tasks")
    held = load_splits(DataConfig(source="boolq"), "classification").eval
    rows = [json.loads(line) for line in (folder / HELDOUT_FILE).read_text().splitlines()]
    assert [(r["question"], r["passage"], r["label"]) for r in rows] == list(
        zip(held["text"], held["text_pair"], held["label"]))
    first = (folder / HELDOUT_FILE).read_bytes()
    assert write_tasks(tmp_path / "again").joinpath(HELDOUT_FILE).read_bytes() == first  # deterministic
    assert heldout_boolq(seed=1) != rows

    tasks = harness_tasks(folder)
    plain, chat = tasks["boolq_layerwise"], tasks["boolq_layerwise_chat"]
    docs = list(plain.test_docs())
    assert len(docs) == len(rows) >= 1000
    prompts = load_splits(DataConfig(source="boolq"), "causal_lm").eval
    chats = load_splits(DataConfig(source="boolq_chat"), "causal_lm").eval["messages"]
    for doc, prompt, response, messages in zip(docs[:100], prompts["prompt"], prompts["response"], chats):
        user, assistant = json.loads(messages)
        # Plain: the training prompt, then the delimiter and the answer make the training response.
        assert plain.doc_to_text(doc) == prompt
        assert plain.config.target_delimiter + plain.doc_to_choice(doc)[plain.doc_to_target(doc)] == response
        # Chat: the user turn; after the chat template the harness scores the bare answer, as the assistant turn.
        assert chat.doc_to_text(doc) == user["content"]
        assert chat.doc_to_choice(doc)[chat.doc_to_target(doc)] == assistant["content"]


def test_eval_scores_a_run_on_its_own_held_out_split(run_dir, capsys):
    assert main(["eval", str(run_dir), "--limit", "6", "--batch-size", "3"]) == 0
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert results["n-samples"]["boolq_layerwise"]["effective"] == 6
    assert 0 <= results["results"]["boolq_layerwise"]["acc,none"] <= 1
    rows = [json.loads(line) for line in (run_dir / "eval" / "tasks" / HELDOUT_FILE).read_text().splitlines()]
    assert rows == heldout_boolq(seed=1)  # the rows this run held out, not the default split
    command = results["layerwise"]["lm_eval_command"]
    assert command.startswith("lm_eval --model hf --model_args pretrained=") and "--apply_chat_template" not in command
    assert f"--include_path {run_dir.resolve() / 'eval' / 'tasks'}" in command and "--limit 6" in command
    out = capsys.readouterr().out
    assert command in out and "boolq_layerwise" in out and "acc" in out


def test_eval_the_chat_task_through_the_chat_template(run_dir, decoder_dir, tmp_path, capsys):
    out = tmp_path / "base"
    assert main(["eval", str(run_dir), "--model", str(decoder_dir), "--tasks", "boolq_layerwise_chat", "--limit", "4",
                 "--output", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["n-samples"]["boolq_layerwise_chat"]["effective"] == 4
    assert results["layerwise"]["lm_eval_command"].endswith("--apply_chat_template")
    assert "chat template" in capsys.readouterr().out


def test_the_printed_command_reproduces_the_results(run_dir, tmp_path):
    """The harness's own CLI, run as printed, gives the same accuracy (about 20 s: it indexes all its tasks first)."""
    assert main(["eval", str(run_dir), "--limit", "6", "--output", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    command = shlex.split(results["layerwise"]["lm_eval_command"])
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    acc = f'{results["results"]["boolq_layerwise"]["acc,none"]:.4f}'
    assert any(line.startswith("|boolq_layerwise") and acc in line for line in proc.stdout.splitlines()), proc.stdout


@pytest.mark.parametrize("argv, message", [
    (["eval", "{tmp}/missing"], "run folder '{tmp}/missing' does not exist"),
    (["eval", "{tmp}"], "holds no trained model"),
    (["eval", "--model", "{decoder}"], "--model SPEC with --output DIR"),
    (["eval", "--model", "{bert}", "--output", "{tmp}/out"], "is not a causal language model"),
    (["eval", "--model", "{decoder}", "--output", "{tmp}/out", "--tasks", "no_such_task"],
     "no_such_task is not a local task"),
    (["eval", "--model", "{decoder}", "--output", "{tmp}/out", "--limit", "0"], "--limit 0: use a positive count"),
    (["eval", "--model", "{plain}", "--output", "{tmp}/out", "--tasks", "boolq_layerwise_chat"],
     "has no chat template"),
])
def test_bad_input_is_one_line(argv, message, tmp_path, decoder_dir, tiny_llama_dir, tiny_bert_dir, capsys):
    fill = {"tmp": tmp_path, "decoder": decoder_dir, "plain": tiny_llama_dir, "bert": tiny_bert_dir}
    assert main([a.format(**fill) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.format(**fill) in err, err


def test_missing_harness_names_the_extra(monkeypatch, decoder_dir, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    assert main(["eval", "--model", str(decoder_dir), "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'layerwise[eval]'" in err


@pytest.mark.slow
def test_lift_on_boolq_chat_beats_the_base_model_on_the_harness(tmp_path):
    """SmolLM2-135M-Instruct fine-tuned with LIFT on packaged boolq_chat (16 steps of 8 chats) against the base model,
    both scored by the harness on the first 400 held-out rows through the chat template. Measured (docs/eval.md):
    0.515 -> 0.635 in bfloat16, 3.5 binomial standard errors; 0.5225 -> 0.6325 in float32, 3.2. The test asks for
    2.5, room for other CPUs' rounding. About 3 minutes on 2 CPU cores with bf16 units (float32 without: longer)."""
    start = time.perf_counter()
    run = tmp_path / "run"
    assert main(["train", "--model", "smollm2", "--data", "boolq_chat", "--method", "lift", "--max-steps", "16",
                 "--output", str(run), "--set", "method.switch_every=8", "--set", "train.lr=3e-4",
                 "--set", "train.warmup_steps=2", "--set", "train.batch_size=8", "--set", "data.max_length=192",
                 "--set", "data.max_train_samples=128", "--set", "data.max_eval_samples=8",
                 "--set", "train.eval_before=false", "--set", "train.sample_generations=0",
                 "--set", "train.progress=false"]) == 0
    n = 400
    scoring = ["--limit", str(n), *(["--dtype", "bfloat16"] if cpu_has_bf16() else [])]
    assert main(["eval", str(run), *scoring]) == 0
    assert main(["eval", str(run), "--model", "smollm2", *scoring]) == 0
    tuned, base = (json.loads((run / folder / "results.json").read_text())["results"]["boolq_layerwise_chat"]
                   ["acc,none"] for folder in ("eval", "eval-smollm2"))
    stderr = math.sqrt(base * (1 - base) / n + tuned * (1 - tuned) / n)
    print(f"base {base:.3f}, LIFT {tuned:.3f}: +{(tuned - base) / stderr:.1f} standard errors, "
          f"{time.perf_counter() - start:.0f} s")
    assert tuned - base > 2.5 * stderr
