"""SIGKILL at random points, at least 20 times, then ``--resume``: the final weights equal an
uninterrupted run bitwise (issue 8, deliverable 1).

Start-up cost: importing torch + transformers + peft takes seconds of CPU per process, and a
process can be SIGKILLed only once, so 20+ fresh interpreters would spend most of the test
importing. Instead one driver interpreter (a subprocess of pytest, one thread) imports
``layerwise`` once and then ``fork()``s a child per launch; each child runs exactly what
``python -m layerwise train`` runs (``layerwise.cli.main(argv)``) and is killed with SIGKILL
by the driver. The last launch, which finishes the run, is a real ``python -m layerwise train
--resume`` process, so the checkpoints the forked children left are read by the CLI as a
user would run it.

Kill points (seeded): a random delay after the launch (import/setup/any step), right after a
``checkpoints/.tmp-*`` folder appears (in the middle of a save), or a random delay after a
new checkpoint appears (in the middle of a step or of writing metrics). After each kill the
next launch is ``--resume`` (or a fresh start, if no checkpoint was complete yet: a run killed
before its first checkpoint has nothing to resume).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

STEPS = 40
KILLS = 22
SEED = 1234


def train_args(model_dir: str, data: str, out: Path) -> list[str]:
    return [
        "train", "--model", model_dir, "--data", data, "--max-steps", str(STEPS), "--output", str(out),
        "--method", "lift", "--set", "method.switch_every=2", "--set", "method.k=1",
        "--set", "train.batch_size=4", "--set", "train.progress=false", "--set", "train.log_every=1",
        "--set", "data.max_length=16", "--set", "train.warmup_steps=2", "--set", "train.eval_before=false",
        "--set", "train.eval_after=false", "--set", "train.save_every=1", "--set", "train.keep_last=2",
        "--set", "train.save_model=false",
    ]


# ------------------------------------------------------------------------------------------------
# The driver (runs in its own interpreter: ``python tests/test_kill_resume.py MODEL DATA WORKDIR``)


def _fork_main(argv: list[str], log: Path) -> int:
    """Fork a child that runs ``layerwise.cli.main(argv)`` with stdout/stderr to ``log``; its pid."""
    pid = os.fork()
    if pid == 0:  # child
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            from layerwise.cli import main

            rc = main(argv)
        except BaseException:  # noqa: BLE001 - anything unexpected is a failure the parent sees as rc 99
            import traceback

            traceback.print_exc()
            rc = 99
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return pid


def _tmp_dirs(out: Path) -> list[str]:
    try:
        return [e.name for e in os.scandir(out / "checkpoints") if e.name.startswith(".tmp-")]
    except FileNotFoundError:
        return []


def _complete(out: Path) -> list[int]:
    try:
        return sorted(int(e.name[5:]) for e in os.scandir(out / "checkpoints") if e.name.startswith("step-") and (Path(e.path) / "manifest.json").exists())
    except FileNotFoundError:
        return []


def drive(model_dir: str, data: str, work: Path) -> dict:
    # Import everything a launch needs once, before forking (no torch op runs in this process).
    import importlib

    import layerwise.cli  # noqa: F401
    import layerwise.run  # noqa: F401

    # What a launch imports lazily (data loading, the BERT classes), so no child pays for it.
    for name in ("datasets", "pandas", "pyarrow.parquet", "transformers.models.bert.modeling_bert", "transformers.models.auto.tokenization_auto"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    from layerwise.engine.checkpoint import find_latest

    rnd = random.Random(SEED)
    ref, out = work / "ref", work / "run"
    log = work / "children.log"
    t0 = time.perf_counter()
    pid = _fork_main(train_args(model_dir, data, ref), log)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, log.read_text()[-3000:]
    ref_seconds = time.perf_counter() - t0

    kills: list[dict] = []
    t0 = time.perf_counter()
    while len(kills) < KILLS:
        resume = find_latest(out) is not None
        if not resume:
            shutil.rmtree(out, ignore_errors=True)  # killed before its first checkpoint: start again
        argv = ["train", "--resume", str(out)] if resume else train_args(model_dir, data, out)
        mode = rnd.choice(["delay", "mid-save", "mid-save", "after-save"])
        delay = rnd.uniform(0.0, 2.0) if mode == "delay" else rnd.uniform(0.0, 0.03)
        # At most 2 new checkpoints per launch, so 20+ kills happen before the run can finish.
        saves = rnd.randint(1, 2) if mode == "after-save" else 2
        before, old_tmp = _complete(out), set(_tmp_dirs(out))
        pid = _fork_main(argv, log)
        start = time.perf_counter()
        finished = None
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                finished = os.waitstatus_to_exitcode(status)
                break
            if mode == "delay" and time.perf_counter() - start >= delay:
                break
            if mode == "mid-save" and set(_tmp_dirs(out)) - old_tmp:
                break
            if len(set(_complete(out)) - set(before)) >= saves:
                time.sleep(delay if mode == "after-save" else 0.0)
                break
            time.sleep(0.0005)
        if finished is not None:
            assert finished == 0, log.read_text()[-3000:]
            break  # the run completed before this kill (the test then fails on the kill count)
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        kills.append({
            "mode": mode,
            "after_s": round(time.perf_counter() - start, 4),
            "resumed": resume,
            "killed_by_sigkill": os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL,
            "tmp_left": sorted(set(_tmp_dirs(out)) - old_tmp),
            "latest": (find_latest(out).name if find_latest(out) else None),
        })
    kill_seconds = time.perf_counter() - t0

    # The last launch is the real command line: a fresh interpreter running `python -m layerwise`.
    t0 = time.perf_counter()
    final = subprocess.run([sys.executable, "-m", "layerwise", "train", "--resume", str(out)], capture_output=True, text=True)
    return {
        "kills": kills,
        "final_rc": final.returncode,
        "final_stderr": final.stderr[-3000:],
        "ref_seconds": ref_seconds,
        "kill_phase_seconds": kill_seconds,
        "final_seconds": time.perf_counter() - t0,
    }


if __name__ == "__main__":
    model_dir, data, work = sys.argv[1:4]
    report = drive(model_dir, data, Path(work))
    (Path(work) / "report.json").write_text(json.dumps(report, indent=1))
    sys.exit(0)


# ------------------------------------------------------------------------------------------------
# The test

import pytest  # noqa: E402


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_sigkill_twenty_times_then_resume_is_bitwise_exact(tiny_bert_dir, cls_jsonl, tmp_path):
    import torch
    from safetensors.torch import load_file

    from layerwise.engine.checkpoint import find_latest

    # One thread in the driver, its children and the final process: the reference and the killed
    # run must sum in the same order to be bitwise comparable.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__, tiny_bert_dir, cls_jsonl, str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    report = json.loads((tmp_path / "report.json").read_text())
    kills = report["kills"]
    assert len(kills) >= 20, kills
    assert all(k["killed_by_sigkill"] for k in kills)
    assert sum(k["resumed"] for k in kills) >= 15, kills
    # Some kills landed while a checkpoint was being written (its .tmp folder was left behind).
    assert sum(bool(k["tmp_left"]) for k in kills) >= 3, kills
    assert report["final_rc"] == 0, report["final_stderr"]

    ref, out = tmp_path / "ref", tmp_path / "run"
    a, b = find_latest(ref), find_latest(out)
    assert a.name == b.name == f"step-{STEPS:06d}"
    for part in ("model", "optimizer"):
        x, y = load_file(a / f"{part}.safetensors"), load_file(b / f"{part}.safetensors")
        assert x.keys() == y.keys(), part
        for k in x:
            assert torch.equal(x[k], y[k]), f"{part}: {k} differs"
    # No leftovers of interrupted saves; metrics rows are neither lost nor duplicated.
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    rows = lambda run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["step"] for r in rows(out)] == [r["step"] for r in rows(ref)] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows(out)] == [r["loss"] for r in rows(ref)]
    s_out, s_ref = (json.loads((run / "summary.json").read_text()) for run in (out, ref))
    assert s_out["steps"] == s_ref["steps"] == STEPS and s_out["switches"] == s_ref["switches"]
