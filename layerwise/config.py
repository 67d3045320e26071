"""A whole run's configuration: :class:`RunConfig` and :func:`resolve`, which puts the sections together.

The sections live with what they configure: ``data:`` in :mod:`layerwise.data`, ``train:`` in
:mod:`layerwise.engine.settings`, ``method:`` in each method's module; :mod:`layerwise.schema` checks them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from layerwise.data import DataConfig
from layerwise.engine.settings import TrainConfig
from layerwise.methods import default_lr, method_config
from layerwise.schema import build


@dataclass
class RunConfig:
    """A whole run. ``method`` is a mapping whose ``name`` selects a registered method; its other keys are that method's typed config."""

    model: str = "minilm"
    """A packaged name (minilm, smollm2), a local folder, a .gguf file, or a hub id (org/name, from the Hugging Face cache)."""
    model_revision: str | None = None
    """With a hub id: the branch, tag or commit to use (None: main)."""
    task: Literal["classification", "causal_lm"] | None = None
    blocks: str | None = None
    """Dotted path of the transformer blocks (nn.ModuleList) for architectures layerwise does not know."""
    trust_remote_code: bool = False
    output: str | None = None
    method: dict = field(default_factory=lambda: {"name": "lift"})
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def resolve(raw: dict) -> tuple[RunConfig, Any]:
    """Validate a raw config tree: returns the RunConfig and the method's typed config."""
    raw = dict(raw)
    method = raw.get("method", {"name": "lift"})
    if isinstance(method, str):
        method = {"name": method}
    raw["method"] = method
    cfg = build(RunConfig, raw)
    mcfg = method_config(cfg.method)
    if cfg.train.lr is None:
        cfg.train.lr = default_lr(mcfg)
    return cfg, mcfg
