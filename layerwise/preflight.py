"""Checks before training: will the run fit in memory and on disk, and do written paths stay in the run folder?

:func:`estimate` gives the peak training memory of a prepared run (weights + gradients + AdamW
state for the largest trainable set the method will use + a rough activation estimate) and the
size of its checkpoints and final model. :func:`check_resources` compares them with the free
device memory (``torch.cuda.mem_get_info``; on CPU ``MemAvailable`` from ``/proc/meminfo``) and
the free space on the output filesystem, and raises :class:`~layerwise.errors.ResourceError`
with the estimate and what would fit, before anything is written.
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from layerwise.engine.meter import format_bytes
from layerwise.errors import ConfigError, ResourceError

MiB = 2**20
#: Overrides the CPU bf16 detection: ``1`` (has bf16 matrix units) or ``0`` (has not).
CPU_BF16_ENV = "LAYERWISE_CPU_BF16"


def inside(root: str | Path, name: str) -> Path:
    """``root / name`` for a name that comes from a config: refused when it would land outside ``root``."""
    root_path = Path(root).resolve()
    target = (root_path / str(name)).resolve()
    if not str(name) or os.sep in str(name) or (os.altsep and os.altsep in str(name)) or target.parent != root_path:
        raise ConfigError(f"name '{name}' would write outside '{root}': use a plain file name (no '/', '..')")
    return root_path / str(name)


@dataclass
class Estimate:
    weights: int
    grads: int
    optimizer: int
    activations: int
    activations_per_example: int
    trainable_max: int
    checkpoint: int
    model: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def _sampled_steps(max_steps: int, n: int = 64) -> list[int]:
    if max_steps <= n:
        return list(range(max(max_steps, 1)))
    return sorted({round(i * (max_steps - 1) / (n - 1)) for i in range(n)})


def _max_trainable(method, max_steps: int) -> tuple[int, int, int]:
    """(largest trainable element count, its bytes, bytes of every parameter that ever trains) over sampled steps.

    Plans are pure functions of the step for most methods; the RNG states are restored anyway so
    that sampling them never changes the run.
    """
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    cached = getattr(method, "_current", None)  # IST caches the plan of the current step
    try:
        best_n = best_bytes = 0
        touched: dict[int, int] = {}
        for step in _sampled_steps(max_steps):
            try:
                params = method.parameters(method.plan(step))
            except Exception:  # a method whose plan needs the trainer (attached later): plan 0 decides
                if step == 0:
                    raise
                break
            n = sum(p.numel() for p in params)
            if n > best_n:
                best_n, best_bytes = n, sum(p.nbytes for p in params)
            touched.update((id(p), p.nbytes) for p in params)
        return best_n, best_bytes, sum(touched.values())
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        if hasattr(method, "_current"):
            method._current = cached


def _activation_bytes_per_example(config, seq: int, task: str, bf16: bool, checkpointing: bool) -> int:
    """Rough bytes saved for backward per example: ~34*s*h + 5*a*s^2 bytes per layer in 16-bit
    (Korthikanti et al. 2022), doubled in float32, plus the logits for a language model."""
    config = getattr(config, "text_config", None) or config
    h = int(getattr(config, "hidden_size", 0) or getattr(config, "d_model", 0) or getattr(config, "n_embd", 0) or 768)
    layers = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0) or getattr(config, "num_layers", 0) or 12)
    heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 0) or 12)
    width = 1 if bf16 else 2
    per_layer = (34 * seq * h + 5 * heads * seq * seq) * width
    total = (2 * seq * h * width * layers + per_layer) if checkpointing else per_layer * layers
    if task == "causal_lm":
        total += 2 * seq * int(getattr(config, "vocab_size", 0) or 32000) * 4  # logits and their softmax, float32
    return int(total)


def estimate(model, method, cfg, task: str) -> Estimate:
    """Peak training memory and disk footprint of a prepared run (``cfg``: the RunConfig)."""
    tcfg = cfg.train
    weights = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
    n, nbytes, touched = _max_trainable(method, tcfg.max_steps)
    per_example = _activation_bytes_per_example(model.config, cfg.data.max_length, task, tcfg.bf16, tcfg.gradient_checkpointing)
    optimizer = 2 * n * 4  # AdamW: two float32 moments per trainable element
    # A checkpoint holds every parameter that has trained so far and the optimizer state; the final model all weights.
    checkpoint = touched + optimizer
    final = weights * (2 if hasattr(model, "merge_and_unload") else 1) if tcfg.save_model else 0
    return Estimate(
        weights=weights, grads=nbytes, optimizer=optimizer, activations=per_example * tcfg.batch_size,
        activations_per_example=per_example, trainable_max=n, checkpoint=checkpoint, model=final,
    )


def available_memory(device: torch.device) -> tuple[int | None, str]:
    """Free bytes for training on ``device`` and what they are (None: unknown, no check)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free memory on {device}"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available RAM (MemAvailable)"
    except OSError:
        pass
    return None, "available RAM"


def free_disk(path: Path) -> int | None:
    """Free bytes on the filesystem that will hold ``path`` (its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p.parent != p:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def checkpoint_copies(tcfg) -> int:
    """Most checkpoints on disk at once: keep_last, plus the one being written."""
    saves = (tcfg.max_steps // tcfg.save_every if tcfg.save_every else 0) + 1
    return min(tcfg.keep_last + 1, saves)


def check_length(model, cfg) -> None:
    """data.max_length must fit the model's position embeddings (a longer batch fails mid-run)."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(limit, int) and limit > 0 and cfg.data.max_length > limit:
        raise ConfigError(f"config key 'data.max_length': {cfg.data.max_length} is longer than the model's {limit} positions: use at most {limit}")


def check_resources(est: Estimate, cfg, device: torch.device, output: Path, *, log=None) -> None:
    """Refuse (ResourceError) a run that cannot fit in memory or on the output disk."""
    tcfg = cfg.train
    if log is not None:
        log(
            f"estimated peak training memory {format_bytes(est.total)} (weights {format_bytes(est.weights)}, grads {format_bytes(est.grads)}, "
            f"optimizer {format_bytes(est.optimizer)}, activations ~{format_bytes(est.activations)}); checkpoint ~{format_bytes(est.checkpoint)}"
            + (f", final model ~{format_bytes(est.model)}" if est.model else "")
        )
    if tcfg.memory_check:
        free, what = available_memory(device)
        # On CPU the weights are already loaded (they are part of the process); on CUDA they move there next.
        resident = est.weights if device.type != "cuda" else 0
        need = est.total - resident
        if free is not None and need > free:
            fixed = need - est.activations
            fits = int((free - fixed) // max(est.activations_per_example, 1)) if free > fixed else 0
            if fits >= 1:
                hint = (
                    f"train.batch_size={min(fits, tcfg.batch_size - 1)} would fit (raise train.grad_accum to keep the effective batch)"
                    + ("" if tcfg.gradient_checkpointing else ", or train.gradient_checkpointing=true")
                )
            else:
                hint = (
                    f"even batch size 1 does not fit: the weights, gradients and optimizer state alone need {format_bytes(fixed)}; "
                    f"train fewer parameters (lora, lift, freeze) or use a smaller model"
                )
            raise ResourceError(
                f"the run needs about {format_bytes(need)} ({format_bytes(est.total)} peak: weights {format_bytes(est.weights)}, grads {format_bytes(est.grads)}, "
                f"optimizer {format_bytes(est.optimizer)}, activations ~{format_bytes(est.activations)} for batch {tcfg.batch_size} x "
                f"{cfg.data.max_length} tokens) but {what} is {format_bytes(free)}: {hint}; or set train.memory_check=false to try anyway"
            )
    if tcfg.disk_check:
        need = est.model + est.checkpoint * checkpoint_copies(tcfg)
        free = free_disk(output)
        if free is not None and need > free:
            raise ResourceError(
                f"the output disk of '{output}' has {format_bytes(free)} free but the run writes about {format_bytes(need)} "
                f"(final model {format_bytes(est.model)}, {checkpoint_copies(tcfg)} checkpoint(s) of {format_bytes(est.checkpoint)}): "
                f"free disk space, pass another --output, lower train.keep_last, or set train.save_model=false; "
                f"or train.disk_check=false to try anyway"
            )


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX), as oneDNN sees it.

    Without those units (AVX2-only CPUs) a bf16 matrix product falls back to a scalar path that is
    tens of times slower than float32. oneDNN honours ``ONEDNN_MAX_CPU_ISA``, so
    ``ONEDNN_MAX_CPU_ISA=AVX2`` makes an AMX machine answer as an AVX2 one;
    ``LAYERWISE_CPU_BF16=0|1`` overrides the answer.
    """
    forced = os.environ.get(CPU_BF16_ENV, "")
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise ConfigError(f"{CPU_BF16_ENV}='{forced}': use 1 (the CPU has bf16 units) or 0 (it has not), or unset it")
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN: no fast bf16 path either
        return False


def bf16_slowdown(n: int = 256, reps: int = 3) -> float:
    """How many times slower an ``n``^3 bf16 matrix product runs than a float32 one here (medians)."""
    seconds = {}
    gen = torch.Generator().manual_seed(0)  # leaves the global stream (the run's seed) untouched
    for dtype in (torch.float32, torch.bfloat16):
        a, b = (torch.rand(n, n, generator=gen).to(dtype) for _ in range(2))
        a @ b  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        seconds[dtype] = statistics.median(times)
    return seconds[torch.bfloat16] / max(seconds[torch.float32], 1e-9)


def warn_slow_bf16(tcfg, device: torch.device, log) -> None:
    """train.bf16 / train.frozen_dtype=bf16 on a CPU without bf16 units: say what it costs, measured here."""
    wants = [k for k, on in (("train.bf16=true", tcfg.bf16), ("train.frozen_dtype=bf16", tcfg.frozen_dtype == "bf16")) if on]
    if not wants or device.type != "cpu" or cpu_has_bf16():
        return
    log(
        f"warning: {' and '.join(wants)} on a CPU without bf16 matrix units "
        f"(torch sees {torch.backends.cpu.get_cpu_capability()}): a bf16 matrix product runs "
        f"{bf16_slowdown():.0f}x slower than float32 here, so this run will be slower, not faster; "
        f"use float32 (train.bf16=false, train.frozen_dtype=fp32), or set {CPU_BF16_ENV}=1 if this CPU does have them"
    )
