"""``lift``: LIFT, layer-wise fine-tuning. ``k`` adjacent blocks train at a time and the
active group moves every ``switch_every`` optimizer steps on a schedule (``bottom_up``,
``top_down``, ``random``). Embeddings and head are trained ``always``, ``never``, or as
their own ``phase`` in the rotation. Backward stops at the active group.
"""

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from layerwise.errors import ConfigError
from layerwise.methods.base import Method, Plan, seeded_generator
from layerwise.methods.registry import register

Policy = Literal["always", "never", "phase"]


@dataclass
class LiftConfig:
    name: str = "lift"
    default_lr: ClassVar[float] = 0.001
    """train.lr when the config leaves it unset (chosen by the screen in docs/quality.md)."""
    k: int = 1
    """Blocks trained together in one phase."""
    schedule: Literal["bottom_up", "top_down", "random"] = "top_down"
    switch_every: int | None = None
    """Optimizer steps per phase; None: train.max_steps split evenly over the phases, so the run makes one whole pass
    (what is left over starts the next pass; 25 where the run's length is not known)."""
    embeddings: Policy = "never"
    head: Policy = "always"

    def validate(self) -> None:
        if self.k < 1:
            raise ConfigError(f"method.k must be at least 1, got {self.k}")
        if self.switch_every is not None and self.switch_every < 1:
            raise ConfigError(f"method.switch_every must be at least 1, got {self.switch_every}")


#: switch_every when the run's length is not known (a Trainer run by epochs).
UNKNOWN_LENGTH_SWITCH_EVERY = 25


def _phase_name(phase: object) -> str:
    """A phase as the run states it: block 3, blocks 2-3, embeddings, head."""
    if not isinstance(phase, tuple):
        return str(phase)
    return f"block {phase[0]}" if len(phase) == 1 else f"blocks {phase[0]}-{phase[-1]}"


def _phase_count(num_blocks: int, settings: dict) -> int:
    """Phases of one pass: the groups of ``k`` blocks, plus the embeddings and the head where they are a phase."""
    groups = -(-num_blocks // settings.get("k", LiftConfig.k))
    return groups + sum(settings.get(part) == "phase" for part in ("embeddings", "head"))


@register
class Lift(Method):
    name = "lift"
    Config = LiftConfig
    switching = plan_known_ahead = trainer_ok = fsdp_ok = True

    @classmethod
    def fit_schedule(cls, num_blocks: int, steps: int, given: dict) -> dict:
        # One pass of the whole schedule within the run: every phase active equally often.
        return {"switch_every": max(1, steps // _phase_count(num_blocks, given))}

    @classmethod
    def pass_steps(cls, num_blocks: int, settings: dict) -> int:
        # Without switch_every the schedule is fitted to the run's steps: one pass whenever the steps allow one.
        every = settings.get("switch_every")
        return None if every is None else _phase_count(num_blocks, settings) * every

    def __init__(self, config, anatomy, **kw):
        super().__init__(config, anatomy, **kw)
        L = self.num_blocks
        if config.k > L:
            raise ConfigError(f"method.k={config.k} exceeds the model's {L} blocks: use 1..{L}")
        groups = [tuple(range(s, min(s + config.k, L))) for s in range(0, L, config.k)]
        phases: list[object] = list(groups)
        if config.embeddings == "phase":
            phases.insert(0, "embeddings")
        if config.head == "phase":
            phases.append("head")
        if config.schedule == "top_down":
            phases.reverse()
        self.phases = phases
        fitted = max(1, self.max_steps // len(phases)) if self.max_steps > 0 else UNKNOWN_LENGTH_SWITCH_EVERY
        self.switch_every = config.switch_every or fitted

    def prepare(self, model):
        # Say which blocks the run reaches: a pass longer than the run never trains the phases it ends before.
        names = [_phase_name(p) for p in self.phases]
        reached = -(-self.max_steps // self.switch_every) if self.max_steps > 0 else None  # phases given a step
        if reached is not None and reached < len(self.phases) and self.config.schedule != "random":
            fix = "raise method.k" if self.switch_every == 1 else "lower method.switch_every"
            print(f"lift: {self.max_steps} steps of {self.switch_every} per phase reach {reached} of the {len(self.phases)} phases, "
                  f"so {', '.join(names[reached:])} {'is' if len(names) - reached == 1 else 'are'} never trained: raise train.max_steps to {len(self.phases) * self.switch_every} or {fix}")
        else:
            passes = f", {self.max_steps / (len(self.phases) * self.switch_every):.2f} passes in {self.max_steps} steps" if reached else ""
            print(f"lift: {len(self.phases)} phases of {self.switch_every} steps ({self.config.schedule}: {' -> '.join(names)}){passes}")
        return model

    def phase_at(self, step: int) -> object:
        index = step // self.switch_every
        n = len(self.phases)
        if self.config.schedule != "random":
            return self.phases[index % n]
        # A fresh seeded permutation per cycle: every phase once per cycle, in random order.
        cycle, pos = divmod(index, n)
        perm = torch.randperm(n, generator=seeded_generator(self.seed, cycle)).tolist()
        return self.phases[perm[pos]]

    def plan(self, step: int) -> Plan:
        phase = self.phase_at(step)
        emb = self.config.embeddings == "always" or phase == "embeddings"
        head = self.config.head == "always" or phase == "head"
        blocks = phase if isinstance(phase, tuple) else ()
        return Plan(blocks, embeddings=emb, head=head)
