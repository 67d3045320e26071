"""LayerwiseCallback inside transformers.Trainer against `layerwise train`: the same method, model, data shape and
settings, seconds per optimizer step after the first (docs/hf-trainer.md).

Both sides: the packaged MiniLM on Rotten Tomatoes, batch 16 x 64 tokens (padded to 64, so every step carries the same
1,024 token slots), fp32, fused AdamW at the method's default lr, gradient clipping at 1.0, dropout on in every block
(`train.frozen_dropout=true`: the Trainer keeps the whole model in train mode), no evaluation, no saving, one process
with torch's default threads. What differs: the loop (the Trainer's, with the callback, vs layerwise's engine) and the
order of the rows (each side's own seeded shuffle). Clock: the engine times each step (the batch fetch included); the
Trainer side is the time between the ends of consecutive optimizer steps (its loop, data and logging included). The
first step of each run is left out on both sides. Methods are interleaved within each repeat.

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python docs/bench/hf-trainer/measure.py [REPEATS [METHODS]]
writes docs/bench/hf-trainer/results.json (METHODS, comma-separated: only those entries are measured again).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

from layerwise.cli import main as layerwise_main
from layerwise.data.sources import rotten_tomatoes
from layerwise.integrations.hf import LayerwiseCallback
from layerwise.methods import METHODS, default_lr, method_config
from layerwise.models import resolve_model_path

STEPS, BATCH, LENGTH = 30, 16, 64
METHOD_NAMES = ["full", "lift", "lisa", "freeze", "salf", "lora", "ist", "meft"]
OPTIONS = {"freeze": {"top": 1}}  # as the benchmarks run it (the only method without a default set)
HERE = Path(__file__).resolve().parent


class StepClock(TrainerCallback):
    def __init__(self):
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def trainer_seconds_per_step(method: str, path: str, rows, out: Path, options: dict) -> float:
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    args = TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=default_lr(method_config({"name": method, **OPTIONS.get(method, {})})),
        weight_decay=0.0, max_grad_norm=1.0, warmup_steps=0, report_to=[], save_strategy="no", logging_strategy="no",
        use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    cb, clock = LayerwiseCallback(model, method, args=args, **options), StepClock()
    Trainer(model=cb.model, args=args, train_dataset=rows, optimizers=(cb.optimizer, None), callbacks=[cb, clock]).train()
    return (clock.ends[-1] - clock.ends[0]) / (len(clock.ends) - 1)


def engine_seconds_per_step(method: str, out: Path) -> tuple[float, dict]:
    code = layerwise_main([
        "train", "--model", "minilm", "--data", "rotten_tomatoes", "--method", method, "--max-steps", str(STEPS), "--output", str(out),
        "--set", f"train.batch_size={BATCH}", "--set", f"data.max_length={LENGTH}", "--set", "data.padding=max_length",
        "--set", "train.frozen_dropout=true", "--set", "train.eval_before=false", "--set", "train.eval_after=false",
        "--set", "train.save_model=false", "--set", "train.progress=false", "--set", "train.warmup_steps=0",
        "--set", "train.weight_decay=0.0", *[a for k, v in OPTIONS.get(method, {}).items() for a in ("--set", f"method.{k}={v}")],
    ])
    assert code == 0, code
    summary = json.loads((out / "summary.json").read_text())
    return 1.0 / summary["samples_per_s"] * BATCH, summary  # samples/s leaves the first step out


def main(repeats: int, methods: list[str]) -> None:
    path = resolve_model_path("minilm")
    tok = AutoTokenizer.from_pretrained(path)
    columns, _ = rotten_tomatoes()
    enc = tok(columns["text"][: STEPS * BATCH * 2], truncation=True, max_length=LENGTH, padding="max_length")
    rows = [{"input_ids": torch.tensor(i), "attention_mask": torch.tensor(m), "labels": torch.tensor(y)}
            for i, m, y in zip(enc["input_ids"], enc["attention_mask"], columns["label"])]
    runs: dict[str, dict[str, list[float]]] = {m: {"trainer": [], "engine": []} for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for i, method in enumerate(methods):
                sides = ["trainer", "engine"] if (r + i) % 2 == 0 else ["engine", "trainer"]  # alternate which goes first
                if method == "salf":
                    # The cut depends on the probed rows, which differ between the sides: the Trainer side trains the
                    # engine run's cut (its probe.json), so the two differ in the loop only.
                    sides = ["engine", "trainer"]
                options = dict(OPTIONS.get(method, {}))
                for side in sides:
                    out = Path(tmp) / f"{method}-{side}-{r}"
                    if side == "trainer":
                        s = trainer_seconds_per_step(method, path, rows, out, options)
                    else:
                        s, summary = engine_seconds_per_step(method, out)
                        if method == "salf":
                            options["probe"] = summary["salf"]["probe"]["json"]
                    runs[method][side].append(s)
                    print(f"repeat {r + 1}/{repeats} {method:6s} {side:7s} {s * 1000:7.1f} ms/step", flush=True)
    file = HERE / "results.json"
    results = json.loads(file.read_text()) if methods != METHOD_NAMES and file.is_file() else {"methods": {}}
    results.update({
        "shape": {"model": "minilm", "data": "rotten_tomatoes", "batch": BATCH, "length": LENGTH, "steps": STEPS, "repeats": repeats},
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "salf": "the Trainer side trains the cut of the engine run before it (method option probe=its probe.json)",
    })
    for method, sides in runs.items():
        t, e = statistics.median(sides["trainer"]), statistics.median(sides["engine"])
        results["methods"][method] = {
            "trainer_seconds_per_step": sides["trainer"], "engine_seconds_per_step": sides["engine"],
            "trainer_tokens_per_s": BATCH * LENGTH / t, "engine_tokens_per_s": BATCH * LENGTH / e,
            "trainer_over_engine_tokens_per_s": e / t,
            "ratio_spread": [min(sides["engine"]) / max(sides["trainer"]), max(sides["engine"]) / min(sides["trainer"])],
        }
    file.write_text(json.dumps(results, indent=2) + "\n")
    for method, m in results["methods"].items():
        print(f"{method:6s} trainer {m['trainer_tokens_per_s']:7.0f} tok/s  engine {m['engine_tokens_per_s']:7.0f} tok/s  "
              f"ratio {m['trainer_over_engine_tokens_per_s']:.3f}")


if __name__ == "__main__":
    assert set(METHOD_NAMES) == set(METHODS), sorted(METHODS)
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3, sys.argv[2].split(",") if len(sys.argv) > 2 else METHOD_NAMES)
