"""``salf``: semantic-aware layer freezing. A probe decides where to fine-tune; blocks below the
cut are frozen (backward stops there), the blocks at and above it train (or, with
``adapter: lora``, only their LoRA weights).

The cut: ``k*`` from the probe (:mod:`layerwise.methods.salf.probe`, docs/salf.md), or with ``budget: B``
the top ``m_B`` blocks whose estimated backward cost fits in ``B`` of full fine-tuning. The
probe runs in :meth:`Salf.prepare` on ``samples`` training examples (``probe: null``; in
:meth:`Salf.data_ready` when the data comes later, as inside ``transformers.Trainer``) or is read
from a ``probe.json`` written by ``layerwise probe``. ``probe.json``/``probe.png`` go to the run
folder and the cut to ``summary.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from layerwise.engine.meter import PeakMemory
from layerwise.errors import ConfigError
from layerwise.methods.adapters import AdapterConfig, inject
from layerwise.methods.base import Method, Plan
from layerwise.methods.registry import register
from layerwise.methods.salf.probe import (
    budget_blocks,
    check_budget,
    choose_cut,
    cost_fractions,
    format_table,
    head_units,
    load_probe,
    run_probe,
    sample_batches,
    write_outputs,
)


@dataclass
class SalfConfig(AdapterConfig):
    name: str = "salf"
    default_lr: ClassVar[float] = 0.0001
    """train.lr when the config leaves it unset (chosen by the screen in docs/quality.md)."""
    probe: str | None = None
    """Path of a probe.json (from ``layerwise probe``); None: probe at the start of the run."""
    samples: int = 512
    """Training examples the probe uses when it runs at the start."""
    budget: float | None = None
    """Fraction of full fine-tuning's backward cost; None: train from the recommended cut k*."""
    adapter: Literal["none", "lora"] = "none"
    """lora: only LoRA weights (r, alpha, dropout, target_modules) train in the blocks above the cut."""
    head: bool = True
    embeddings: bool = False
    """Train the embeddings too (backward then runs through every block)."""

    def validate(self) -> None:
        super().validate()
        if self.samples < 8:
            raise ConfigError(f"method.samples must be at least 8 (the probe fits on half and scores on the other), got {self.samples}")
        check_budget(self.budget, "method.budget")


@register
class Salf(Method):
    name = "salf"
    Config = SalfConfig
    plan_known_ahead = trainer_ok = True

    @classmethod
    def stated_defaults(cls, num_blocks: int, *, with_data: bool, given: dict) -> dict:
        if with_data or given.get("budget") is not None or given.get("probe") is not None:
            return {}
        return {"budget": 0.5}  # without data the cut comes from the cost model alone

    def __init__(self, config, anatomy, **kw):
        super().__init__(config, anatomy, **kw)
        # An instance attribute: with LoRA only adapter weights (and a peft-saved head) train.
        self.adapter_only = config.adapter == "lora"
        self.probe: dict | None = None
        self.cut: int | None = None
        self.cut_source = ""
        if config.probe is not None:
            self._set_probe(load_probe(config.probe, self.num_blocks))

    def _set_probe(self, probe: dict) -> None:
        self.probe = probe
        self.cut, self.cut_source = choose_cut(probe, self.config.budget)

    def prepare(self, model):
        has_data = self.context is not None and self.context.train_loader is not None
        if self.probe is None and not has_data and not self._data_later and self.config.budget is None:
            raise ConfigError("method salf needs training data to probe: run it through `layerwise train` or set method.probe to a probe.json")
        if self.probe is None and has_data:  # without data a budget gives the cut alone (cost model)
            self._probe_training_data(model)
        if self.config.adapter == "lora":
            model = inject(model, self.config, self.task)
            self.adapter_params = {id(p) for p in model.parameters() if p.requires_grad}
        return model

    def data_ready(self, model) -> None:
        if self.probe is None:
            # A LoRA-wrapped model computes the same latents as before (its B matrices start at zero).
            self._probe_training_data(model)

    @property
    def _data_later(self) -> bool:
        return self.context is not None and self.context.data_later

    def _probe_training_data(self, model) -> None:
        # Iterating a DataLoader draws from the global RNG: keep the training's random stream
        # (dropout, ...) exactly as without the probe, so salf == freeze on the same blocks.
        window = PeakMemory(next(model.parameters()).device)
        window.reset()
        with torch.random.fork_rng(devices=[]):
            probe = run_probe(
                model, self.anatomy, sample_batches(self.context.train_loader, self.config.samples), self.task,
                budget=self.config.budget, seed=self.seed,
            )
        self.setup_measured_peak = window.peak_above_baseline()
        print(format_table(probe))
        self._set_probe(probe)

    @property
    def blocks(self) -> tuple[int, ...]:
        if self.cut is None and self.config.budget is not None:
            # Known without data (cost model only): lets cost predictions call plan() before prepare().
            m = budget_blocks(cost_fractions(self.num_blocks, head_units(self.anatomy, self.task)), self.config.budget)
            return tuple(range(self.num_blocks - m, self.num_blocks))
        if self.cut is None and self._data_later:
            return ()  # no block until data_ready() has probed the data and set the cut
        if self.cut is None:
            raise RuntimeError("salf: the cut is not known before the probe ran (set method.budget or method.probe to plan without data)")
        return tuple(range(self.cut, self.num_blocks))

    def plan(self, step: int) -> Plan:
        return Plan(self.blocks, embeddings=self.config.embeddings, head=self.config.head)

    def finish(self, output) -> dict:
        cut = self.num_blocks - len(self.blocks)  # also when the cut came from the budget alone (no probe ran)
        out = {"salf": {"cut": cut, "cut_from": self.cut_source or "budget", "train_blocks": list(self.blocks),
                        "frozen_blocks": list(range(cut))}}
        if self.probe is not None:
            out["salf"]["k_star"] = self.probe["recommendation"]["k_star"]
            if output is not None:
                out["salf"]["probe"] = write_outputs(self.probe, output)
        return out

    # -- resume: the probe (and so the cut) comes back without probing again ------------------
    def state_dict(self) -> dict:
        return {"probe": self.probe}

    def load_state_dict(self, state: dict) -> None:
        if state.get("probe") is not None:
            self._set_probe(state["probe"])
