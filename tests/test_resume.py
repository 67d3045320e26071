"""Exact resume, atomic checkpoints and graceful stop (issues 7 and 8).

Every test trains a tiny random model through ``layerwise.cli.main`` (in-process, or in a
subprocess for signals) and compares the final weights bitwise.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from layerwise.cli import main
from layerwise.engine.checkpoint import find_latest, verify

STEPS = 8

METHODS = {
    "lift": ["--method", "lift", "--set", "method.switch_every=2", "--set", "method.k=1"],
    "lisa": ["--method", "lisa", "--set", "method.switch_every=2", "--set", "method.k=2"],
    # dropout > 0 draws from the RNG every step; probes every 2 steps move the scores and the probe stream;
    # adapter_lr_scale puts the adapters in their own optimizer groups (lr and schedule restored from the checkpoint).
    "ist": ["--method", "ist", "--set", "method.probe_every=2", "--set", "method.importance_batch_size=4", "--set", "method.heatmap=false",
            "--set", "method.adapter_lr_scale=3"],
    "salf": ["--method", "salf", "--set", "method.samples=16"],
    # train.frozen_dtype=bf16: the checkpoint holds each frozen block's master (bf16 value, or the exact
    # float32 copy kept in memory or on disk) and a resume re-applies the saved plan's dtypes.
    **{f"lift-bf16-{m}": ["--method", "lift", "--set", "method.switch_every=3", "--set", "method.schedule=bottom_up",
                          "--set", "train.frozen_dtype=bf16", "--set", f"train.frozen_master={m}"]
       for m in ("rounded", "host", "disk")},
    "lift-int8-disk": ["--method", "lift", "--set", "method.switch_every=3", "--set", "method.schedule=bottom_up",
                       "--set", "train.frozen_dtype=int8", "--set", "train.frozen_master=disk"],
}


def args(model_dir, data, out, *extra, steps=STEPS):
    return [
        "train", "--model", model_dir, "--data", data, "--max-steps", str(steps), "--output", str(out),
        "--set", "train.batch_size=4", "--set", "train.progress=false", "--set", "train.log_every=3",
        "--set", "data.max_length=24", "--set", "train.eval_batch_size=32", "--set", "train.warmup_steps=2",
        "--set", "train.eval_before=false", "--set", "train.eval_after=false", *extra,
    ]


def final_state(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    ckpt = find_latest(run)
    assert ckpt is not None and ckpt.name == f"step-{STEPS:06d}"
    return {name: load_file(ckpt / f"{name}.safetensors") for name in ("model", "optimizer")}


def assert_same(a: dict, b: dict) -> None:
    for part in ("model", "optimizer"):
        assert a[part].keys() == b[part].keys(), part
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}: {k} differs"


def metrics_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def references(tiny_bert_dir, cls_jsonl, tmp_path_factory):
    """Uninterrupted runs, one per method (computed on first use)."""
    cache: dict[str, Path] = {}

    def get(method: str) -> Path:
        if method not in cache:
            out = tmp_path_factory.mktemp(f"ref-{method}") / "run"
            assert main(args(tiny_bert_dir, cls_jsonl, out, *METHODS[method])) == 0
            cache[method] = out
        return cache[method]

    return get


@pytest.mark.parametrize("method", list(METHODS))
def test_stop_and_resume_is_bitwise_exact(method, references, tiny_bert_dir, cls_jsonl, tmp_path):
    ref = references(method)
    out = tmp_path / "run"
    assert main(args(tiny_bert_dir, cls_jsonl, out, *METHODS[method], "--stop-at", str(STEPS // 2))) == 0
    assert not (out / "summary.json").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{STEPS // 2:06d}"]
    assert main(["train", "--resume", str(out)]) == 0
    assert_same(final_state(ref), final_state(out))
    # metrics.jsonl is appended, with the same rows as the uninterrupted run (the log window spans the stop).
    assert metrics_steps(out) == metrics_steps(ref) == [3, 6, 8]
    ref_rows = (ref / "metrics.jsonl").read_text().splitlines()
    out_rows = (out / "metrics.jsonl").read_text().splitlines()
    for a, b in zip(ref_rows, out_rows):
        a, b = json.loads(a), json.loads(b)
        assert a["loss"] == b["loss"] and a["active_blocks"] == b["active_blocks"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS
    assert summary["switches"] == json.loads((ref / "summary.json").read_text())["switches"]
    if method.startswith("lift"):
        # The saved model (from_pretrained folder) is the same too.
        a = load_file(ref / "model" / "model.safetensors")
        b = load_file(out / "model" / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_periodic_checkpoints_keep_last_and_corrupt_one_is_skipped(references, tiny_bert_dir, cls_jsonl, tmp_path, capsys):
    ref = references("lift")
    out = tmp_path / "run"
    extra = [*METHODS["lift"], "--set", "train.save_every=2", "--set", "train.keep_last=2"]
    assert main(args(tiny_bert_dir, cls_jsonl, out, *extra, "--stop-at", "6")) == 0
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-000004", "step-000006"]
    assert all(verify(out / "checkpoints" / n) is None for n in names)
    manifest = json.loads((out / "checkpoints" / "step-000006" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors", "trainer.json"}
    # Flip one byte of the newest checkpoint's weights: its checksum no longer matches.
    target = out / "checkpoints" / "step-000006" / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    # An interrupted save (no manifest) of a later step is ignored too.
    (out / "checkpoints" / "step-000007").mkdir()
    (out / "checkpoints" / "step-000007" / "model.safetensors").write_bytes(b"partial")
    capsys.readouterr()
    assert main(["train", "--resume", str(out)]) == 0
    logged = capsys.readouterr().out
    assert "skipping checkpoint step-000007: no manifest.json" in logged
    assert "skipping checkpoint step-000006: model.safetensors" in logged
    assert "resuming from" in logged and "step-000004" in logged
    assert_same(final_state(ref), final_state(out))
    assert metrics_steps(out) == [3, 6, 8]


def test_checkpoint_at_end_off_writes_none_after_the_last_step_but_a_stop_still_does(tiny_bert_dir, cls_jsonl, tmp_path, capsys):
    off = ["--set", "train.checkpoint_at_end=false"]
    done = tmp_path / "done"
    assert main(args(tiny_bert_dir, cls_jsonl, done, *METHODS["lift"], *off, "--set", "train.save_every=3", steps=4)) == 0
    assert json.loads((done / "summary.json").read_text())["steps"] == 4 and find_latest(done).name == "step-000003"
    # The newest checkpoint is older than the finished run: resuming would train its last step again.
    capsys.readouterr()
    assert main(["train", "--resume", str(done)]) == 2
    assert "is complete" in capsys.readouterr().err
    stopped = tmp_path / "stopped"
    assert main(args(tiny_bert_dir, cls_jsonl, stopped, *METHODS["lift"], *off, "--stop-at", "2", steps=4)) == 0
    assert find_latest(stopped).name == "step-000002"


def test_resume_refusals(tiny_bert_dir, cls_jsonl, tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no config.yaml" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main(args(tiny_bert_dir, cls_jsonl, out, *METHODS["lift"], steps=2)) == 0
    assert main(["train", "--resume", str(out), "--set", "train.lr=1"]) == 2
    assert "drop --set" in capsys.readouterr().err
    assert main(["train", "--resume", str(out)]) == 2
    assert "is complete" in capsys.readouterr().err
    for p in (out / "checkpoints").iterdir():
        (p / "manifest.json").unlink()
    (out / "summary.json").unlink()
    assert main(["train", "--resume", str(out)]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_no_pickle_in_checkpoints(references):
    ckpt = find_latest(references("ist"))
    for f in ckpt.iterdir():
        assert f.suffix in (".safetensors", ".json"), f.name


def test_sigterm_saves_and_resume_matches(references, tiny_bert_dir, cls_jsonl, tmp_path):
    """SIGTERM during training: a checkpoint at the next step boundary, exit 143, and --resume reaches the same weights."""
    ref = references("lift")
    out = tmp_path / "run"
    # Each step sleeps a little (a slow data loader) so the signal lands mid-run; weights do not depend on it.
    code = (
        f"import sys, time, torch; torch.set_num_threads({torch.get_num_threads()})  # as the reference run\n"
        "import layerwise.engine.trainer as t\n"
        "orig = t.BatchStream.__next__\n"
        "def slow(self):\n    time.sleep(0.3)\n    return orig(self)\n"
        "t.BatchStream.__next__ = slow\n"
        "from layerwise.cli import main; sys.exit(main(sys.argv[1:]))\n"
    )
    extra = [*METHODS["lift"], "--set", "train.save_every=1", "--set", "train.keep_last=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code, *args(tiny_bert_dir, cls_jsonl, out, *extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while find_latest(out) is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "SIGTERM received" in err and f"layerwise train --resume {out}" in err
    stopped_at = find_latest(out)
    assert stopped_at is not None and int(stopped_at.name.split("-")[1]) < STEPS
    assert not (out / "summary.json").exists()
    assert main(["train", "--resume", str(out)]) == 0
    assert_same(final_state(ref), final_state(out))
