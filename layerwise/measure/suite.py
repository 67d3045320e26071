"""``layerwise bench --suite paper``: every method on both packaged models, side by side, with the
hardware limit beside every number; writes ``DIR/report.md``, PNG charts and ``DIR/suite.json``.

Per model and precision (fp32, bf16 autocast), each method runs in its own process (forked from
the driver, so the imports and the data are loaded once; ``layerwise measure worker SPEC.json`` runs
the same worker alone). One worker:

1. trains ``steps`` optimizer steps at the shared batch, padded length and seed, on a constant
   learning rate, evaluating on held-out data every ``eval_every`` steps (evaluation time is not
   training time), then keeps training until ``time_budget`` seconds of training (full's time for
   ``steps``) have passed: quality after a fixed step budget and after a fixed wall-clock budget;
2. times every step by phase (method hook, forward, backward incl. gradient clipping, optimizer,
   other) and records what they trained and ran, which the cost model prices (:mod:`layerwise.measure.costmodel`,
   profiled right before every timed run, or once per repeat round with ``--quick``; the median of all the
   section's profiles prices every method);
3. predicts with :func:`layerwise.measure.memory.measure_method` the largest batch that fits the memory budget
   (what ``full`` needs at batch 8) and measures tokens/s and memory at that batch.

Scaling (``full``, ``lift``, ``lora``, ``meft`` on tiny random Llama models built in code): step
time and training memory vs depth, sequence length and batch, with a fitted slope.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.utils import logging as hf_logging

from layerwise.config import resolve
from layerwise.data import Splits, load_splits, tokenize_splits
from layerwise.engine import Trainer, evaluate
from layerwise.engine.settings import TrainConfig
from layerwise.engine.trainer import BatchStream
from layerwise.errors import ConfigError
from layerwise.measure.bench import method_raw
from layerwise.measure.costmodel import (
    BlockCost,
    Profile,
    median_profile,
    method_block_cost,
    predict_charges,
    predicted_speedup,
)
from layerwise.measure.memory import max_batch, measure_method, predict, repeat_batch, synthetic_batch
from layerwise.measure.profile import profile_methods
from layerwise.measure.report import COST_MODEL_TOLERANCE, OVERHEAD_THRESHOLD, PHASES, render, write_docs
from layerwise.methods import METHODS, method_config, setup
from layerwise.models import count_blocks, default_task_for, load_tokenizer, resolve_model_path
from layerwise.preflight import CPU_BF16_ENV, cpu_has_bf16
from layerwise.run import Run

#: (label, method settings); lift's switch_every and lisa's follow the step budget (one pass of the schedule).
SUITE_METHODS = (
    ("full", {"name": "full"}),
    ("freeze", {"name": "freeze"}),
    ("lift_bottom_up", {"name": "lift", "schedule": "bottom_up"}),
    ("lift_top_down", {"name": "lift", "schedule": "top_down"}),
    ("lift_random", {"name": "lift", "schedule": "random"}),
    ("lisa", {"name": "lisa"}),
    ("lora", {"name": "lora"}),
    ("salf", {"name": "salf"}),  # the probe's own cut (its time is in setup_seconds, not in the steps)
    ("ist", {"name": "ist"}),
    ("meft", {"name": "meft"}),
)
#: What the packaged models train on (the decoder as causal LM on BoolQ prompt + answer).
MODELS = {"minilm": "rotten_tomatoes", "smollm2": "boolq", "tiny-bert": "rotten_tomatoes", "tiny-llama": "boolq"}
PRESETS = {
    # steps: step budget (also the equal-batch window; the IST importance loop, every probe_every steps,
    # must fall inside it); eval_every/eval_samples: the quality curve; max_steps_factor: the wall-clock
    # run stops at full's time or at this many times the step budget, whichever comes first;
    # batch_cap: the equal-memory run's largest batch (it runs the step budget, the first step not timed); scaling: sizes per
    # axis and steps per point. Sized for 2 CPU cores: full under 60 minutes, quick under 10.
    "full": {
        "minilm": dict(seq_len=64, batch_size=8, steps=30, eval_every=15, eval_samples=256, train_samples=None),
        "smollm2": dict(seq_len=64, batch_size=4, steps=12, eval_every=6, eval_samples=32, train_samples=4000),
        "tiny": dict(seq_len=32, batch_size=8, steps=12, eval_every=4, eval_samples=64, train_samples=512),
        "batch_cap": 16, "salf_samples": 256, "max_steps_factor": 2,
        "scaling": dict(depth=[4, 8, 16, 32, 48], seq_len=[32, 64, 128, 256], batch=[1, 2, 4, 8, 16], steps=6),
    },
    "quick": {
        "minilm": dict(seq_len=64, batch_size=8, steps=6, eval_every=6, eval_samples=32, train_samples=2000, ist_probe_every=5),
        "smollm2": dict(seq_len=32, batch_size=2, steps=3, eval_every=3, eval_samples=8, train_samples=500, ist_probe_every=2),
        "tiny": dict(seq_len=16, batch_size=4, steps=11, eval_every=5, eval_samples=16, train_samples=64),
        "batch_cap": 4, "salf_samples": 16, "max_steps_factor": 1.5,
        "scaling": dict(depth=[4, 12, 24], seq_len=[16, 32, 64, 128], batch=[1, 2, 4, 8], steps=3),
    },
}
SCALING_METHODS = ("full", "lift", "lora", "meft")
PRECISIONS = ("fp32", "bf16")


# ---------------------------------------------------------------------------------------------
# Tiny random models (tests and scaling): built in code from transformers' configs.


def tiny_config(family: str, layers: int, hidden: int = 64, vocab: int = 30522, positions: int = 512):
    if family == "bert":
        return BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                          intermediate_size=2 * hidden, max_position_embeddings=positions, num_labels=2)
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions, pad_token_id=0,
                       tie_word_embeddings=False)


def build_tiny(spec: str, folder: Path) -> str:
    """``tiny-bert`` / ``tiny-llama`` (4 blocks, hidden 64, MiniLM's tokenizer) saved under ``folder``."""
    family = spec.split("-", 1)[1]
    torch.manual_seed(0)
    cls = BertForSequenceClassification if family == "bert" else LlamaForCausalLM
    cls(tiny_config(family, 4)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_model_path("minilm")).save_pretrained(folder)
    return str(folder)


# ---------------------------------------------------------------------------------------------
# Processes: each measurement in its own forked child, output to a log file.


def _child(fn, log_path: Path, args: tuple) -> None:
    fd = os.open(str(log_path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    code = 0
    try:
        fn(*args)
    except BaseException:  # noqa: BLE001 - reported through the log and the exit status
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def in_process(fn, log_path: Path, *args) -> None:
    """Run ``fn(*args)`` in a forked child process (fresh memory peak, own threads); raise if it fails."""
    import multiprocessing

    proc = multiprocessing.get_context("fork").Process(target=_child, args=(fn, log_path, args))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
        raise ConfigError(f"suite step failed: {lines[-1] if lines else '(no output)'} (full log: {log_path})")


# ---------------------------------------------------------------------------------------------
# The worker: one method, one model, one precision.


class PhaseClock:
    """Seconds per phase of :meth:`Trainer.train_step`: the method's ``before_step`` hook, the model's
    forward (root module hooks), backward (forward end to optimizer step start: ``loss.backward`` and
    gradient clipping), the optimizer step, and the rest (data, plan switch, zero_grad, scheduler).

    On a CUDA device the phase boundaries are CUDA events (kernels run asynchronously, so a host
    clock would time their launch, not their run): they are resolved after a synchronize when a
    snapshot is taken. Elsewhere the host clock (``perf_counter``) is exact."""

    def __init__(self, trainer):
        self.cuda = getattr(trainer, "device", None) is not None and trainer.device.type == "cuda"
        if self.cuda:
            self._now = lambda: _cuda_event(torch)
        else:
            from time import perf_counter

            self._now = perf_counter
        self.total = dict.fromkeys(PHASES[:-1], 0.0)
        self._pending: list[tuple[str, object, object]] = []
        self._in_hook = False
        self._f0 = self._f1 = None
        method, opt = trainer.method, trainer.optimizer
        before, step = method.before_step, opt.step

        def timed_before(index):
            t0, self._in_hook = self._now(), True
            try:
                before(index)
            finally:
                self._in_hook = False
                self._add("method_hook", t0, self._now())

        def pre(module, args, kwargs):
            if not self._in_hook:
                self._f0 = self._now()

        def post(module, args, kwargs, out):
            if not self._in_hook:
                self._f1 = self._now()
                self._add("forward", self._f0, self._f1)

        def timed_step(*a, **k):
            t0 = self._now()
            self._add("backward", self._f1, t0)
            try:
                return step(*a, **k)
            finally:
                self._add("optimizer", t0, self._now())

        method.before_step = timed_before
        opt.step = timed_step
        self.handles = [trainer.model.register_forward_pre_hook(pre, with_kwargs=True),
                        trainer.model.register_forward_hook(post, with_kwargs=True)]

    def _add(self, phase: str, start, end) -> None:
        if self.cuda:
            self._pending.append((phase, start, end))
        else:
            self.total[phase] += end - start

    def snapshot(self) -> dict:
        if self._pending:
            torch.cuda.synchronize()
            for phase, start, end in self._pending:
                self.total[phase] += start.elapsed_time(end) / 1000.0
            self._pending.clear()
        return dict(self.total)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _cuda_event(torch):
    e = torch.cuda.Event(enable_timing=True)
    e.record()
    return e


def matrix_rate(device: str, precision: str, n: int = 2048, reps: int = 5) -> dict:
    """The device's measured matrix rate: FLOP/s of an ``n`` x ``n`` GEMM (median of ``reps``), in the
    dtype the precision's matrix products run in (bf16 under bf16 autocast)."""

    dev = torch.device(device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    times = []
    for _ in range(reps + 1):
        if dev.type == "cuda":
            start = _cuda_event(torch)
            a @ b
            end = _cuda_event(torch)
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    seconds = statistics.median(times[1:])
    return {"flops_per_s": 2.0 * n**3 / seconds, "gemm": f"{n}x{n}x{n} {str(dtype).replace('torch.', '')}", "device": str(dev)}


class _NoModuleTracking:
    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


def _kv_heads_as_query(query_shape, key_shape, value_shape):
    """Grouped-query attention broadcasts each key/value head over its query heads: the FLOPs of as many
    key/value heads as query heads (torch before 2.13 counts only equal head counts and raises otherwise)."""
    heads = query_shape[1]
    return query_shape, (key_shape[0], heads, *key_shape[2:]), (value_shape[0], heads, *value_shape[2:])


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(*_kv_heads_as_query(query_shape, key_shape, value_shape))


def _sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, *_kv_heads_as_query(query_shape, key_shape, value_shape))


_aten = torch.ops.aten
#: The fused attention kernels (CUDA's, on CPU the math path's matrix products are counted instead), GQA included.
SDPA_FLOPS = {
    **{op: _sdpa_flops for op in (_aten._scaled_dot_product_efficient_attention, _aten._scaled_dot_product_flash_attention,
                                   _aten._scaled_dot_product_cudnn_attention)},
    **{op: _sdpa_backward_flops for op in (_aten._scaled_dot_product_efficient_attention_backward,
                                            _aten._scaled_dot_product_flash_attention_backward,
                                            _aten._scaled_dot_product_cudnn_attention_backward)},
}


def count_step_flops(trainer) -> dict:
    """FLOPs of one optimizer step (forward, backward, recomputation), counted by torch's
    ``FlopCounterMode`` from the shapes of the matrix products and attention it dispatches."""

    counter = FlopCounterMode(display=False, custom_mapping=SDPA_FLOPS)
    # Only the total is needed: its per-module tracker hooks backward in a way that breaks an
    # autograd.grad inside backward (MEFT's reversible backward), so count everything as "Global".
    counter.mod_tracker = _NoModuleTracking()
    with counter:
        rec = trainer.train_step()
    return {"flops": int(counter.get_total_flops()), "plan": rec.plan.describe(), "step": rec.step}


def _resolve_worker(spec: dict, batch_size: int, output: Path):
    raw = {
        "model": spec["model_path"],
        "data": {"source": spec["data"], "max_length": spec["seq_len"], "padding": "max_length",
                 "max_train_samples": spec["train_samples"], "max_eval_samples": spec["eval_samples"]},
        "method": spec["method"],
        "output": str(output),
        "train": {"max_steps": 100 * spec["steps"], "batch_size": batch_size, "bf16": spec["precision"] == "bf16",
                  "lr_schedule": "constant", "warmup_steps": 0, "seed": spec["seed"], "progress": False,
                  "save_model": False, "eval_before": False, "eval_after": False, "sample_generations": 0,
                  # The same dropout regime for every method: blocks that do not train keep theirs, as in full.
                  "frozen_dropout": True, "device": spec.get("device", "cpu")},
    }
    return resolve(raw)


def _load_profile(path: str):
    fields = {f.name for f in dataclasses.fields(Profile)}
    return Profile(**{k: v for k, v in json.loads(Path(path).read_text())["profile"].items() if k in fields})


def _evaluate(trainer, eval_loader, run) -> dict:
    return evaluate(trainer.model, eval_loader, run.task, run.device, run.cfg.train.bf16)


def _predict(spec: dict, run, cfg, train_loader, ran: dict) -> dict:
    """The cost model's step for the steps in ``ran`` (step -> plan), with the method's adapters timed on its own block."""
    method = run.method
    block = BlockCost()
    if method.adapter_params:
        batch = {k: v.to(run.device) for k, v in next(iter(train_loader(0))).items()}
        block = method_block_cost(method, run.model, batch, bf16=cfg.train.bf16)
    return predicted_speedup(_load_profile(spec["profile"]), method, ran, frozen_eval=not cfg.train.frozen_dropout, block=block)


def _timing_repeat(spec: dict, run, cfg, train_loader, setup_seconds: float) -> dict:
    """A repeat of the equal-batch timing alone (no evaluation, no equal-memory run): the same steps, plans and
    phase clock as the worker's first run, so the report can take medians over interleaved repeats."""
    trainer = Trainer(run.model, run.method, cfg.train, BatchStream(train_loader), device=run.device)
    clock = PhaseClock(trainer)
    rows = []
    for _ in range(spec["steps"]):
        before = clock.snapshot()
        rec = trainer.train_step()
        after = clock.snapshot()
        row = {k: after[k] - before[k] for k in after}
        row.update(other=rec.seconds - sum(row.values()), seconds=rec.seconds, tokens=rec.tokens, plan=rec.plan.describe())
        rows.append(row)
    clock.close()
    timed = rows[1:] if len(rows) > 1 else rows
    result = {"label": spec["label"], "repeat": spec["repeat"], "setup_seconds": setup_seconds,
              "step_seconds": statistics.fmean(r["seconds"] for r in timed),
              "tokens_per_s": sum(r["tokens"] for r in timed) / sum(r["seconds"] for r in timed),
              "phases": {k: statistics.fmean(r[k] for r in timed) for k in PHASES}, "plans": sorted({r["plan"] for r in timed})}
    Path(spec["result"]).write_text(json.dumps(result, indent=2))
    return result


def run_worker(spec: dict) -> dict:
    """One method on one model at one precision (see the module docstring); writes ``spec['result']``."""
    hf_logging.set_verbosity_error()
    torch.set_num_threads(spec["threads"])
    work = Path(spec["workdir"])
    cfg, mcfg = _resolve_worker(spec, spec["batch_size"], work / "run")
    run = Run(cfg, mcfg, log=print, splits=tokenized_splits(cfg))
    setup_seconds = run.setup_seconds  # what the method did before its first step (SALF's probe)
    train_loader, eval_loader = run.loaders()
    if spec.get("timing_only"):
        return _timing_repeat(spec, run, cfg, train_loader, setup_seconds)
    trainer = Trainer(run.model, run.method, cfg.train, BatchStream(train_loader), device=run.device)
    clock = PhaseClock(trainer)
    metric = "accuracy" if run.task == "classification" else "loss"
    steps, every, budget_s = spec["steps"], spec["eval_every"], spec.get("time_budget")
    points = [{"step": 0, "seconds": 0.0, **_evaluate(trainer, eval_loader, run)}]
    # The machine's speed around the timed window (shared cores drift): a small GEMM before and after.
    speed = [matrix_rate(spec.get("device", "cpu"), spec["precision"], n=1024, reps=3)["flops_per_s"]]
    rows, plans, seconds = [], [], 0.0
    at_steps = at_time = None
    # Measured peak of the training window (steps and their evaluations) above the loaded model.
    trainer.peak_memory.reset()
    while True:
        before = clock.snapshot()
        rec = trainer.train_step()
        seconds += rec.seconds
        after = clock.snapshot()
        row = {k: after[k] - before[k] for k in after}
        row["other"] = rec.seconds - sum(row.values())
        row.update(step=rec.step, seconds=rec.seconds, tokens=rec.tokens, activations=rec.bytes["activations"],
                   plan=rec.plan.describe(), switch=bool(plans) and rec.plan != plans[-1])
        rows.append(row)
        plans.append(rec.plan)
        done = rec.step + 1
        crossed = budget_s is not None and at_time is None and seconds >= budget_s
        capped = done >= spec["max_steps"] and at_time is None and budget_s is not None and not crossed
        if done % every == 0 or done == steps or crossed or capped:
            points.append({"step": done, "seconds": seconds, **_evaluate(trainer, eval_loader, run)})
        if done == steps:
            at_steps = points[-1]
        if crossed or capped:
            at_time = {**points[-1], "capped": capped}
        if done >= steps and (budget_s is None or at_time is not None):
            break
    clock.close()
    pm = trainer.peak_memory
    measured = {"bytes": pm.peak_above_baseline(), "process_bytes": pm.peak_bytes(), "baseline_bytes": pm.baseline,
                "kind": pm.kind}
    speed.append(matrix_rate(spec.get("device", "cpu"), spec["precision"], n=1024, reps=3)["flops_per_s"])
    if at_time is None:
        at_time = at_steps  # full: it sets the time budget
    timed = rows[1:steps] if steps > 1 else rows
    tokens = sum(r["tokens"] for r in timed)
    step_seconds = sum(r["seconds"] for r in timed)
    phases = {k: statistics.fmean(r[k] for r in timed) for k in PHASES}
    # The cost model on the plans these steps really ran (uncalibrated: the profile and the method's own block factors).
    method = run.method
    ran = {i: plans[i] for i in range(1, min(steps, len(plans)))} or {0: plans[0]}
    pred = _predict(spec, run, cfg, train_loader, ran)
    # Counted FLOPs of one more step on the first timed step's plan (after the quality run: it does not
    # change what was measured), and the rate the steps that ran that plan reached.
    trainer.step_index = rows[1]["step"] if len(rows) > 1 else 0
    flops = count_step_flops(trainer)
    same = [r["seconds"] for r in timed if r["plan"] == flops["plan"]]
    flops.update(timed_steps_with_plan=len(same), achieved_flops_per_s=flops["flops"] / statistics.fmean(same) if same else None,
                 matrix_rate=spec.get("matrix_rate"))
    result = {
        "label": spec["label"], "method": method.name, "method_config": dataclasses.asdict(mcfg), "precision": spec["precision"],
        "command": spec["command"], "task": run.task, "metric": metric,
        "equal_batch": {
            "batch_size": spec["batch_size"], "seq_len": spec["seq_len"], "timed_steps": len(timed),
            "tokens_per_s": tokens / step_seconds, "step_seconds": step_seconds / len(timed),
            "memory": {k: int(v) for k, v in trainer.totals.peak.items()},
            "measured_peak": measured,
            "trainable_parameters_max": trainer.max_trainable,
            "total_parameters": sum(p.numel() for p in trainer.model.parameters()),
            "phases": phases, "predicted": pred, "plans": sorted({p.describe() for p in ran.values()}), "setup_seconds": setup_seconds,
            "steps": timed, "flops": flops, "clock": "cuda_events" if clock.cuda else "perf_counter",
            "machine_gemm_flops_per_s": speed,
            "method_log": {k: v for k, v in method.log_values().items() if isinstance(v, (int, float, str))},
        },
        "quality": {"metric": metric, "step_budget": steps, "time_budget_s": budget_s, "train_seconds": seconds,
                    "points": points, "at_steps": at_steps, "at_time": at_time},
    }
    # Equal memory: the largest batch within the budget (layerwise plan's prediction), measured there.
    # The plans of the step budget (the run's max_steps only keeps the constant learning rate going).
    budget_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=steps))
    mraw = dict(spec["method"])
    if getattr(method, "probe", None) is not None and mraw.get("probe") is None:
        # SALF: the equal-memory run (and any timing repeat) trains the cut this run's probe chose, without probing again.
        work.mkdir(parents=True, exist_ok=True)
        probe_path = work / "probe.json"
        probe_path.write_text(json.dumps(method.probe))
        mraw["probe"] = result["probe_path"] = str(probe_path)
    entry = measure_method(budget_cfg, mraw, run.task, spec["seq_len"], num_labels=len(run.label_names) if run.label_names else None)
    entry.pop("_method", None)
    full_at = predict(entry, spec["budget_batch"])
    mem = {"prediction": {k: v for k, v in entry.items() if not k.startswith("_") and k != "config"}, "predicted_at_budget_batch": full_at}
    budget = spec.get("memory_budget") or full_at["total"]
    batch = max_batch(entry, budget)
    mem.update(budget_bytes=budget, max_batch_predicted=batch, batch_size=min(batch, spec["batch_cap"]), capped=batch > spec["batch_cap"])
    if mem["batch_size"] >= 1:
        run.cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=mem["batch_size"]))
        big_loader, _ = run.loaders()
        trainer = Trainer(run.model, run.method, run.cfg.train, BatchStream(big_loader), device=run.device)
        # The step budget, as at equal batch: a switching method is timed over its whole schedule (every plan it
        # runs), not on the plan it starts with; the first step is not timed.
        recs = [trainer.train_step() for _ in range(max(steps, 2))][1:]
        mem.update(tokens_per_s=sum(r.tokens for r in recs) / sum(r.seconds for r in recs),
                   memory={k: int(v) for k, v in trainer.totals.peak.items()}, steps=len(recs),
                   plans=sorted({r.plan.describe() for r in recs}))
    result["equal_memory"] = mem
    Path(spec["result"]).write_text(json.dumps(result, indent=2))
    return result


def run_scaling(spec: dict) -> None:
    """Step time and training memory of one method over the depth, length and batch axes."""
    torch.set_num_threads(spec["threads"])
    out = {}
    for axis, values in spec["axes"].items():
        rows = []
        for x in values:
            size = {"depth": spec["depth"], "seq_len": spec["seq_len"], "batch": spec["batch"], axis: x}
            torch.manual_seed(0)
            # A small vocabulary: the blocks, not the output layer, dominate the step.
            model = AutoModelForCausalLM.from_config(tiny_config("llama", size["depth"], vocab=1000, positions=max(512, size["seq_len"])))
            raw = dict(spec["method"])
            if raw["name"] == "lift":
                raw["switch_every"] = 1
            method, prepared = setup(method_config(raw), model, task="causal_lm", max_steps=10**6)
            tcfg = TrainConfig(max_steps=10**6, batch_size=size["batch"], warmup_steps=0, progress=False, device="cpu")
            trainer = Trainer(prepared, method, tcfg, repeat_batch(synthetic_batch(prepared, "causal_lm", size["batch"], size["seq_len"])),
                              device=torch.device("cpu"))
            times = []
            n = spec["steps"]
            for i in range(n):
                if raw["name"] == "lift":
                    # One step per phase, spread evenly over the whole top-down schedule.
                    trainer.step_index = round(i * (size["depth"] - 1) / max(n - 1, 1))
                times.append(trainer.train_step().seconds)
            rows.append({"x": x, **size, "step_seconds": statistics.median(times[1:] or times),
                         "memory": {k: int(v) for k, v in trainer.totals.peak.items()}})
        out[axis] = {"points": rows, **fit(rows)}
    Path(spec["result"]).write_text(json.dumps(out, indent=2))


def fit(rows: list[dict]) -> dict:
    """Least-squares slopes of step time and training memory over the axis value."""
    x = np.array([r["x"] for r in rows], dtype=float)
    t = np.array([r["step_seconds"] for r in rows])
    m = np.array([r["memory"]["total"] for r in rows], dtype=float)
    (st, it), (sm, im) = np.polyfit(x, t, 1), np.polyfit(x, m, 1)
    return {"slope_seconds": float(st), "intercept_seconds": float(it), "slope_bytes": float(sm), "intercept_bytes": float(im)}


# ---------------------------------------------------------------------------------------------
# The driver.


def _machine() -> dict:
    cpu = platform.processor() or ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "(default)"), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
            "load_average_start": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def _labels(methods: str | None) -> list[tuple[str, dict]]:
    known = dict(SUITE_METHODS)
    if not methods:
        return list(SUITE_METHODS)
    names = [m.strip() for m in methods.split(",") if m.strip()]
    if "lift" in names:  # "lift" means every schedule
        i = names.index("lift")
        names[i:i + 1] = [n for n in known if n.startswith("lift_")]
    bad = [n for n in names if n not in known]
    if bad:
        raise ConfigError(f"--methods: '{bad[0]}' is not a suite method: choose from {', '.join(known)}")
    if "full" not in names:
        names.insert(0, "full")  # every ratio is against full, measured in the same invocation
    return [(n, known[n]) for n in sorted(names, key=list(known).index)]


def _preload() -> None:
    """Import in the driver the model code every worker runs (transformers imports it lazily): forked workers inherit it."""
    for name in ("transformers.models.bert.modeling_bert", "transformers.models.llama.modeling_llama"):
        importlib.import_module(name)


#: Tokenized splits by (model, data settings, task). The driver fills it before forking, so every worker inherits them.
_SPLITS: dict[tuple, Splits] = {}


def tokenized_splits(cfg) -> Splits:
    """The tokenized data of run config ``cfg``, loaded once per process."""
    task = cfg.task or default_task_for(resolve_model_path(cfg.model))
    key = (cfg.model, repr(cfg.data), task)
    if key not in _SPLITS:
        tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
        _SPLITS[key] = tokenize_splits(load_splits(cfg.data, task), tokenizer, cfg.data, task)
    return _SPLITS[key]


def run_suite(args) -> dict:
    if args.suite != "paper":
        raise ConfigError(f"--suite '{args.suite}': the only suite is 'paper'")
    out = Path(args.output)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"suite output folder '{out}' already exists and is not empty: pass a new --output")
    preset = PRESETS["quick" if args.quick else "full"]
    models = [m.strip() for m in (args.models or "minilm,smollm2").split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            raise ConfigError(f"--models: '{m}' is not a suite model: choose from {', '.join(MODELS)}")
    precisions = [p.strip() for p in (args.precisions or ",".join(PRECISIONS)).split(",") if p.strip()]
    if not precisions or any(p not in PRECISIONS for p in precisions):
        raise ConfigError(f"--precisions: choose from {', '.join(PRECISIONS)}")
    labels = _labels(args.methods)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if repeats < 1:
        raise ConfigError(f"--repeats {repeats}: use 1 or more")
    device = _suite_device(getattr(args, "device", None))
    skipped = {}
    # On CPU only: asking CUDA would initialize it in the driver, and forked workers could not use it then.
    if device == "cpu" and "bf16" in precisions and not cpu_has_bf16():
        # A bf16 GEMM without bf16 units runs tens of times slower than fp32: such a row measures the fallback, not the method.
        precisions.remove("bf16")
        skipped["bf16"] = (f"skipped: this CPU has no bf16 matrix units (torch sees {torch.backends.cpu.get_cpu_capability()}; "
                           f"{CPU_BF16_ENV}=1 overrides)")
        print(f"bf16 {skipped['bf16']}", flush=True)
    if not precisions:
        raise ConfigError("--precisions bf16: this CPU has no bf16 matrix units, so there is nothing to measure; add fp32")
    _preload()
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("specs", "results", "logs", "work", "models"):
        (out / sub).mkdir()
    threads = int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1
    command = "layerwise " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "layerwise bench --suite paper"
    report = {"command": command, "quick": bool(args.quick), "machine": {**_machine(), "device": device}, "methods": [label for label, _ in labels],
              "precisions": precisions, "skipped_precisions": skipped, "models": {}, "threshold_percent_of_ideal": OVERHEAD_THRESHOLD,
              "repeats": repeats, "cost_model_tolerance": COST_MODEL_TOLERANCE}
    t_start = time.perf_counter()
    for model in models:
        path = model
        if model.startswith("tiny-"):
            path = str(out / "models" / model)
            in_process(build_tiny, out / "logs" / f"{model}-build.log", model, Path(path))
        else:
            # A packaged GGUF model is converted on first use, with torch's thread pools: in a child, because a
            # driver that used them hangs its forked workers (seen on a fresh machine's first SmolLM2 run).
            in_process(resolve_model_path, out / "logs" / f"{model}-resolve.log", path)
        size = preset["tiny" if model.startswith("tiny-") else model]
        num_blocks = count_blocks(path)
        entry = {"model": model, "model_path": path, "data": MODELS[model], "num_blocks": num_blocks, **size,
                 "max_steps": int(preset["max_steps_factor"] * size["steps"]),
                 "budget_batch": 8, "profiles": {}, "runs": {}}
        report["models"][model] = entry
        for prec in precisions:
            # Cost model: profiled full fine-tuning steps at this batch, length and precision, one before every run.
            cfg_dir = out / "specs" / f"{model}-{prec}"
            cfg_dir.mkdir()
            base = {"model": path, "data": {"source": MODELS[model], "max_length": size["seq_len"], "padding": "max_length",
                                             "max_train_samples": size["train_samples"]},
                    "train": {"batch_size": size["batch_size"], "bf16": prec == "bf16", "device": device}, "method": {"name": "full"}}
            (cfg_dir / "full.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
            base_cfg, _ = resolve(base)

            def profile(label: str, rep: int) -> Path:
                """A profiled full step in its own process, right before a run of ``label``: through the section the
                profiles sample the machine's speed as the runs meet it, and their median prices every method
                (:func:`price_with_every_profile`). ``--quick`` profiles once per repeat round."""
                key = "shared" if args.quick else label
                path = out / "results" / f"{model}-{prec}-{key}-profile{'' if rep == 1 else f'-r{rep}'}.json"
                if not path.exists():
                    in_process(profile_methods, out / "logs" / f"{path.stem}.log", cfg_dir / "full.yaml", ["full"], 2, path,
                               tokenized_splits(base_cfg))
                command = ["layerwise", "measure", "profile", str(cfg_dir / "full.yaml"), "--methods", "full", "--steps", "2", "--output", str(path)]
                entry["profiles"].setdefault(prec, {}).setdefault(label, []).append(
                    {"path": str(path.relative_to(out)), "command": " ".join(shlex.quote(a) for a in command)})
                return path

            rate_path = out / "results" / f"{model}-{prec}-matrix-rate.json"
            in_process(_write_matrix_rate, out / "logs" / f"{model}-{prec}-matrix-rate.log", rate_path, device, prec, threads)
            entry.setdefault("matrix_rate", {})[prec] = rate = json.loads(rate_path.read_text())
            runs = entry["runs"][prec] = {}
            budget_time = budget_mem = None
            for label, mraw in labels:
                raw = method_raw({"method": mraw}, mraw["name"], size["steps"], num_blocks, variant=mraw)["method"]
                need = METHODS[raw["name"]].pass_steps(num_blocks, raw)
                if need is not None and need > size["steps"]:
                    # Timed on part of its schedule: said in the report, not hidden (bench refuses such a run).
                    entry.setdefault("partial_passes", {})[label] = need
                if raw["name"] == "salf":
                    raw.setdefault("samples", preset["salf_samples"])
                if raw["name"] == "ist" and size.get("ist_probe_every"):
                    raw.setdefault("probe_every", size["ist_probe_every"])  # the importance loop inside a short step budget
                name = f"{model}-{prec}-{label}"
                spec_path = out / "specs" / f"{name}.json"
                spec = {"model": model, "model_path": path, "data": MODELS[model], "label": label, "method": raw, "precision": prec,
                        "seq_len": size["seq_len"], "batch_size": size["batch_size"], "steps": size["steps"], "eval_every": size["eval_every"],
                        "eval_samples": size["eval_samples"], "train_samples": size["train_samples"], "seed": 0, "threads": threads,
                        "time_budget": budget_time, "max_steps": int(preset["max_steps_factor"] * size["steps"]), "memory_budget": budget_mem, "budget_batch": 8,
                        "batch_cap": preset["batch_cap"], "matrix_rate": rate, "device": device,
                        "workdir": str(out / "work" / name), "result": str(out / "results" / f"{name}.json"),
                        "command": f"layerwise measure worker {spec_path}"}
                spec_path.write_text(json.dumps(spec, indent=2))
                tokenized_splits(_resolve_worker(spec, spec["batch_size"], Path(spec["workdir"]))[0])  # loaded here, inherited by the worker
                print(f"[{model} {prec}] {label} ...", end=" ", flush=True)
                spec["profile"] = str(profile(label, 1))
                spec_path.write_text(json.dumps(spec, indent=2))
                t0 = time.perf_counter()
                in_process(run_worker, out / "logs" / f"{name}.log", spec)
                res = json.loads(Path(spec["result"]).read_text())
                runs[label] = res
                if label == "full":
                    budget_time = res["quality"]["at_steps"]["seconds"]
                    budget_mem = res["equal_memory"]["budget_bytes"]
                    entry.setdefault("time_budget_s", {})[prec] = budget_time
                    entry.setdefault("memory_budget_bytes", {})[prec] = budget_mem
                eb = res["equal_batch"]
                print(f"{eb['tokens_per_s']:.0f} tokens/s, {eb['memory']['total'] / 2**20:.1f} MiB ({time.perf_counter() - t0:.0f} s)", flush=True)
            # Repeats of the equal-batch timing alone, every method in turn (interleaved): medians in the report.
            for rep in range(2, repeats + 1):
                for label, _ in labels:
                    first = runs[label]
                    spec = json.loads((out / "specs" / f"{model}-{prec}-{label}.json").read_text())
                    if first.get("probe_path"):
                        spec["method"] = {**spec["method"], "probe": first["probe_path"]}
                    name = f"{model}-{prec}-{label}-r{rep}"
                    spec.update(timing_only=True, repeat=rep, result=str(out / "results" / f"{name}.json"), workdir=str(out / "work" / name),
                                command=f"layerwise measure worker {out / 'specs' / f'{name}.json'}", profile=str(profile(label, rep)))
                    (out / "specs" / f"{name}.json").write_text(json.dumps(spec, indent=2))
                    print(f"[{model} {prec}] {label} repeat {rep} ...", end=" ", flush=True)
                    in_process(run_worker, out / "logs" / f"{name}.log", spec)
                    res = json.loads(Path(spec["result"]).read_text())
                    first.setdefault("repeats", []).append(res)
                    print(f"{res['tokens_per_s']:.0f} tokens/s", flush=True)
            price_with_every_profile(entry, prec, out)
    if not args.no_scaling:
        report["scaling"] = _scaling(out, preset, threads, report)
    report["wall_seconds"] = time.perf_counter() - t_start
    report["machine"]["load_average_end"] = os.getloadavg()
    (out / "suite.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(render(report, out))
    if getattr(args, "docs", None):
        write_docs(report, out, Path(args.docs))
        print(f"docs: {args.docs}")
    print(f"report: {out / 'report.md'} ({report['wall_seconds']:.0f} s)")
    return report


def price_with_every_profile(entry: dict, prec: str, out: Path) -> None:
    """Price every method of ``entry``'s ``prec`` runs with the median of all the profiles taken beside them through
    the section: one profile (or a method's three) lands on fast or slow minutes of a shared machine that its run did
    not share. The prediction from the profile right before the first run is kept as ``predicted_first_profile``."""
    paths = sorted({p["path"] for taken in entry["profiles"][prec].values() for p in taken})
    if len(paths) < 2:
        return
    pooled = median_profile([_load_profile(out / p) for p in paths])
    entry.setdefault("pooled_profiles", {})[prec] = len(paths)
    for run in entry["runs"][prec].values():
        eb = run["equal_batch"]
        eb["predicted_first_profile"] = eb["predicted"]
        eb["predicted"] = predict_charges(pooled, eb["predicted"]["charges"], eb["predicted"]["block_cost"])


def _suite_device(name: str | None) -> str:
    """cpu or cuda; by default cuda when torch sees one (the driver does not initialize CUDA: workers are forked)."""
    # Ask NVML, not the CUDA runtime: a runtime call in the driver leaves forked workers unable to initialize CUDA.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    if name in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"--device '{name}': the suite runs on cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False); use --device cpu")
    return name


def _write_matrix_rate(path: Path, device: str, precision: str, threads: int) -> None:
    torch.set_num_threads(threads)
    path.write_text(json.dumps(matrix_rate(device, precision), indent=2))


def _scaling(out: Path, preset: dict, threads: int, report: dict) -> dict:
    sizes = preset["scaling"]
    base = {"depth": 8, "seq_len": 64 if max(sizes["seq_len"]) >= 64 else sizes["seq_len"][0], "batch": 4}
    result = {"family": "llama (tiny: hidden 64, 4 heads, vocabulary 1000, built from LlamaConfig)", "base": base, "axes": list(sizes)[:3], "methods": {}}
    for name in SCALING_METHODS:
        spec = {"method": {"name": name}, "axes": {k: sizes[k] for k in ("depth", "seq_len", "batch")}, "steps": sizes["steps"],
                "threads": threads, **base, "result": str(out / "results" / f"scaling-{name}.json")}
        spec_path = out / "specs" / f"scaling-{name}.json"
        spec_path.write_text(json.dumps(spec, indent=2))
        print(f"[scaling] {name} ...", flush=True)
        in_process(run_scaling, out / "logs" / f"scaling-{name}.log", spec)
        result["methods"][name] = {"command": f"layerwise measure scaling {spec_path}", **json.loads(Path(spec["result"]).read_text())}
    return result
