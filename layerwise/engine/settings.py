"""The training loop's settings (``train:`` in a config), shared by every method."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from layerwise.errors import ConfigError
from layerwise.tracking import TRACKERS


@dataclass
class TrainConfig:
    """Optimisation and loop settings shared by every method."""

    max_steps: int = 300
    """Optimizer steps (each one ``grad_accum`` micro-batches)."""
    batch_size: int = 16
    grad_accum: int = 1
    lr: float | None = None
    """Peak learning rate; None: the method's own default (its config's ``default_lr``, docs/quality.md)."""
    weight_decay: float = 0.01
    warmup_steps: int = 20
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float | None = 1.0
    bf16: bool = False
    """bf16 autocast for forward and backward (weights and optimizer stay fp32)."""
    gradient_checkpointing: bool = False
    """Non-reentrant activation checkpointing of every block the gradient crosses, trained or frozen
    (frozen blocks keep dropout off; same loss and gradients)."""
    frozen_dropout: bool = False
    """False: blocks that do not train this step run in eval mode (no dropout), which keeps a
    frozen prefix deterministic and lets attention use its fused kernel (faster than train mode;
    docs/bench-runs.md measures it). True: dropout stays on in every block, as in full fine-tuning."""
    frozen_dtype: Literal["fp32", "bf16", "int8"] = "fp32"
    """bf16: blocks that do not train this step are held in bf16 (active blocks, embeddings and head in
    float32); inputs are cast at block boundaries. int8: their Linear weights are quantized to int8
    (torchao weight-only, needs frozen_master host or disk); activations stay float32. See docs/beyond.md."""
    frozen_master: Literal["rounded", "host", "disk"] = "rounded"
    """With frozen_dtype=bf16, where a block's float32 value comes from when it becomes active:
    its bf16 value (rounded), a float32 copy kept in host memory (host; counted in weights on CPU),
    or a float32 copy in a file per frozen block on disk (disk; no memory, disk I/O at each switch)."""
    frozen_master_dir: str | None = None
    """frozen_master=disk: the folder under which the run's scratch folder of float32 masters is made
    (default: the system temp folder); the scratch folder is removed when the run ends."""
    fused_optimizer: bool = True
    """AdamW through torch's fused kernel on CPU and CUDA (``torch.optim.AdamW(fused=True)``): the same
    update up to float rounding, one kernel over all active parameters. False: torch's default
    implementation. FSDP runs use the default."""
    optimizer_state: Literal["reset", "keep"] = "reset"
    """On a switch, drop the leaving parameters' optimizer state (reset) or stash it and restore it when they return (keep)."""
    seed: int = 0
    eval_batch_size: int = 64
    eval_before: bool = True
    eval_after: bool = True
    sample_generations: int = 2
    """causal_lm: greedy completions of the first N held-out prompts, before and after training, in summary.json
    (``samples``), the console and the model card; 0 = none. Not with train.fsdp (generation would need every rank)."""
    sample_max_new_tokens: int = 32
    """New tokens of each sample completion."""
    log_every: int = 10
    save_model: bool = True
    save_every: int = 0
    """Write a checkpoint (RUN/checkpoints/step-N, for --resume) every N optimizer steps; 0 = only at the end (see
    checkpoint_at_end) or on a stop."""
    checkpoint_at_end: bool = True
    """Write a checkpoint after the last step; `bench` turns it off (its runs are timed, not kept). A stop, and a
    save_every multiple, still write one."""
    keep_last: int = 2
    """Complete checkpoints kept (older ones are deleted after each save)."""
    device: str = "auto"
    """'auto' (cuda if available, else cpu), 'cpu' or 'cuda'."""
    progress: bool = True
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A NaN/inf loss or gradient: stop the run (naming the step and blocks), or skip that optimizer step."""
    max_skipped_steps: int = 10
    """With on_nonfinite=skip: stop after this many skipped steps in a row."""
    memory_check: bool = True
    """Before training, refuse a run whose estimated peak memory exceeds the free device memory (RAM on CPU)."""
    disk_check: bool = True
    """Before training, refuse a run whose model and checkpoints would not fit on the output disk."""
    fsdp: bool = False
    """Under torchrun / accelerate launch: shard the model with FSDP2 (``fully_shard``, one unit per block, then the
    root) instead of replicating it; methods full, freeze, lift (docs/scale-out.md)."""
    prefix_cache: str | bool = "off"
    """Frozen-prefix cache (docs/beyond.md): ``on`` stores the output of the blocks below every step's lowest
    trainable block once per example and reads it back (refused, with the reason, when the run cannot use it);
    ``auto`` does so when the run can and covers at least two passes over the data; ``off`` never."""
    prefix_cache_dtype: Literal["bf16", "fp32"] = "bf16"
    """Storage dtype of the prefix cache (fp32: exact, twice the size)."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers (tensorboard, trackio, wandb, mlflow): the config as hyperparameters, every logged
    step's loss, lr, tokens/s, memory and active blocks, and the held-out results. Default: none."""
    prefix_cache_dir: str | None = None
    """Root folder of prefix caches; None: ``$LAYERWISE_CACHE/prefix`` (default ``~/.cache/layerwise/prefix``)."""

    def validate(self) -> None:
        for key in ("batch_size", "grad_accum", "eval_batch_size", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key 'train.{key}': {getattr(self, key)} must be at least 1")
        for key in ("max_steps", "warmup_steps"):
            if getattr(self, key) < 0:
                raise ConfigError(f"config key 'train.{key}': {getattr(self, key)} must be 0 or more")
        for key in ("lr", "weight_decay", "max_grad_norm"):
            value = getattr(self, key)
            if value is not None and not (value >= 0 and value != float("inf")):
                raise ConfigError(f"config key 'train.{key}': {value} must be a finite number >= 0")
        if self.sample_generations < 0:
            raise ConfigError(f"config key 'train.sample_generations': {self.sample_generations} must be 0 "
                              "(no samples) or more")
        if self.sample_max_new_tokens < 1:
            raise ConfigError(f"config key 'train.sample_max_new_tokens': {self.sample_max_new_tokens} must be at "
                              "least 1")
        if self.max_skipped_steps < 1:
            raise ConfigError(f"config key 'train.max_skipped_steps': {self.max_skipped_steps} must be at least 1")
        if self.save_every < 0:
            raise ConfigError(f"config key 'train.save_every': {self.save_every} must be 0 (only at the end) or a number of steps")
        if self.keep_last < 1:
            raise ConfigError(f"config key 'train.keep_last': {self.keep_last} must be at least 1")
        if self.frozen_dtype == "fp32" and self.frozen_master != "rounded":
            raise ConfigError(
                f"config key 'train.frozen_master': {self.frozen_master!r} has no effect with train.frozen_dtype=fp32 "
                "(frozen blocks stay float32): set train.frozen_dtype=bf16 or drop train.frozen_master"
            )
        if self.frozen_dtype == "int8" and self.frozen_master == "rounded":
            raise ConfigError(
                "config key 'train.frozen_master': rounded cannot be used with train.frozen_dtype=int8 (a trained block would be "
                "rounded to int8 at every switch): set train.frozen_master=disk (no memory) or host"
            )
        if self.frozen_master_dir is not None and self.frozen_master != "disk":
            raise ConfigError(
                f"config key 'train.frozen_master_dir' is only used with train.frozen_master=disk (it is {self.frozen_master!r}): "
                "set train.frozen_master=disk or drop train.frozen_master_dir"
            )
        unknown = [name for name in self.report_to if name not in TRACKERS]
        if unknown:
            raise ConfigError(f"config key 'train.report_to': '{unknown[0]}' is not a tracker: choose from {', '.join(TRACKERS)}")
        if isinstance(self.prefix_cache, bool):  # YAML reads a bare on/off as true/false
            self.prefix_cache = "on" if self.prefix_cache else "off"
        if self.prefix_cache not in ("off", "auto", "on"):
            raise ConfigError(
                f"config key 'train.prefix_cache': {self.prefix_cache!r} is not one of off, auto, on "
                "(the frozen-prefix cache: off never, on always or refuse, auto when the run can use it)"
            )
