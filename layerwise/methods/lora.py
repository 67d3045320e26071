"""``lora``: LoRA through ``peft``, the standard PEFT baseline. Only adapter weights (and a
new task head) train; backward still runs to the first block."""

from dataclasses import dataclass

from peft import LoraConfig as PeftLoraConfig
from peft import TaskType, get_peft_model

from ..errors import ConfigError
from .base import Method, Plan, all_blocks
from .registry import register


@dataclass
class LoraConfig:
    name: str = "lora"
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | None = None
    """Module names to adapt; None = peft's default for the architecture."""

    def validate(self) -> None:
        if self.r < 1:
            raise ConfigError(f"method.r must be at least 1, got {self.r}")


def wrap_with_lora(model, config: LoraConfig, task: str):
    task_type = TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM
    peft_cfg = PeftLoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=config.target_modules,
        task_type=task_type,
    )
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as exc:
        raise ConfigError(f"LoRA could not be applied: {str(exc).splitlines()[0]}; set method.target_modules to module names of this model") from None


@register
class Lora(Method):
    name = "lora"
    Config = LoraConfig
    adapter_only = True

    def prepare(self, model):
        model = wrap_with_lora(model, self.config, self.task)
        self.adapter_params = {id(p) for p in model.parameters() if p.requires_grad}
        return model

    def plan(self, step: int) -> Plan:
        return Plan(all_blocks(self.anatomy), embeddings=True, head=True)
