"""``layerwise measure quality-report``: bench runs put together per entry, with each run's lr and seed read from its
own resolved config."""

from __future__ import annotations

import json
import statistics

import pytest
import yaml

from layerwise.cli import main
from layerwise.errors import ConfigError
from layerwise.measure.quality import default_lrs, summarise


def bench_run(folder, label, seed, method, lr, accuracy, loss, tokens_per_s, peak):
    run = folder / "runs" / f"{label}-0"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"lr": lr, "seed": seed, "frozen_dropout": True}}))
    (run / "summary.json").write_text(json.dumps({
        "method": method, "eval": {"accuracy": accuracy, "loss": loss}, "tokens_per_s": tokens_per_s,
        "memory": {"measured_peak": peak}, "train_seconds": 10.0, "setup_seconds": 2.5 if method == "lift" else 0.0, "steps": 100}))


@pytest.fixture
def seeds(tmp_path):
    folders = []
    for seed, (acc_full, acc_lift) in enumerate([(0.80, 0.70), (0.82, 0.74), (0.78, 0.72)], start=1):
        folder = tmp_path / f"seed{seed}"
        bench_run(folder, "full", seed, "full", 1e-4, acc_full, 0.5, 100.0 + seed, 600 * 2**20)
        bench_run(folder, "lift", seed, "lift", 3e-4, acc_lift, 0.6, 300.0 + seed, 200 * 2**20)
        bench_run(folder, "lift_lr1e-3", seed, "lift", 1e-3, acc_lift + 0.05, 0.7, 300.0, 200 * 2**20)
        folders.append(str(folder))
    return folders


def test_entries_are_put_together_over_seeds_with_ratios_to_full(seeds):
    summary = summarise(seeds, ["accuracy", "loss"])
    by_label = {e["label"]: e for e in summary["entries"]}
    full, lift = by_label["full"], by_label["lift"]
    assert full["seeds"] == lift["seeds"] == [1, 2, 3] and (full["lr"], lift["lr"]) == (1e-4, 3e-4)
    accuracy = full["metrics"]["accuracy"]
    assert accuracy["mean"] == pytest.approx(0.80) and accuracy["std"] == pytest.approx(statistics.stdev([0.80, 0.82, 0.78]))
    assert full["metrics"]["loss"]["values"] == [0.5, 0.5, 0.5]
    assert lift["tokens_per_s_x_full"] == pytest.approx(302 / 102) and lift["memory_saving_x"] == pytest.approx(3.0)
    assert summary["best_per_method"] == {"full": "full", "lift": "lift_lr1e-3"}
    assert (full["seconds"], lift["seconds"], lift["train_seconds"]) == (10.0, 12.5, 10.0)
    # Loss: lower is better.
    assert summarise(seeds, ["loss"])["best_per_method"]["lift"] == "lift"


def test_the_command_writes_json_and_markdown(seeds, tmp_path, capsys):
    assert main(["measure", "quality-report", *seeds, "--metrics", "accuracy,loss", "--output", str(tmp_path / "out" / "quality")]) == 0
    table = capsys.readouterr().out
    assert "| lift_lr1e-3 **(best)** | lift | 0.001 | 3 (1, 2, 3) | 100 | 0.7700 ± 0.0200 | 0.7500, 0.7900, 0.7700 | 0.7000 ± 0.0000 |" in table
    assert json.loads((tmp_path / "out" / "quality.json").read_text())["metrics"] == ["accuracy", "loss"]
    assert (tmp_path / "out" / "quality.md").read_text() == table


def test_an_entry_at_two_learning_rates_or_without_the_metric_is_refused(seeds, tmp_path):
    bench_run(tmp_path / "other", "full", 4, "full", 3e-4, 0.8, 0.5, 100.0, 600 * 2**20)
    with pytest.raises(ConfigError, match="several learning rates"):
        summarise([*seeds, str(tmp_path / "other")], ["accuracy"])
    with pytest.raises(ConfigError, match="no held-out 'f1'"):
        summarise(seeds, ["accuracy", "f1"])
    with pytest.raises(ConfigError, match="no finished bench run"):
        summarise([str(tmp_path)], ["accuracy"])


def test_default_lrs_take_the_smallest_summed_relative_shortfall_over_the_screens(seeds, tmp_path):
    minilm = summarise(seeds, ["accuracy"])  # lift: 1e-3 (0.77) better than 3e-4 (0.72)
    decoder = tmp_path / "decoder"
    bench_run(decoder, "lift_lr3e-4", 0, "lift", 3e-4, 0.0, 0.40, 300.0, 200 * 2**20)
    bench_run(decoder, "lift_lr1e-3", 0, "lift", 1e-3, 0.0, 0.41, 300.0, 200 * 2**20)
    bench_run(decoder, "lift_lr3e-3", 0, "lift", 3e-3, 0.0, 0.35, 300.0, 200 * 2**20)
    decoder_screen = summarise([str(decoder)], ["loss"])  # lift: 3e-3 best (not tried on MiniLM), 3e-4 just ahead of 1e-3
    # Over the lrs both tried: 3e-4 -> 0.05/0.77 + 0, 1e-3 -> 0 + 0.01/0.40; the clear MiniLM gap wins.
    assert default_lrs([minilm, decoder_screen]) == {"full": 1e-4, "lift": 1e-3}
    assert default_lrs([decoder_screen])["lift"] == 3e-3
    # Equal shortfalls: the smaller lr.
    bench_run(tmp_path / "flat", "full_lr3e-4", 0, "full", 3e-4, 0.5, 0.4, 100.0, 600 * 2**20)
    bench_run(tmp_path / "flat", "full_lr1e-3", 0, "full", 1e-3, 0.5, 0.4, 100.0, 600 * 2**20)
    assert default_lrs([summarise([str(tmp_path / "flat")], ["accuracy"])])["full"] == 3e-4


def test_every_methods_default_lr_is_the_one_its_committed_screens_chose():
    from pathlib import Path

    from layerwise.methods import METHODS

    screens = [json.loads(p.read_text()) for p in sorted((Path(__file__).parents[1] / "docs" / "bench" / "quality").glob("*-screen.json"))]
    assert screens, "docs/bench/quality/*-screen.json: the committed learning-rate screens"
    assert default_lrs(screens) == {name: cls.Config.default_lr for name, cls in METHODS.items() if name in default_lrs(screens)}
    assert set(default_lrs(screens)) >= {"full", "lift", "lisa", "freeze", "salf", "lora", "ist", "meft"}
