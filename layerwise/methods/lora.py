"""``lora``: LoRA through ``peft``, the standard PEFT baseline. Only adapter weights (and a
new task head) train; backward still runs to the first block."""

from dataclasses import dataclass
from typing import ClassVar

from layerwise.methods.adapters import AdapterConfig, inject
from layerwise.methods.base import Method, Plan, all_blocks
from layerwise.methods.registry import register


@dataclass
class LoraConfig(AdapterConfig):
    name: str = "lora"
    default_lr: ClassVar[float] = 0.003
    """train.lr when the config leaves it unset (chosen by the screen in docs/quality.md)."""


@register
class Lora(Method):
    name = "lora"
    Config = LoraConfig
    adapter_only = True
    trainer_ok = True
    fsdp_refusal = ("fails here (torch 2.13, CPU/gloo: the first backward finds a loss that does not require grad, "
                    "see docs/scale-out.md): set train.fsdp=false; LoRA's trainable set is small, plain data parallel suits it")

    def prepare(self, model):
        model = inject(model, self.config, self.task)
        self.adapter_params = {id(p) for p in model.parameters() if p.requires_grad}
        return model

    def plan(self, step: int) -> Plan:
        return Plan(all_blocks(self.anatomy), embeddings=True, head=True)
