"""Adapters through ``peft``: the settings every adapter method shares and the one function that injects them."""

from __future__ import annotations

from dataclasses import dataclass

from peft import IA3Config, TaskType, get_peft_model
from peft import LoraConfig as PeftLoraConfig

from layerwise.errors import ConfigError


@dataclass
class AdapterConfig:
    """LoRA settings (``lora``, ``salf`` with ``adapter: lora``, ``ist``)."""

    r: int = 8
    """Rank (lora, dora)."""
    alpha: int = 16
    """Scaling numerator: the adapter output is multiplied by alpha / r (lora, dora)."""
    dropout: float = 0.05
    """Adapter dropout (lora, dora)."""
    target_modules: list[str] | None = None
    """Module names to adapt; None = peft's default for the architecture."""

    def validate(self) -> None:
        if self.r < 1:
            raise ConfigError(f"method.r must be at least 1, got {self.r}")


def inject(model, config: AdapterConfig, task: str, *, kind: str = "lora", feedforward_modules: list[str] | None = None):
    """``model`` wrapped by ``peft`` with ``kind`` adapters (lora, dora, ia3); only their weights (and a new head) train."""
    task_type = TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM
    if kind == "ia3":
        ff = feedforward_modules
        if ff is None and config.target_modules is not None:
            ff = []  # peft's default feed-forward names need not be among the user's targets
        peft_cfg = IA3Config(target_modules=config.target_modules, feedforward_modules=ff, task_type=task_type)
    else:
        peft_cfg = PeftLoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                  target_modules=config.target_modules, use_dora=kind == "dora", task_type=task_type)
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as exc:
        raise ConfigError(
            f"{kind} could not be applied: {str(exc).splitlines()[0]}; set method.target_modules to module names of this model"
        ) from None
