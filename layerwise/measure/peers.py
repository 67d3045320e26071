"""Peers run through their own libraries, beside layerwise's methods in ``layerwise bench``.

A user's alternative to ``lift`` is BAdam (PyPI ``badam``: its ``BlockOptimizer`` wrapping AdamW on a plain model in
train mode), and to ``lora`` a plain PEFT loop (``get_peft_model`` and ``torch.optim.AdamW``). Each peer runs in its own
process (``layerwise measure peer CONFIG --peer NAME --output DIR``) on the bench's model, data, batch, padded length,
precision and seed, in the loop their documentation shows: forward, backward, gradient clipping, step, zero_grad, at a
constant learning rate. Its ``summary.json`` carries what the bench reads: tokens/s over the steps after the first,
the measured peak above the loaded model, the same accounted breakdown as the engine's meter, the held-out metric.

Settings, stated in the summary: BAdam switches blocks top-down (its ``descending`` default) every ``max_steps /
blocks`` steps, one whole pass like ``lift``'s default, with the head trainable throughout (``active_modules``, as
``lift``'s ``head: always``); PEFT uses layerwise ``lora``'s settings (r 8, alpha 16, dropout 0.05, peft's default
target modules). Both start at the learning rate of the layerwise method they stand beside (``train.lr`` overrides).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import statistics
import time
from pathlib import Path

import torch

from layerwise.config import resolve
from layerwise.engine import evaluate
from layerwise.engine.meter import PeakMemory, SavedTensorMeter, grad_bytes, param_bytes
from layerwise.engine.trainer import BatchStream
from layerwise.errors import ConfigError
from layerwise.methods import default_lr, method_config
from layerwise.run import Run
from layerwise.schema import load_yaml

#: Peer label -> (the library it runs, the layerwise method it stands beside).
PEERS = {"badam": ("badam", "lift"), "peft_lora": ("peft", "lora")}


def _badam(model, anatomy, cfg, lr: float):
    try:
        from badam import BlockOptimizer
    except ImportError:
        raise ConfigError("peer badam needs the badam package: pip install badam (or drop badam from --methods)") from None
    names = {id(p): n for n, p in model.named_parameters()}
    prefix = anatomy.blocks_path
    blocks = [[f"{prefix}.{i}."] for i in range(anatomy.num_blocks)]
    head = sorted({names[id(p)] for p in anatomy.head_parameters() if id(p) in names})
    every = max(1, cfg.train.max_steps // anatomy.num_blocks)
    base = torch.optim.AdamW(model.parameters(), lr=lr)
    opt = BlockOptimizer(base_optimizer=base, named_parameters_list=list(model.named_parameters()), block_prefix_list=blocks,
                         switch_block_every=every, switch_mode="descending", active_modules=head, verbose=0)
    return model, opt, {"switch_block_every": every, "switch_mode": "descending", "active_modules": head}


def _peft_lora(model, anatomy, cfg, lr: float, task: str):
    from peft import LoraConfig, TaskType, get_peft_model

    settings = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05}
    task_type = TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM
    model = get_peft_model(model, LoraConfig(task_type=task_type, **settings))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    return model, opt, settings


def run_peer(config: str | Path, peer: str, output: str | Path) -> dict:
    """Train ``peer`` on the bench entry ``config`` (a run config; its method is ignored); writes ``output/summary.json``."""
    if peer not in PEERS:
        raise ConfigError(f"--peer '{peer}': choose from {', '.join(PEERS)}")
    library, counterpart = PEERS[peer]
    raw = load_yaml(config)
    raw["method"] = {"name": "full"}  # the plain model, prepared by no method
    raw["output"] = str(output)
    cfg, mcfg = resolve(raw)
    run = Run(cfg, mcfg, log=print)
    train_loader, eval_loader = run.loaders()
    anatomy, device, tcfg = run.method.anatomy, run.device, cfg.train
    lr = tcfg.lr if tcfg.lr is not None else default_lr(method_config({"name": counterpart}))
    torch.manual_seed(tcfg.seed)
    model = run.model.to(device)
    model.train()
    if peer == "badam":
        model, opt, settings = _badam(model, anatomy, cfg, lr)
    else:
        model, opt, settings = _peft_lora(model, anatomy, cfg, lr, run.task)
    # Optimizer state right after the inner AdamW's step: BAdam empties it on every block switch, inside its step().
    inner = getattr(opt, "base_optimizer", opt)
    state_bytes = [0]
    inner_step = inner.step

    def counted_step(*args, **kwargs):
        out = inner_step(*args, **kwargs)
        state_bytes[0] = sum(t.nbytes for s in inner.state.values() for t in s.values() if torch.is_tensor(t))
        return out

    inner.step = counted_step
    meter = SavedTensorMeter(model)
    weights = param_bytes(model)
    peak = {"weights": weights, "grads": 0, "optimizer": 0, "activations": 0, "total": 0}
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if tcfg.bf16 else contextlib.nullcontext()
    stream = BatchStream(train_loader)
    window = PeakMemory(device)
    window.reset()
    rows, trainable_max = [], 0
    for step in range(tcfg.max_steps):
        t0 = time.perf_counter()
        batch = {k: v.to(device) for k, v in next(stream).items()}
        with meter.track(), autocast:
            loss = model(**batch).loss
        loss.backward()
        params = [p for p in model.parameters() if p.requires_grad]
        grads = grad_bytes(params)
        if tcfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, tcfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        now = {"weights": weights, "grads": grads, "optimizer": state_bytes[0], "activations": meter.last_bytes}
        now["total"] = sum(now.values())
        peak = {k: max(peak[k], v) for k, v in now.items()}
        trainable_max = max(trainable_max, sum(p.numel() for p in params))
        rows.append({"step": step, "loss": float(loss.detach()), "seconds": seconds,
                     "tokens": int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel(),
                     "samples": batch["input_ids"].shape[0]})
    measured = window.peak_above_baseline()
    timed = rows[1:] or rows
    seconds = sum(r["seconds"] for r in timed)
    summary = {
        "method": peer, "peer": {"library": library, "version": importlib.metadata.version(library), "stands_beside": counterpart,
                                 "lr": lr, "lr_schedule": "constant", "settings": settings},
        "steps": len(rows), "tokens_per_s": sum(r["tokens"] for r in timed) / seconds,
        "samples_per_s": sum(r["samples"] for r in timed) / seconds, "step_seconds_median": statistics.median(r["seconds"] for r in timed),
        "peak_memory_bytes": window.peak_bytes(), "memory": {**{k: int(v) for k, v in peak.items()}, "measured_peak": measured,
                                                              "measured_baseline": window.baseline},
        "trainable_parameters_max": trainable_max, "losses": [r["loss"] for r in rows],
    }
    if tcfg.eval_after:
        summary["eval"] = evaluate(model, eval_loader, run.task, device, tcfg.bf16)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"{peer}: {summary['tokens_per_s']:.0f} tokens/s, measured peak {measured / 2**20:.1f} MiB")
    return summary

