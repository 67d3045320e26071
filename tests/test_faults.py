"""Numerical faults (NaN/inf loss or gradient), resource guards and security: through the CLI on tiny local models."""

from __future__ import annotations

import json

import pytest
import torch

from layerwise.cli import main


def args(model_dir, data, out, steps=4, *extra):
    return [
        "train", "--model", model_dir, "--data", data, "--max-steps", str(steps), "--output", str(out), "--method", "full",
        "--set", "train.batch_size=4", "--set", "train.progress=false", "--set", "train.log_every=1",
        "--set", "data.max_length=16", "--set", "train.eval_batch_size=16", "--set", "train.warmup_steps=0",
        "--set", "data.max_eval_samples=8", "--set", "train.eval_before=false", *extra,
    ]


@pytest.fixture
def nan_at_step(monkeypatch):
    """Put NaN into the output of block ``block`` on the forward of optimizer steps in ``steps`` (1-based)."""
    from layerwise.run import Run

    def install(block: int, steps: set[int], value: float = float("nan"), mode: str = "output"):
        original = Run.execute

        def execute(self):
            calls = {"n": 0}

            def hook(module, inputs, output):
                if not module.training:
                    return output
                calls["n"] += 1
                if calls["n"] in steps:
                    hidden = output[0] if isinstance(output, tuple) else output
                    hidden = hidden.clone()
                    hidden[0, 0, 0] = value
                    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
                return output

            def grad_hook(grad):
                calls["n"] += 1
                return grad * value if calls["n"] in steps else grad

            if mode == "output":
                self.method.anatomy.blocks[block].register_forward_hook(hook)
            else:  # only this block's gradient: the loss stays finite
                next(self.method.anatomy.blocks[block].parameters()).register_hook(grad_hook)
            return original(self)

        monkeypatch.setattr(Run, "execute", execute)

    return install


def test_nan_stops_with_one_line_naming_step_and_blocks(tiny_bert_dir, cls_jsonl, tmp_path, capsys, nan_at_step):
    nan_at_step(block=2, steps={2})
    out = tmp_path / "run"
    assert main(args(tiny_bert_dir, cls_jsonl, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("layerwise: error:"), err
    assert "loss is nan at step 2" in err[0] and "on_nonfinite=skip" in err[0], err
    assert not (out / "summary.json").exists() and not (out / "model").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]


def test_nan_gradient_names_its_block(tiny_bert_dir, cls_jsonl, tmp_path, capsys, nan_at_step):
    nan_at_step(block=2, steps={3}, mode="grad")
    out = tmp_path / "run"
    assert main(args(tiny_bert_dir, cls_jsonl, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gradient norm is nan at step 3" in err[0], err
    assert "non-finite gradients in: block 2)" in err[0], err
    assert not (out / "summary.json").exists() and not (out / "model").exists()


def test_inf_gradient_skipped_and_counted(tiny_bert_dir, cls_jsonl, tmp_path, capsys, nan_at_step):
    nan_at_step(block=1, steps={2, 3}, value=float("inf"))
    out = tmp_path / "run"
    assert main(args(tiny_bert_dir, cls_jsonl, out, 5, "--set", "train.on_nonfinite=skip")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_steps"] == 2 and summary["steps"] == 5
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] is None for r in rows] == [False, True, True, False, False]
    assert rows[-1]["skipped_steps"] == 2


def test_skip_gives_up_after_max_skipped_steps_in_a_row(tiny_bert_dir, cls_jsonl, tmp_path, capsys, nan_at_step):
    nan_at_step(block=0, steps={2, 3, 4, 5})
    out = tmp_path / "run"
    code = main(args(tiny_bert_dir, cls_jsonl, out, 6, "--set", "train.on_nonfinite=skip", "--set", "train.max_skipped_steps=3"))
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "3 steps in a row skipped" in err[0] and "at step 4" in err[0], err
    assert not (out / "summary.json").exists()


def test_skipped_step_leaves_weights_untouched():
    from conftest import batch_for, repeat, tiny_bert

    from layerwise.anatomy import find_anatomy
    from layerwise.config import TrainConfig
    from layerwise.engine import Trainer
    from layerwise.methods import create_method, method_config

    model = tiny_bert()
    method = create_method(method_config({"name": "full"}), find_anatomy(model), task="classification")
    batch = batch_for(model)
    trainer = Trainer(model, method, TrainConfig(max_steps=3, warmup_steps=0, on_nonfinite="skip", device="cpu"), repeat(batch))
    trainer.train_step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    handle = model.bert.encoder.layer[3].register_forward_hook(lambda m, i, o: (o[0] * float("nan"), *o[1:]) if isinstance(o, tuple) else o * float("nan"))
    rec = trainer.train_step()
    handle.remove()
    assert rec.skipped and trainer.skipped_steps == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    assert not trainer.train_step().skipped and trainer.consecutive_skips == 0
