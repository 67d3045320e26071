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
    from layerwise.engine import Trainer
    from layerwise.engine.settings import TrainConfig
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


# ---------------------------------------------------------------------------------------------
# Memory and disk guards


def test_memory_guard_refuses_with_estimate_and_what_fits(tiny_bert_dir, cls_jsonl, tmp_path, capsys, monkeypatch):
    import layerwise.preflight as guards

    calls = []

    def tight(device):
        calls.append(device)
        return 40 * 2**20, "available RAM (MemAvailable)"  # room for the optimizer state and a few examples, not 64

    monkeypatch.setattr(guards, "available_memory", tight)
    out = tmp_path / "run"
    assert main(args(tiny_bert_dir, cls_jsonl, out, 2, "--set", "train.batch_size=64", "--set", "data.max_length=128")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("layerwise: error: the run needs about"), err
    assert "available RAM (MemAvailable) is 40.0 MiB" in err[0] and "train.batch_size=" in err[0] and "would fit" in err[0], err
    assert calls and not out.exists()
    # Turned off, the same run trains.
    assert main(args(tiny_bert_dir, cls_jsonl, out, 1, "--set", "train.memory_check=false", "--set", "train.save_model=false")) == 0


def test_memory_guard_when_not_even_batch_one_fits(tiny_bert_dir, cls_jsonl, tmp_path, capsys, monkeypatch):
    import layerwise.preflight as guards

    monkeypatch.setattr(guards, "available_memory", lambda device: (1000, "free memory on cuda:0"))
    assert main(args(tiny_bert_dir, cls_jsonl, tmp_path / "run", 2)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "even batch size 1 does not fit" in err[0] and "lora" in err[0], err


def test_estimate_tracks_the_trainable_set(tiny_bert_dir, cls_jsonl):
    from conftest import tiny_bert

    from layerwise.anatomy import find_anatomy
    from layerwise.config import resolve
    from layerwise.preflight import estimate

    sizes = {}
    for method in ({"name": "full"}, {"name": "lift"}, {"name": "freeze", "top": 1}):
        cfg, mcfg = resolve({"method": method, "train": {"max_steps": 40, "batch_size": 2}})
        model = tiny_bert()
        from layerwise.methods import create_method

        m = create_method(mcfg, find_anatomy(model), task="classification", max_steps=40)
        before = torch.get_rng_state()
        est = estimate(model, m, cfg, "classification")
        assert torch.equal(before, torch.get_rng_state())  # sampling the plans draws no random numbers
        sizes[method["name"]] = est
    full = sizes["full"]
    assert full.trainable_max == sum(p.numel() for p in tiny_bert().parameters())
    assert full.optimizer == 8 * full.trainable_max and full.grads == 4 * full.trainable_max
    # LIFT trains one block at a time (like freeze top=1) but touches every block over the run: bigger checkpoints.
    assert sizes["freeze"].trainable_max == sizes["lift"].trainable_max < full.trainable_max
    assert sizes["freeze"].checkpoint < sizes["lift"].checkpoint < full.checkpoint
    assert full.activations == 2 * full.activations_per_example > 0


def test_disk_guard_refuses_before_training(tiny_bert_dir, cls_jsonl, tmp_path, capsys, monkeypatch):
    import layerwise.preflight as guards

    seen = []

    def free(path):
        seen.append(path)
        return 1_000_000  # 1 MB: the tiny model alone is ~4 MB

    monkeypatch.setattr(guards, "free_disk", free)
    out = tmp_path / "run"
    assert main(args(tiny_bert_dir, cls_jsonl, out, 2)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "output disk" in err[0] and "final model" in err[0] and "checkpoint" in err[0], err
    assert not out.exists() and seen[0] == out


# ---------------------------------------------------------------------------------------------
# Security


class _Payload:
    """Unpickling this opens (creates) the marker file: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _malicious_model(src: str, folder, marker) -> None:
    import pickle
    import shutil

    folder.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (Path(src) / f).exists():
            shutil.copy(Path(src) / f, folder / f)
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"bert.embeddings.word_embeddings.weight": _Payload(marker)}))


from pathlib import Path  # noqa: E402


def test_malicious_pickle_checkpoint_is_refused(tiny_bert_dir, cls_jsonl, tmp_path, capsys, monkeypatch):
    import pickle

    marker = tmp_path / "pwned"
    folder = tmp_path / "evil-model"
    _malicious_model(tiny_bert_dir, folder, marker)
    # The payload is live: unpickling it does create the marker.
    probe = tmp_path / "probe-marker"
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.exists()

    out = tmp_path / "run"
    assert main(args(str(folder), cls_jsonl, out, 1)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pickle" in err[0] and "safetensors" in err[0], err
    assert not marker.exists() and not out.exists()

    # Without the folder check, loading still goes through safetensors only and never unpickles.
    import layerwise.models as models
    from layerwise.errors import ModelError

    monkeypatch.setattr(models, "refuse_pickle_weights", lambda path, spec=None: None)
    with pytest.raises(ModelError):
        models.load_model_and_tokenizer(str(folder), "classification")
    assert not marker.exists()


def test_no_unsafe_deserialisation_in_the_package():
    import re

    import layerwise

    root = Path(layerwise.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", text, re.M), path
        for call in re.finditer(r"torch\.load\(", text):
            args_text = text[call.end(): call.end() + 300]
            assert "weights_only=True" in args_text.split(")")[0] + args_text, f"{path}: torch.load without weights_only=True"


def test_trust_remote_code_is_logged(tiny_bert_dir, capsys):
    from layerwise.models import load_model_and_tokenizer

    load_model_and_tokenizer(tiny_bert_dir, "classification")
    assert "trust_remote_code" not in capsys.readouterr().err
    load_model_and_tokenizer(tiny_bert_dir, "classification", trust_remote_code=True)
    err = capsys.readouterr().err
    assert f"trust_remote_code is ON for {tiny_bert_dir}: code from that folder will run" in err


def test_config_names_cannot_escape_the_folder(tmp_path):
    from layerwise.errors import ConfigError
    from layerwise.preflight import inside

    assert inside(tmp_path, "lift.yaml") == tmp_path.resolve() / "lift.yaml"
    for bad in ("../x.yaml", "/etc/passwd", "a/b", "..", "", "."):
        with pytest.raises(ConfigError):
            inside(tmp_path, bad)
