"""Typed run configuration: YAML + ``--set key=value`` overrides, validated, unknown keys rejected.

Every section is a dataclass. :func:`build` turns a nested dict into the dataclass and
fails with a :class:`~layerwise.errors.ConfigError` that names the offending key, the
valid keys and how to fix it; nothing is silently ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .data import DataConfig
from .errors import ConfigError


@dataclass
class TrainConfig:
    """Optimisation and loop settings shared by every method."""

    max_steps: int = 300
    """Optimizer steps (each one ``grad_accum`` micro-batches)."""
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-4
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
    frozen prefix deterministic and lets attention use its fused kernel (on CPU, a MiniLM
    forward in train mode measured ~1.8x slower than in eval mode). True: dropout stays on in
    every block, as in full fine-tuning."""
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
    update up to float rounding, one kernel over all active parameters (3.7M parameters on 2 CPU
    cores: 1.6 ms instead of 11 ms a step). False: torch's default implementation. FSDP runs use the default."""
    optimizer_state: Literal["reset", "keep"] = "reset"
    """On a switch, drop the leaving parameters' optimizer state (reset) or stash it and restore it when they return (keep)."""
    seed: int = 0
    eval_batch_size: int = 64
    eval_before: bool = True
    eval_after: bool = True
    log_every: int = 10
    save_model: bool = True
    save_every: int = 0
    """Write a checkpoint (RUN/checkpoints/step-N, for --resume) every N optimizer steps; 0 = only at the end or on a stop."""
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
        if isinstance(self.prefix_cache, bool):  # YAML reads a bare on/off as true/false
            self.prefix_cache = "on" if self.prefix_cache else "off"
        if self.prefix_cache not in ("off", "auto", "on"):
            raise ConfigError(
                f"config key 'train.prefix_cache': {self.prefix_cache!r} is not one of off, auto, on "
                "(the frozen-prefix cache: off never, on always or refuse, auto when the run can use it)"
            )


@dataclass
class RunConfig:
    """A whole run. ``method`` is a mapping whose ``name`` selects a registered method; its other keys are that method's typed config."""

    model: str = "minilm"
    task: Literal["classification", "causal_lm"] | None = None
    blocks: str | None = None
    """Dotted path of the transformer blocks (nn.ModuleList) for architectures layerwise does not know."""
    trust_remote_code: bool = False
    output: str | None = None
    method: dict = field(default_factory=lambda: {"name": "lift"})
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert the lossless cases (int -> float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        # An exact type match wins, so `float | int` keeps 1000 an int.
        args = sorted(args, key=lambda a: type(value) is not a)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"config key '{key}': {value!r} is not a valid {' or '.join(_type_name(a) for a in args)}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(map(str, args))}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(v, args[0] if args else Any, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    return value


def build(cls: type, values: dict | None, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``values``; unknown keys and wrong types raise ConfigError."""
    values = {} if values is None else values
    if dataclasses.is_dataclass(values) and isinstance(values, cls):
        return values
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{prefix or 'root'}' must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key '{where}{unknown[0]}': valid keys{' in ' + prefix if prefix else ''} are "
            f"{', '.join(sorted(fields))}; fix the spelling or remove it"
        )
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config section '{prefix or 'root'}': {exc}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value parsed as YAML scalar/list)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value (for example --set train.lr=3e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key: write section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({exc.__class__.__name__})") from None
    # YAML reads 3e-4 as a string (no dot); accept it as the number the user meant.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in "eE.") else value
        except ValueError:
            pass
    return key.split("."), value


def set_path(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set '{'.'.join(path)}': '{part}' is not a section")
        node = child
    node[path[-1]] = value


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{path}' does not exist: pass an existing YAML file or omit it to use the defaults")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys (model:, method:, data:, train:)")
    return data


def resolve(raw: dict) -> tuple[RunConfig, Any]:
    """Validate a raw config tree: returns the RunConfig and the method's typed config."""
    from .methods import method_config

    raw = dict(raw)
    method = raw.get("method", {"name": "lift"})
    if isinstance(method, str):
        method = {"name": method}
    raw["method"] = method
    cfg = build(RunConfig, raw)
    mcfg = method_config(cfg.method)
    return cfg, mcfg


def to_dict(cfg: Any) -> Any:
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg
