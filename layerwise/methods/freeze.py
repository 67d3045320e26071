"""``freeze``: a fixed set of blocks trains (``layers: [..]``, ``top: k`` or ``bottom: k``)."""

from dataclasses import dataclass
from typing import ClassVar

from layerwise.errors import ConfigError
from layerwise.methods.base import Method, Plan
from layerwise.methods.registry import register


@dataclass
class FreezeConfig:
    name: str = "freeze"
    default_lr: ClassVar[float] = 0.003
    """train.lr when the config leaves it unset (chosen by the screen in docs/quality.md)."""
    layers: list[int] | None = None
    top: int | None = None
    bottom: int | None = None
    embeddings: bool = False
    head: bool = True

    def validate(self) -> None:
        given = [k for k in ("layers", "top", "bottom") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError(
                "method freeze needs exactly one of method.layers, method.top or method.bottom "
                f"(got {', '.join(given) or 'none'}): for example --set method.top=2"
            )
        for k in ("top", "bottom"):
            v = getattr(self, k)
            if v is not None and v < 1:
                raise ConfigError(f"method.{k} must be at least 1, got {v}")


@register
class Freeze(Method):
    name = "freeze"
    Config = FreezeConfig
    plan_known_ahead = trainer_ok = fsdp_ok = True

    @classmethod
    def stated_defaults(cls, num_blocks: int, *, with_data: bool, given: dict) -> dict:
        return {} if {"layers", "top", "bottom"} & set(given) else {"top": max(1, num_blocks // 4)}

    def __init__(self, config, anatomy, **kw):
        super().__init__(config, anatomy, **kw)
        L = self.num_blocks
        if config.layers is not None:
            self.check_blocks(config.layers, "method.layers")
            blocks = sorted(set(config.layers))
        else:
            k = config.top if config.top is not None else config.bottom
            if k > L:
                raise ConfigError(f"method.{'top' if config.top else 'bottom'}={k} exceeds the model's {L} blocks: use 1..{L}")
            blocks = list(range(L - k, L)) if config.top is not None else list(range(k))
        self.blocks = tuple(blocks)

    def plan(self, step: int) -> Plan:
        return Plan(self.blocks, embeddings=self.config.embeddings, head=self.config.head)
