"""``lisa``: the LISA peer (LMFlow): ``k`` random blocks every ``switch_every`` steps,
embeddings and head trained always (the reference) or never. Unlike the reference, the optimizer
owns only the active parameters, and blocks chosen at step 0 train too."""

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from layerwise.errors import ConfigError
from layerwise.methods.base import Method, Plan, seeded_generator
from layerwise.methods.registry import register


@dataclass
class LisaConfig:
    name: str = "lisa"
    default_lr: ClassVar[float] = 0.0003
    """train.lr when the config leaves it unset (chosen by the screen in docs/quality.md)."""
    k: int = 2
    switch_every: int = 20
    embeddings: Literal["always", "never"] = "always"
    """never: the embeddings stay frozen, so backward stops at the lowest chosen block (as lift's default)."""
    head: Literal["always", "never"] = "always"

    def validate(self) -> None:
        if self.k < 1 or self.switch_every < 1:
            raise ConfigError("method.k and method.switch_every must be at least 1")


@register
class Lisa(Method):
    name = "lisa"
    Config = LisaConfig
    switching = plan_known_ahead = trainer_ok = True

    @classmethod
    def fit_schedule(cls, num_blocks: int, steps: int, given: dict) -> dict:
        # As many phases as disjoint groups of k blocks, so the run sees about one pass of the stack.
        return {"switch_every": max(1, steps // max(1, num_blocks // given.get("k", LisaConfig.k)))}

    def __init__(self, config, anatomy, **kw):
        super().__init__(config, anatomy, **kw)
        if config.k > self.num_blocks:
            raise ConfigError(f"method.k={config.k} exceeds the model's {self.num_blocks} blocks: use 1..{self.num_blocks}")

    def plan(self, step: int) -> Plan:
        phase = step // self.config.switch_every
        perm = torch.randperm(self.num_blocks, generator=seeded_generator(self.seed, 7, phase))
        blocks = tuple(sorted(perm[: self.config.k].tolist()))
        return Plan(blocks, embeddings=self.config.embeddings == "always", head=self.config.head == "always")
