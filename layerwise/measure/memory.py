"""``layerwise plan``: predict, per method, the peak training memory by component, the largest batch
that fits a memory budget, and (from the cost model) the tokens/s, before training anything.

How the prediction is made (docs/beyond.md):

* For each method a fresh copy of the model is loaded and prepared exactly as ``layerwise train``
  would (adapters injected, ``train.frozen_dtype`` applied by the Trainer), and the steps of the
  configured run (``train.max_steps``) are walked to find the plan with the deepest backward (the
  most saved activations) and the plan with the most trainable bytes (gradients, AdamW state).
* One real training step (forward, backward, optimizer step, through :class:`~layerwise.engine.Trainer`)
  runs in the deepest plan at batch 1 and at batch 2, at the target sequence length, on random
  token ids. :class:`~layerwise.engine.meter.SavedTensorMeter` gives the saved-for-backward bytes of
  each; activations are predicted as ``a(B) = a0 + B * (a(2) - a(1))`` (linear in the batch, measured
  at the target length: the attention-score terms that grow with length squared are included).
* weights/grads/optimizer are the bytes the engine's meter reports: parameter bytes after
  preparation, the gradient bytes of the largest trainable set, and AdamW's two moments plus its
  step counter for it. The total is the same sum summary.json's ``memory.total`` reports; it does not
  include the framework's own working memory (allocator slack, temporary buffers inside kernels).
* Largest batch: ``floor((budget - weights - grads - optimizer - a0) / slope)``.
* tokens/s: one profiled full fine-tuning step at batch 1 (:func:`layerwise.measure.costmodel.profile_model`)
  gives per-block forward/backward times; a method's step time at batch ``B`` is its compute time
  from :meth:`Profile.phases` scaled by ``B`` plus the per-parameter time of its trainable parameters
  and its own forwards beside the step (IST's importance loop) and recomputed blocks (MEFT).
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path

import torch

from layerwise.anatomy import find_anatomy
from layerwise.config import resolve
from layerwise.engine import Trainer, resolve_device
from layerwise.errors import ConfigError
from layerwise.measure.costmodel import charge_for, full_charge, profile_model
from layerwise.methods import METHODS, RunContext, method_config, names_where, setup
from layerwise.models import default_task_for, load_model_and_tokenizer, resolve_model_path

UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
         "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_memory(text: str) -> int:
    """'8GiB', '7.5 GB', '512MiB', '1e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in UNITS:
        raise ConfigError(f"--memory '{text}' is not a size: write e.g. 8GiB, 16GB or 512MiB")
    n = int(float(m.group(1)) * UNITS[m.group(2).lower()])
    if n <= 0:
        raise ConfigError(f"--memory '{text}' must be positive")
    return n


def _short_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f}G" if abs(n) >= 2**30 else f"{n / 2**20:.1f}M"


def method_defaults(name: str, num_blocks: int, given: dict) -> dict:
    """Config for ``name`` from the settings ``given``: what needs a choice gets a stated one (no training data here)."""
    return {"name": name, **METHODS[name].stated_defaults(num_blocks, with_data=False, given=given), **given}


def synthetic_batch(model, task: str, batch: int, seq: int, seed: int = 0) -> dict:
    cfg = getattr(model.config, "text_config", None) or model.config
    vocab = int(getattr(cfg, "vocab_size", 1000) or 1000)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(5, vocab - 1), vocab, (batch, seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if task == "classification":
        if getattr(cfg, "type_vocab_size", 0):
            out["token_type_ids"] = torch.zeros_like(ids)
        out["labels"] = torch.randint(0, int(getattr(cfg, "num_labels", 2) or 2), (batch,), generator=g)
    else:
        out["labels"] = ids.clone()
    return out


def repeat_batch(batch: dict):
    while True:
        yield {k: v.clone() for k, v in batch.items()}


def _plan_steps(max_steps: int) -> list[int]:
    if max_steps <= 4096:
        return list(range(max(max_steps, 1)))
    return sorted({round(i * (max_steps - 1) / 4095) for i in range(4096)})


def _walk_plans(method, max_steps: int):
    """(deepest step, params of the largest trainable set, distinct plans with their step counts)."""
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    deepest, deepest_key = 0, None
    best_params: list = []
    best_bytes = -1
    counts: dict = {}
    try:
        for step in _plan_steps(max_steps):
            try:
                plan = method.plan(step)
            except Exception:
                if step == 0:
                    raise
                break
            counts[plan] = counts.get(plan, 0) + 1
            depth = -2 if plan.lowest is None and not plan.head else (plan.lowest if plan.lowest is not None else 10**6)
            key = (depth, -len(plan.blocks))
            if deepest_key is None or key < deepest_key:
                deepest, deepest_key = step, key
            params = method.parameters(plan)
            nbytes = sum(p.nbytes for p in params)
            if nbytes > best_bytes:
                best_params, best_bytes = params, nbytes
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
    return deepest, best_params, counts


def _load(cfg, task: str, num_labels: int | None):
    model, tokenizer, info = load_model_and_tokenizer(cfg.model, task, num_labels=num_labels, trust_remote_code=cfg.trust_remote_code)
    return model, tokenizer, info, find_anatomy(model, cfg.blocks)


def measure_method(cfg, mraw: dict, task: str, seq: int, *, num_labels: int | None = None, log=print) -> dict:
    """One method: predicted memory components (activations affine in the batch) from two real steps."""
    torch.manual_seed(cfg.train.seed)
    model, tokenizer, info, anatomy = _load(cfg, task, num_labels)
    mcfg = method_config(mraw)
    device = resolve_device(cfg.train.device)
    # No training data here: a method that would probe it (salf) plans from its budget.
    method, model = setup(mcfg, model, task=task, blocks=cfg.blocks, seed=cfg.train.seed, max_steps=cfg.train.max_steps,
                          context=RunContext(tokenizer=tokenizer, device=device), anatomy=anatomy)
    deepest, largest, plan_counts = _walk_plans(method, cfg.train.max_steps)
    tcfg = cfg.train
    tcfg = dataclasses.replace(tcfg, grad_accum=1, gradient_checkpointing=tcfg.gradient_checkpointing)
    measured = {}
    trainer = None
    for b in (1, 2):
        trainer = Trainer(model, method, tcfg, repeat_batch(synthetic_batch(model, task, b, seq, seed=b)), device=device)
        trainer.step_index = deepest
        rec = trainer.train_step()
        measured[b] = dict(rec.bytes)
    slope = measured[2]["activations"] - measured[1]["activations"]
    intercept = measured[1]["activations"] - slope
    grads = max(sum(p.nbytes for p in largest), measured[2]["grads"])
    # AdamW: exp_avg and exp_avg_sq like the parameter, plus a float32 step counter per tensor.
    optimizer = max(sum(2 * p.nbytes + 4 for p in largest), measured[2]["optimizer"])
    weights = max(measured[1]["weights"], measured[2]["weights"])
    plan = method.plan(deepest)
    out = {
        "config": {k: v for k, v in dataclasses.asdict(mcfg).items()},
        "weights": int(weights),
        "grads": int(grads),
        "optimizer": int(optimizer),
        "activations_fixed": int(intercept),
        "activations_per_example": int(slope),
        "measured_steps": {str(b): m for b, m in measured.items()},
        "deepest_plan": plan.describe(),
        "trainable_max": int(sum(p.numel() for p in largest)),
        "_plans": plan_counts,
        "_adapter_only": method.adapter_only,
        "_method": method,
        "_extra_forward": sum(method.extra_forward_examples(s) for s in range(cfg.train.max_steps)) / max(cfg.train.max_steps, 1),
    }
    del trainer, model
    return out


def predict(entry: dict, batch: int) -> dict:
    act = entry["activations_fixed"] + batch * entry["activations_per_example"]
    d = {"weights": entry["weights"], "grads": entry["grads"], "optimizer": entry["optimizer"], "activations": int(act)}
    d["total"] = sum(d.values())
    return d


def max_batch(entry: dict, budget: int, limit: int = 1 << 20) -> int:
    fixed = entry["weights"] + entry["grads"] + entry["optimizer"] + entry["activations_fixed"]
    if fixed > budget:
        return 0
    per = max(entry["activations_per_example"], 1)
    return int(min((budget - fixed) // per, limit))


def _profile(cfg, task: str, seq: int, num_labels: int | None):
    torch.manual_seed(cfg.train.seed)
    model, _, _, anatomy = _load(cfg, task, num_labels)
    batch = synthetic_batch(model, task, 1, seq)
    return profile_model(model, anatomy, batch, reps=2, bf16=cfg.train.bf16)


def tokens_per_s(profile, entry: dict, batch: int, seq: int, profile_batch: int = 1) -> float:
    """Predicted tokens/s at ``batch``: compute time linear in the batch, optimizer time fixed."""
    method = entry["_method"]
    total_t, total_n = 0.0, 0
    for plan, count in entry["_plans"].items():
        ph = profile.phases(charge_for(method, plan))
        compute = ph["total"] - ph["per_parameter"]
        total_t += count * (compute * batch / profile_batch + ph["per_parameter"])
        total_n += count
    # The method's own forwards beside the step (IST's importance loop), per step on average, at a fixed batch.
    per_example = profile.phases(dataclasses.replace(full_charge(profile), extra_forward_examples=1))["method_hook"]
    return batch * seq / (total_t / max(total_n, 1) + entry.get("_extra_forward", 0) * per_example)


def plan_command(raw: dict, *, memory: str, seq_len: int | None, methods: str | None, batch_size: int | None,
                 output: str | None, speed: bool = True, method_overrides: dict | None = None, log=print) -> dict:

    budget = parse_memory(memory)
    raw = dict(raw)
    raw.setdefault("method", {"name": "full"})
    cfg, _ = resolve(raw)
    seq = int(seq_len or cfg.data.max_length)
    if seq < 2:
        raise ConfigError(f"--seq-len {seq} is too small: use at least 2 tokens")
    # Every registered method by default, the full fine-tuning baseline first.
    names = [m.strip() for m in methods.split(",") if m.strip()] if methods else names_where(lambda m: True)
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ConfigError(f"--methods: unknown method '{unknown[0]}': choose from {', '.join(sorted(METHODS))}")
    task = cfg.task or default_task_for(resolve_model_path(cfg.model))
    num_labels = 2 if task == "classification" else None
    # Number of blocks for the defaults (freeze top quarter).

    probe_model, _, info = load_model_and_tokenizer(cfg.model, task, num_labels=num_labels, trust_remote_code=cfg.trust_remote_code)
    num_blocks = find_anatomy(probe_model, cfg.blocks).num_blocks
    del probe_model
    batch = batch_size or cfg.train.batch_size
    rows: dict[str, dict] = {}
    profile = None
    if speed:
        log(f"profiling one full fine-tuning step (batch 1, length {seq}) for the cost model ...")
        profile = _profile(cfg, task, seq, num_labels)
    for name in names:
        mraw = method_defaults(name, num_blocks, (method_overrides or {}).get(name, {}))
        log(f"measuring {name} ...")
        try:
            entry = measure_method(cfg, mraw, task, seq, num_labels=num_labels, log=log)
        except Exception as exc:  # a method that cannot run on this model: reported, not fatal
            rows[name] = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}
            continue
        entry["predicted"] = predict(entry, batch)
        entry["max_batch"] = max_batch(entry, budget)
        entry["fits"] = entry["predicted"]["total"] <= budget
        if profile is not None:
            entry["tokens_per_s"] = tokens_per_s(profile, entry, batch, seq)
            entry["tokens_per_s_at_max_batch"] = tokens_per_s(profile, entry, entry["max_batch"], seq) if entry["max_batch"] else None
        else:
            entry["tokens_per_s"] = None
            entry["tokens_per_s_note"] = "not profiled (--no-speed)"
        rows[name] = entry
    result = {
        "model": cfg.model,
        "model_info": {k: info[k] for k in ("model_type", "num_parameters", "path")},
        "task": task,
        "num_blocks": num_blocks,
        "seq_len": seq,
        "batch_size": batch,
        "budget_bytes": budget,
        "max_steps": cfg.train.max_steps,
        "bf16_autocast": cfg.train.bf16,
        "frozen_dtype": getattr(cfg.train, "frozen_dtype", "fp32"),
        "activation_model": "saved-for-backward bytes (SavedTensorMeter) of one real training step at batch 1 and 2 at seq_len, "
                            "in each method's deepest plan; affine in the batch",
        "memory_total_is": "weights + grads + optimizer + activations, as summary.json memory.total (framework working memory not included)",
        "methods": {n: {k: v for k, v in e.items() if not k.startswith("_")} for n, e in rows.items()},
    }
    log(format_table(result))
    if output is None:  # the table above is the answer; a file only where --output asks for one
        return result
    path = Path(output)
    if path.suffix != ".json":
        path.mkdir(parents=True, exist_ok=True)
        path = path / "plan.json"
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    log(f"plan: {path}")
    return result


def format_table(result: dict) -> str:
    b = result["batch_size"]
    head = (f"model {result['model']} ({result['model_info']['num_parameters'] / 1e6:.1f}M parameters, {result['num_blocks']} blocks), "
            f"length {result['seq_len']}, budget {_short_bytes(result['budget_bytes'])}, predicted peak training memory at batch {b}:")
    cols = ["method", "weights", "grads", "optim", "activ", "total", "fits", "max batch", "tok/s", "tok/s@max"]
    lines = [head, "  ".join(f"{c:>9}" for c in cols)]
    for name, e in result["methods"].items():
        if "error" in e:
            lines.append(f"{name:>9}  not predicted: {e['error']}")
            continue
        p = e["predicted"]
        tps = e.get("tokens_per_s")
        tpm = e.get("tokens_per_s_at_max_batch")
        vals = [name, _short_bytes(p["weights"]), _short_bytes(p["grads"]), _short_bytes(p["optimizer"]), _short_bytes(p["activations"]), _short_bytes(p["total"]),
                "yes" if e["fits"] else "no", str(e["max_batch"]), f"{tps:.0f}" if tps else "-", f"{tpm:.0f}" if tpm else "-"]
        lines.append("  ".join(f"{v:>9}" for v in vals))
    return "\n".join(lines)
