"""``full``: every parameter trains (the baseline)."""

from dataclasses import dataclass

from .base import Method, Plan, all_blocks
from .registry import register


@dataclass
class FullConfig:
    name: str = "full"


@register
class Full(Method):
    name = "full"
    Config = FullConfig

    def plan(self, step: int) -> Plan:
        return Plan(all_blocks(self.anatomy), embeddings=True, head=True)
