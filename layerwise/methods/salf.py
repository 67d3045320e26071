"""``salf``: semantic-aware layer freezing. A probe decides where to fine-tune; blocks below the
cut are frozen (backward stops there), the blocks at and above it train (or, with
``adapter: lora``, only their LoRA weights).

The cut: ``k*`` from the probe (:mod:`layerwise.probe`, docs/salf.md), or with ``budget: B``
the top ``m_B`` blocks whose estimated backward cost fits in ``B`` of full fine-tuning. The
probe runs in :meth:`Salf.prepare` on ``samples`` training examples (``probe: null``) or is read
from a ``probe.json`` written by ``layerwise probe``. ``probe.json``/``probe.png`` go to the run
folder and the cut to ``summary.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError
from .base import Method, Plan
from .lora import LoraConfig, wrap_with_lora
from .registry import register


@dataclass
class SalfConfig:
    name: str = "salf"
    probe: str | None = None
    """Path of a probe.json (from ``layerwise probe``); None: probe at the start of the run."""
    samples: int = 512
    """Training examples the probe uses when it runs at the start."""
    budget: float | None = None
    """Fraction of full fine-tuning's backward cost; None: train from the recommended cut k*."""
    adapter: Literal["none", "lora"] = "none"
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | None = None
    """LoRA: module names to adapt (None: peft's default for the architecture)."""
    head: bool = True
    embeddings: bool = False
    """Train the embeddings too (backward then runs through every block)."""

    def validate(self) -> None:
        if self.samples < 8:
            raise ConfigError(f"method.samples must be at least 8 (the probe fits on half and scores on the other), got {self.samples}")
        if self.budget is not None and not 0 < self.budget <= 1:
            raise ConfigError(f"method.budget must be a fraction in (0, 1] of full fine-tuning's backward cost, got {self.budget}")
        if self.r < 1:
            raise ConfigError(f"method.r must be at least 1, got {self.r}")


@register
class Salf(Method):
    name = "salf"
    Config = SalfConfig

    def __init__(self, config, anatomy, **kw):
        super().__init__(config, anatomy, **kw)
        # An instance attribute: with LoRA only adapter weights (and a peft-saved head) train.
        self.adapter_only = config.adapter == "lora"
        self.probe: dict | None = None
        self.cut: int | None = None
        self.cut_source = ""
        if config.probe is not None:
            from ..probe import load_probe

            self._set_probe(load_probe(config.probe, self.num_blocks))

    @property
    def task_name(self) -> str:
        return getattr(self, "task", None) or (self.context.task if self.context else "classification")

    def _set_probe(self, probe: dict) -> None:
        from ..probe import choose_cut

        self.probe = probe
        self.cut, self.cut_source = choose_cut(probe, self.config.budget)

    def prepare(self, model):
        if self.probe is None:
            from ..probe import format_table, run_probe, sample_batches

            ctx = self.context
            if ctx is None or ctx.train_loader is None:
                raise ConfigError("method salf needs training data to probe: run it through `layerwise train` or set method.probe to a probe.json")
            import torch

            # Iterating a DataLoader draws from the global RNG: keep the training's random stream
            # (dropout, ...) exactly as without the probe, so salf == freeze on the same blocks.
            with torch.random.fork_rng(devices=[]):
                probe = run_probe(
                    model, self.anatomy, sample_batches(ctx.train_loader, self.config.samples), self.task_name,
                    budget=self.config.budget, seed=self.seed,
                )
            print(format_table(probe))
            self._set_probe(probe)
        if self.config.adapter == "lora":
            cfg = LoraConfig(r=self.config.r, alpha=self.config.alpha, dropout=self.config.dropout, target_modules=self.config.target_modules)
            model = wrap_with_lora(model, cfg, self.task_name)
            self.adapter_params = {id(p) for p in model.parameters() if p.requires_grad}
        return model

    @property
    def blocks(self) -> tuple[int, ...]:
        if self.cut is None and self.config.budget is not None:
            # Known without data (cost model only): lets cost predictions call plan() before prepare().
            from ..probe import budget_blocks, cost_fractions, head_units

            m = budget_blocks(cost_fractions(self.num_blocks, head_units(self.anatomy, self.task_name)), self.config.budget)
            return tuple(range(self.num_blocks - m, self.num_blocks))
        if self.cut is None:
            raise RuntimeError("salf: the cut is not known before the probe ran (set method.budget or method.probe to plan without data)")
        return tuple(range(self.cut, self.num_blocks))

    def plan(self, step: int) -> Plan:
        return Plan(self.blocks, embeddings=self.config.embeddings, head=self.config.head)

    def finish(self, output) -> dict:
        from ..probe import write_outputs

        out = {"salf": {"cut": self.cut, "cut_from": self.cut_source, "train_blocks": list(self.blocks), "frozen_blocks": list(range(self.cut))}}
        if self.probe is not None:
            out["salf"]["k_star"] = self.probe["recommendation"]["k_star"]
            if output is not None:
                out["salf"]["probe"] = write_outputs(self.probe, output)
        return out
