"""``full``: every parameter trains (the baseline)."""

from dataclasses import dataclass
from typing import ClassVar

from layerwise.methods.base import Method, Plan, all_blocks
from layerwise.methods.registry import register


@dataclass
class FullConfig:
    name: str = "full"
    default_lr: ClassVar[float] = 0.0001
    """train.lr when the config leaves it unset (chosen by the screen in docs/quality.md)."""


@register
class Full(Method):
    name = "full"
    Config = FullConfig
    plan_known_ahead = trainer_ok = fsdp_ok = True

    def plan(self, step: int) -> Plan:
        return Plan(all_blocks(self.anatomy), embeddings=True, head=True)
