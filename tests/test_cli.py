"""End to end through the CLI on tiny local models: run folder contents, bad input, bench."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import tiny_llama
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from layerwise.cli import main
from layerwise.errors import ConfigError
from layerwise.preflight import CPU_BF16_ENV, cpu_has_bf16


def train(*args) -> int:
    return main(["train", *args])


def common(model_dir, data, out, steps=4):
    return [
        "--model", model_dir, "--data", data, "--max-steps", str(steps), "--output", str(out),
        "--set", "train.batch_size=4", "--set", "train.progress=false", "--set", "train.log_every=2",
        "--set", "data.max_length=32", "--set", "train.eval_batch_size=16", "--set", "train.warmup_steps=0",
    ]


def test_train_writes_run_folder(tiny_bert_dir, cls_jsonl, tmp_path):
    out = tmp_path / "run"
    assert train(*common(tiny_bert_dir, cls_jsonl, out), "--method", "lift", "--set", "method.switch_every=1") == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert {"loss", "lr", "active_blocks", "tokens_per_s", "bytes"} <= set(rows[0])
    assert {"weights", "grads", "optimizer", "activations"} <= set(rows[0]["bytes"])
    summary = json.loads((out / "summary.json").read_text())
    for key in ("method", "model", "steps", "tokens_per_s", "samples_per_s", "peak_memory_bytes", "memory", "eval"):
        assert key in summary
    assert summary["steps"] == 4 and summary["method"] == "lift"
    assert summary["memory"]["activations"] > 0 and summary["peak_memory_bytes"] > 0
    assert 0.0 <= summary["eval"]["accuracy"] <= 1.0
    assert (out / "config.yaml").exists()
    # The model card: Hugging Face metadata and what the run measured.
    card = ModelCard.load(out / "model" / "README.md")
    assert card.data.library_name == "transformers" and {"layerwise", "lift", "classification"} <= set(card.data.tags)
    assert card.data.base_model is None  # a local folder has no hub id
    assert f"tokens/s: {summary['tokens_per_s']:.1f}" in card.text and f"{summary['memory']['measured_peak'] / 2**20:.1f} MiB" in card.text
    assert f"held-out accuracy: {summary['eval']['accuracy']:.4f}" in card.text and "switch_every: 1" in card.text
    # The saved model is safetensors and loads with from_pretrained; LIFT changed blocks 0..3 only.
    assert (out / "model" / "model.safetensors").exists()
    trained = AutoModelForSequenceClassification.from_pretrained(out / "model")
    original = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    emb = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(trained.state_dict()[emb], original.state_dict()[emb])
    for i in range(4):
        key = f"bert.encoder.layer.{i}.attention.self.query.weight"
        assert not torch.equal(trained.state_dict()[key], original.state_dict()[key])


@pytest.mark.parametrize("units", ["0", "1"])
def test_bf16_on_a_cpu_without_bf16_units_warns_with_the_measured_slowdown(tiny_llama_dir, lm_jsonl, tmp_path, capsys,
                                                                            monkeypatch, units):
    monkeypatch.setenv(CPU_BF16_ENV, units)
    out = tmp_path / "run"
    assert train(*common(tiny_llama_dir, lm_jsonl, out, steps=2), "--method", "lift", "--set", "train.bf16=true",
                 "--set", "train.frozen_dtype=bf16", "--set", "train.save_model=false") == 0
    warned = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: ")]
    if units == "1":
        assert warned == []
    else:
        # One line: both settings, the measured slowdown and the fix; the run still trains.
        assert len(warned) == 1 and "train.bf16=true and train.frozen_dtype=bf16" in warned[0], warned
        assert re.search(r"runs \d+x slower than float32 here", warned[0]) and "train.bf16=false" in warned[0]
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


def test_cpu_bf16_detection_follows_onednn_and_the_override(monkeypatch):
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    assert cpu_has_bf16() == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    for value, expected in (("0", False), ("1", True)):
        monkeypatch.setenv(CPU_BF16_ENV, value)
        assert cpu_has_bf16() is expected
    monkeypatch.setenv(CPU_BF16_ENV, "yes")
    with pytest.raises(ConfigError, match="use 1 .* or 0"):
        cpu_has_bf16()
    # Without bf16 units oneDNN answers no, however modern the CPU (ONEDNN_MAX_CPU_ISA caps what it may use).
    code = "import torch; print(torch.ops.mkldnn._is_mkldnn_bf16_supported())"
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip() == "False"


def test_a_tied_head_is_said_and_trains_only_the_final_norm(tokenizer, lm_jsonl, tmp_path, capsys):
    model_dir = tmp_path / "tied"
    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "run"
    assert train(*common(str(model_dir), lm_jsonl, out, steps=2), "--method", "freeze", "--set", "method.top=1",
                 "--set", "train.save_model=false") == 0
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("head: ")]
    # Llama's final norm: one weight of hidden size 32; the tied projection is not in the head group.
    assert said == ["head: the output projection is tied to the input embeddings, so a plan's head trains the final norm "
                    "only (32 parameters); the projection trains when the embeddings do"]
    assert json.loads((out / "summary.json").read_text())["trainable_parameters_max"] == (
        sum(p.numel() for p in model.model.layers[3].parameters()) + 32)


def test_tensorboard_holds_the_config_and_every_logged_step(tiny_bert_dir, cls_jsonl, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert train(*common(tiny_bert_dir, cls_jsonl, out), "--set", "train.report_to=[tensorboard]", "--set", "train.save_model=false") == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "tensorboard" / "run"))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    # Every metrics.jsonl row, as the trackers saw it; the held-out result at the last step.
    assert scalars["train/loss"] == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in rows]
    assert [s for s, _ in scalars["train/lr"]] == [2, 4] and [s for s, _ in scalars["train/tokens_per_s"]] == [2, 4]
    # Measured growth can be 0 here: this process already holds freed memory from earlier tests (bench runs fresh ones).
    assert all(v > 0 for _, v in scalars["memory/activations_bytes"]) and len(scalars["memory/measured_peak_bytes"]) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert scalars["eval/accuracy"] == [(4, pytest.approx(summary["eval"]["accuracy"], rel=1e-6))]
    hparams = next((out / "tensorboard" / "run").rglob("hparams.yml")).read_text()
    assert "train.batch_size: 4" in hparams and "method.name: lift" in hparams
    assert train(*common(tiny_bert_dir, cls_jsonl, tmp_path / "b"), "--set", "train.report_to=[neptune]") == 2
    assert "'neptune' is not a tracker" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_a_tracker_that_cannot_start_leaves_no_run_folder(tiny_bert_dir, cls_jsonl, tmp_path, capsys, monkeypatch):
    import layerwise.tracking

    def refuse(name, *args):
        raise PermissionError("not logged in")

    monkeypatch.setattr(layerwise.tracking, "_start", refuse)
    out = tmp_path / "run"
    assert train(*common(tiny_bert_dir, cls_jsonl, out), "--set", "train.report_to=[tensorboard]") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tensorboard could not start (PermissionError: not logged in)" in err[0], err
    assert not out.exists()


def test_causal_lm_lora_saves_merged_model(tiny_llama_dir, lm_jsonl, tmp_path):
    out = tmp_path / "run"
    assert train(*common(tiny_llama_dir, lm_jsonl, out), "--method", "lora", "--set", "method.target_modules=[q_proj,v_proj]") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "causal_lm" and summary["eval"]["perplexity"] > 1
    assert (out / "adapter").is_dir()
    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    assert not any("lora" in k for k in merged.state_dict())
    assert load_file(out / "model" / "model.safetensors")


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--set", "train.colour=red"], "unknown config key 'train.colour'"),
        (["--method", "dance"], "unknown method 'dance'"),
        (["--method", "freeze", "--set", "method.layers=[12]"], "block 12 does not exist"),
        (["--set", "data.text_column=review"], "review"),
        (["--set", "data.labels=[neg]"], "label"),
    ],
)
def test_bad_input_exits_with_one_line_and_no_run_folder(tiny_bert_dir, cls_jsonl, tmp_path, capsys, extra, needle):
    out = tmp_path / "run"
    assert train(*common(tiny_bert_dir, cls_jsonl, out), *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("layerwise: error:") and needle in err[0], err
    assert not out.exists()


def test_empty_data_and_offline_model(tiny_bert_dir, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert train(*common(tiny_bert_dir, str(empty), tmp_path / "a")) == 2
    assert "empty" in capsys.readouterr().err
    assert train("--model", "some-org/not-here", "--output", str(tmp_path / "b")) == 2
    assert "offline" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_existing_output_is_not_overwritten(tiny_bert_dir, cls_jsonl, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert train(*common(tiny_bert_dir, cls_jsonl, out)) == 2
    assert (out / "keep.txt").read_text() == "precious"


def test_bench_writes_results_with_measured_ratios(tiny_bert_dir, cls_jsonl, tmp_path):
    out = tmp_path / "bench"
    cmd = [
        sys.executable, "-m", "layerwise", "bench", "--methods", "full,lift,freeze", "--model", tiny_bert_dir,
        "--data", cls_jsonl, "--steps", "4", "--batch-size", "4", "--seq-len", "16", "--output", str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    data = json.loads((out / "results.json").read_text())
    results = {r["method"]: r for r in data["results"]}
    assert set(results) == {"full", "lift", "freeze"}
    full = results["full"]
    for r in results.values():
        assert r["tokens_per_s_ratio"] == pytest.approx(r["tokens_per_s"] / full["tokens_per_s"])
        assert r["memory_ratio"] == pytest.approx(r["memory"]["total"] / full["memory"]["total"])
        assert r["predicted"]["predicted_speedup"] > 0
    assert results["full"]["predicted"]["predicted_speedup"] == pytest.approx(1.0)
    assert results["lift"]["memory"]["total"] < full["memory"]["total"]
    for r in results.values():
        # Measured: the process's peak above the loaded model, per repeat; the headline saving is their ratio.
        assert r["measured_peak"] == r["measured_peak_runs"][0] == r["memory"]["measured_peak"] > 0
        assert 0 < r["memory"]["measured_baseline"] < r["peak_memory_bytes"]
        assert r["measured_memory_saving_x"] == pytest.approx(full["measured_peak"] / r["measured_peak"])
        accounted = r["memory"]["total"] - r["memory"]["weights"]
        assert r["accounted_over_measured"] == pytest.approx(accounted / r["measured_peak"])
        assert r["frozen_dropout"] is False
    # The report says what differs between the sides: frozen blocks skip dropout, full keeps it.
    assert "eval mode" in data["meta"]["dropout_regime"] and data["meta"]["dropout_regime"] in (out / "results.md").read_text()
    assert (out / "results.md").read_text().count("|") > 20
    assert (out / "chart.png").stat().st_size > 1000
    # Timed runs keep no resume checkpoint (a full model's weights and optimizer state each).
    assert not any((out / "runs").glob("*/checkpoints"))

    # bench-report rebuilds the same rows from the runs, and counts a repeat run by hand beside them.
    assert main(["measure", "bench-report", str(out)]) == 0
    again = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in again["results"]] == ["full", "lift", "freeze"]  # the bench's order, and its command named
    assert again["meta"]["bench_command"].startswith("layerwise bench") and again["meta"]["rebuilt_from_runs"]
    rebuilt = {r["method"]: r for r in again["results"]}
    for name, r in results.items():
        for key in ("tokens_per_s", "measured_peak", "tokens_per_s_ratio", "measured_memory_saving_x", "predicted"):
            assert rebuilt[name][key] == r[key], (name, key)
    summary = json.loads((out / "runs" / "lift-0" / "summary.json").read_text())
    (out / "runs" / "lift-1").mkdir()
    (out / "runs" / "lift-1" / "summary.json").write_text(json.dumps({**summary, "tokens_per_s": 3 * summary["tokens_per_s"]}))
    assert main(["measure", "bench-report", str(out), "--methods", "full,lift"]) == 0
    data = json.loads((out / "results.json").read_text())
    lift = data["results"][1]
    assert [r["method"] for r in data["results"]] == ["full", "lift"] and data["meta"]["runs_per_method"] == {"full": 1, "lift": 2}
    assert lift["tokens_per_s"] == pytest.approx(2 * summary["tokens_per_s"])
    assert lift["tokens_per_s_ratio"] == pytest.approx(2 * summary["tokens_per_s"] / full["tokens_per_s"])


def test_bench_refuses_a_lift_schedule_it_would_time_in_part(tiny_bert_dir, cls_jsonl, tmp_path, capsys):
    out = tmp_path / "bench"
    base = ["bench", "--model", tiny_bert_dir, "--data", cls_jsonl, "--batch-size", "4", "--seq-len", "16", "--output", str(out)]
    # tiny_bert has 4 blocks: 3 steps cannot train each once; with switch_every=2 a pass takes 8 steps.
    for extra, need in ((["--steps", "3"], 4), (["--steps", "6", "--set", "methods.lift.switch_every=2"], 8)):
        assert main([*base, "--methods", "full,lift", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"takes {need} steps" in err[0] and f"--steps {need} or more" in err[0], err
        assert not out.exists()


def test_bench_entry_can_carry_its_own_train_settings():
    from layerwise.config import resolve
    from layerwise.errors import ConfigError
    from layerwise.measure.bench import method_raw

    base = {"model": "minilm", "train": {"lr": 3e-4, "max_steps": 10}}
    raw = method_raw(base, "lora", 10, 6, {"train": {"lr": 1e-3}})
    assert raw["train"] == {"lr": 1e-3, "max_steps": 10}
    assert base["train"]["lr"] == 3e-4  # the shared config is not touched
    assert resolve(raw)[0].train.lr == 1e-3
    assert method_raw(base, "full", 10, 6)["train"]["lr"] == 3e-4
    with pytest.raises(ConfigError, match="methods.<label>.train"):
        method_raw(base, "lora", 10, 6, {"train": 5})
    with pytest.raises(ConfigError):
        resolve(method_raw(base, "lora", 10, 6, {"train": {"lrr": 1e-3}}))


def test_compared_entries_get_stated_defaults_beside_what_was_given():
    from layerwise.measure.bench import method_raw

    # freeze has no default set of blocks: the top quarter is stated, unless the entry names its own.
    assert method_raw({}, "freeze", 10, 8, {"name": "freeze"})["method"] == {"name": "freeze", "top": 2}
    assert method_raw({}, "freeze", 10, 8)["method"] == {"name": "freeze", "top": 2}
    assert method_raw({}, "freeze", 10, 8, {"layers": [0, 5]})["method"] == {"name": "freeze", "layers": [0, 5]}
    # lift: one whole pass over the blocks within the steps; a given schedule is kept.
    assert method_raw({}, "lift", 12, 6)["method"] == {"name": "lift", "switch_every": 2}
    assert method_raw({}, "lift", 12, 6, {"switch_every": 5})["method"] == {"name": "lift", "switch_every": 5}
    # salf probes the training data the bench has: no budget stated.
    assert method_raw({}, "salf", 12, 6)["method"] == {"name": "salf"}


def test_a_bad_plugin_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("LAYERWISE_PLUGINS", "no_such_layerwise_plugin")
    assert main(["train", "--help"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "LAYERWISE_PLUGINS: cannot import 'no_such_layerwise_plugin'" in err[0], err


def test_resume_accepts_a_run_folder_written_with_the_old_data_task_key(tiny_bert_dir, cls_jsonl, tmp_path):
    out = tmp_path / "run"
    assert train(*common(tiny_bert_dir, cls_jsonl, out), "--stop-at", "2") == 0
    config = out / "config.yaml"
    config.write_text(config.read_text().replace("data:\n", "data:\n  task: null\n", 1))
    assert "task: null" in config.read_text()
    assert main(["train", "--resume", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


def test_measure_meft_prints_the_report_asked_for(tiny_bert_dir, capsys):
    assert main(["measure", "meft", "errors", tiny_bert_dir, "--batch", "1", "--length", "8", "--variants", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["fp32 MEFT1", "bf16 MEFT1"], lines


def test_bench_repeats_build_their_own_prefix_cache(tiny_bert_dir, cls_jsonl, tmp_path):
    """A cached entry's every repeat builds its cache (timed) in a folder of its own, removed afterwards."""
    out = tmp_path / "bench"
    cmd = [
        sys.executable, "-m", "layerwise", "bench", "--methods", "freeze,cached", "--model", tiny_bert_dir,
        "--data", cls_jsonl, "--steps", "3", "--batch-size", "4", "--seq-len", "16", "--repeats", "2", "--eval", "0",
        "--set", "methods.cached.name=freeze", "--set", "methods.cached.top=1", "--set", "methods.freeze.top=1",
        "--set", "methods.cached.train.prefix_cache=on", "--output", str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "LAYERWISE_CACHE": str(tmp_path / "shared")})
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    for rep in range(2):
        cache = json.loads((out / "runs" / f"cached-{rep}" / "summary.json").read_text())["prefix_cache"]
        assert cache["used"] and cache["built"] and cache["build_seconds"] > 0
        assert cache["path"].startswith(str(out / "runs" / f"cached-{rep}-prefix-cache"))
        assert not (out / "runs" / f"cached-{rep}-prefix-cache").exists()
        assert "prefix_cache" not in json.loads((out / "runs" / f"freeze-{rep}" / "summary.json").read_text())
    assert not (tmp_path / "shared").exists()


def test_salf_probe_peak_counts_in_the_runs_measured_peak(tiny_bert_dir, cls_jsonl, tmp_path, monkeypatch):
    """SALF's probe runs before the first step, outside the training window: it is measured in a window of its own, and
    the run's measured peak is the larger of the two."""
    from layerwise.methods.salf import method as salf_method

    class ProbeWindow:  # stands in for PeakMemory around the probe, with a peak no training step reaches
        def __init__(self, device):
            self.opened = False

        def reset(self):
            self.opened = True

        def peak_above_baseline(self):
            assert self.opened
            return 1 << 40

    monkeypatch.setattr(salf_method, "PeakMemory", ProbeWindow)
    out = tmp_path / "run"
    assert train(*common(tiny_bert_dir, cls_jsonl, out), "--method", "salf", "--set", "method.samples=16") == 0
    memory = json.loads((out / "summary.json").read_text())["memory"]
    assert memory["setup_measured_peak"] == memory["measured_peak"] == 1 << 40
