"""What every method shares: the per-step :class:`Plan` and the :class:`Method` base class.

A method answers one question per optimizer step: which parameters train? The engine
applies the answer (``requires_grad``, optimizer ownership) and autograd does the rest:
blocks below the lowest trainable one get inputs that do not require grad, so they record
no graph and store no activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from layerwise.anatomy import Anatomy
from layerwise.errors import ConfigError


@dataclass
class RunContext:
    """What a run gives a method before training: data to probe with, and where to write.

    ``train_loader(epoch)`` returns a shuffled DataLoader of training batches (dicts of
    tensors with ``labels``); ``eval_loader`` the held-out batches.
    """

    train_loader: Any = None
    eval_loader: Any = None
    tokenizer: Any = None
    output: Any = None
    device: Any = None
    #: ``train_loader`` is set only after :meth:`Method.prepare`, when training begins (inside
    #: ``transformers.Trainer`` the data reaches the callback then), and :meth:`Method.data_ready` is called.
    data_later: bool = False


@dataclass(frozen=True)
class Plan:
    """The trainable set for one optimizer step, by anatomy group."""

    blocks: tuple[int, ...]
    embeddings: bool = False
    head: bool = False

    @property
    def lowest(self) -> int | None:
        """Depth where backward stops: -1 for the embeddings, a block index, ``None`` if only the head trains."""
        if self.embeddings:
            return -1
        return min(self.blocks) if self.blocks else None

    def describe(self) -> str:
        parts = []
        if self.embeddings:
            parts.append("emb")
        if self.blocks:
            parts.append("blocks " + ",".join(map(str, self.blocks)))
        if self.head:
            parts.append("head")
        return "+".join(parts) or "nothing"


class Method:
    """Base class. Subclasses set ``name`` and ``Config``, implement :meth:`plan`, and declare what they can do.

    The engine, the integrations and the benchmarks read the declarations below; none of them keeps
    a list of method names.
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    #: True when only adapter parameters (created in :meth:`prepare`) may train.
    adapter_only: ClassVar[bool] = False
    #: True when the trainable set changes during training (a data-parallel wrapper must follow it).
    switching: ClassVar[bool] = False
    #: True when :meth:`plan` is a pure function of the step, known before training (the prefix cache needs it).
    plan_known_ahead: ClassVar[bool] = False
    #: Runs inside ``transformers.Trainer`` through :class:`layerwise.integrations.hf.LayerwiseCallback`.
    trainer_ok: ClassVar[bool] = False
    #: Trains with ``train.fsdp`` (FSDP2). ``fsdp_refusal``: where a known failure is the reason it does not, the
    #: rest of the sentence "train.fsdp=true with NAME ..." that says so and names the fix.
    fsdp_ok: ClassVar[bool] = False
    fsdp_refusal: ClassVar[str] = ""

    def __init__(self, config: Any, anatomy: Anatomy, *, task: str = "classification", seed: int = 0, max_steps: int = 0):
        self.config = config
        self.anatomy = anatomy
        self.task = task
        self.seed = seed
        self.max_steps = max_steps
        #: The optimizer-state policy on a switch when the method sets its own (``train.optimizer_state`` otherwise).
        self.optimizer_state: str | None = None
        self.adapter_params: set[int] = set()
        #: Bytes the method's own work before training (SALF's probe) raised the process's peak above what it held when
        #: that work began, measured like the training window (peak RSS, or CUDA's allocator); the run's measured peak
        #: is the larger of the two.
        self.setup_measured_peak = 0
        #: Set by the run before :meth:`prepare`: a :class:`RunContext` (data loaders,
        #: tokenizer, output folder, device). ``None`` when a method is used on its own.
        self.context: RunContext | None = None
        self.trainer = None

    # -- hooks -------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> nn.Module:
        """Change the model before training (e.g. inject adapters); return the model to train."""
        return model

    def plan(self, step: int) -> Plan:
        raise NotImplementedError

    def attach(self, trainer) -> None:
        """Called once by the Trainer after it has set up the model, optimizer and data.
        Methods that need the model, the training batches or the device during training
        (IST's importance loop) keep ``trainer`` here."""
        self.trainer = trainer

    def data_ready(self, model: nn.Module) -> None:
        """Called before the first step when ``context.train_loader`` came after :meth:`prepare`
        (``context.data_later``), with the model :meth:`prepare` returned: a method that studies
        the training data before training (SALF's probe) does it here."""

    def before_step(self, step: int) -> None:
        """Called at the start of every optimizer step, before :meth:`plan`; its time is
        counted in the step's time (so a method's own overhead is never hidden)."""

    def recomputed_blocks(self) -> tuple[int, ...]:
        """Blocks whose forward runs again during backward (the cost model charges it)."""
        return ()

    def extra_forward_examples(self, step: int) -> int:
        """Examples :meth:`before_step` runs forward at ``step``, without gradients and in eval mode, beside the
        step's own batch (the cost model charges them at the profiled per-example forward time)."""
        return 0

    def log_values(self) -> dict:
        """Extra values for the current ``metrics.jsonl`` row (JSON-serialisable)."""
        return {}

    def finish(self, output) -> dict:
        """Called after training with the run folder; may write artefacts (plots) there.
        Returns extra entries for ``summary.json``."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    @classmethod
    def stated_defaults(cls, num_blocks: int, *, with_data: bool, given: dict) -> dict:
        """Settings a command that fills in the config for the user (``bench``, ``plan``, the suite) states for
        this method beside the ones ``given``: those without a default, and (``with_data=False``) those that
        stand in for training data."""
        return {}

    @classmethod
    def fit_schedule(cls, num_blocks: int, steps: int, given: dict) -> dict:
        """Schedule settings with which a run of ``steps`` steps covers the whole stack (``bench``, the suite),
        for the settings the user ``given``."""
        return {}

    @classmethod
    def pass_steps(cls, num_blocks: int, settings: dict) -> int | None:
        """Optimizer steps one pass of the schedule takes with ``settings`` (every block it trains in turn trained
        once); None when the method has no such pass (a fixed plan, or random choices)."""
        return None

    # -- shared ------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.anatomy.num_blocks

    def lr_scale(self, p: nn.Parameter) -> float:
        """Multiplier on ``train.lr`` for trainable parameter ``p`` (one of :meth:`lr_scales`)."""
        return 1.0

    def lr_scales(self) -> tuple[float, ...]:
        """Every value :meth:`lr_scale` can return (the optimizer makes a group for each)."""
        return (1.0,)

    def parameters(self, plan: Plan) -> list[nn.Parameter]:
        """The parameters that train under ``plan`` (deduplicated, in model order)."""
        chosen: list[nn.Parameter] = []
        if plan.embeddings:
            chosen += self.anatomy.embedding_parameters()
        for i in plan.blocks:
            chosen += self.anatomy.block_parameters(i)
        if plan.head:
            chosen += self.anatomy.head_parameters()
        seen: set[int] = set()
        out = []
        for p in chosen:
            if id(p) in seen:
                continue
            if self.adapter_only and id(p) not in self.adapter_params:
                continue
            seen.add(id(p))
            out.append(p)
        return out

    def check_blocks(self, blocks: list[int], key: str) -> None:
        last = self.num_blocks - 1
        for b in blocks:
            if not isinstance(b, int) or b < 0 or b > last:
                raise ConfigError(
                    f"{key}: block {b} does not exist; this model has blocks 0..{last} "
                    f"({self.num_blocks} blocks): use indices in that range"
                )


#: The learning rate of a method whose config declares no ``default_lr`` (a method defined outside layerwise).
FALLBACK_LR = 3e-4


def default_lr(config: Any) -> float:
    """train.lr when the config leaves it unset: the method config's ``default_lr`` (docs/quality.md's screen)."""
    return getattr(type(config), "default_lr", FALLBACK_LR)


def all_blocks(anatomy: Anatomy) -> tuple[int, ...]:
    return tuple(range(anatomy.num_blocks))


def seeded_generator(*keys: int) -> torch.Generator:
    """A generator seeded from a tuple, so a step's random choice is a pure function of (seed, phase)."""
    g = torch.Generator()
    h = 0
    for k in keys:
        h = (h * 1_000_003 + int(k)) % (2**63 - 1)
    g.manual_seed(h)
    return g
