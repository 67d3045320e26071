"""layerwise methods inside ``transformers.Trainer`` (and TRL's trainers, which subclass it).

One object, :class:`LayerwiseCallback`, carries everything:

* the method (the same :class:`~layerwise.methods.Method` classes and typed configs that
  ``layerwise train`` uses, over the model's :func:`~layerwise.anatomy.find_anatomy` groups);
* ``callback.model``: the model to hand to the Trainer (``model`` itself, prepared in place by
  ``meft``; the PEFT model for ``lora``, ``ist`` and ``salf`` with ``adapter="lora"``);
* ``callback.optimizer``: an AdamW that owns exactly the active parameters (the ``.optimizer``
  of an :class:`~layerwise.engine.optim.ActiveOptimizer`); pass it to the Trainer as
  ``optimizers=(callback.optimizer, None)`` and the Trainer builds its LR scheduler over it;
* ``on_train_begin``: the method gets the Trainer's training data (its dataset and collator, in a
  seeded shuffle of its own: ``RunContext.train_loader``) and studies it where it does so
  before training (``salf`` probes it and the optimizer's param groups take the cut);
* ``on_step_begin``: before the first micro-batch of every optimizer step, the method's step
  hook runs (``ist``: its importance loop every ``probe_every`` steps, on its own batches of
  the training data) and its plan for that step (``state.global_step``) is applied:
  ``requires_grad``, the optimizer's param groups (replaced in place, so the scheduler and
  accelerate's optimizer wrapper keep working) and the leaving parameters' state
  (``optimizer_state``: reset / keep / retain; ``ist`` fixes its own, retain). Frozen blocks
  below the lowest trainable one record no graph, as in ``layerwise train``, also under the
  Trainer's (non-reentrant) checkpointing, whose input-grad hooks ``on_train_begin`` removes.

::

    cb = LayerwiseCallback(model, "lift", args=training_args, k=1, switch_every=50)
    trainer = Trainer(model=cb.model, args=training_args, train_dataset=ds,
                      optimizers=(cb.optimizer, None), callbacks=[cb])
    trainer.train()

Every built-in method runs (``full``, ``freeze``, ``lift``, ``lisa``, ``lora``, ``ist``, ``salf``,
``meft``); one that does not declare ``trainer_ok`` is refused. A switching method (``lift``,
``lisa``, ``ist``) under several processes is refused, because the Trainer's
DistributedDataParallel wrapper fixes the set of trainable parameters when it is built, and so
is a method whose set the training data decides (``salf`` without a ``probe`` file), since the
wrapper is built before ``on_train_begin``; use ``torchrun -m layerwise train`` there
(docs/scale-out.md). ``ist`` with ``importance_batch="heldout"`` is refused: callbacks get no
held-out data. The Trainer's ``resume_from_checkpoint`` restores torch's optimizer state by
position, which cannot describe a switched set: for exact resume use ``layerwise train
--resume`` (docs/checkpoints.md).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, RandomSampler
from transformers import TrainerCallback

from layerwise.anatomy import UnsupportedModelError
from layerwise.engine.optim import ActiveOptimizer, fused_supported
from layerwise.engine.trainer import keep_inputs_grad_free
from layerwise.errors import ConfigError, ModelError
from layerwise.methods import METHODS, Plan, RunContext, method_config, names_where, setup
from layerwise.methods.base import seeded_generator
from layerwise.models import default_task_for


def _task_of(model: nn.Module) -> str:
    name = type(model).__name__
    if name.endswith("ForCausalLM"):
        return "causal_lm"
    if name.endswith("ForSequenceClassification"):
        return "classification"

    return default_task_for(model.config)


def train_loader_from(train_dataloader, batch_size: int, seed: int) -> Callable[[int], DataLoader]:
    """``RunContext.train_loader`` over the Trainer's training data: its dataset and collator, epoch ``e`` in
    the order of a shuffle seeded by (``seed``, e) (in dataset order for an iterable dataset). A DataLoader of
    its own, so that the Trainer's (accelerate's wrapper, which tracks its passes and the gradient-accumulation
    state) is not iterated before training."""
    dataset, collate = train_dataloader.dataset, train_dataloader.collate_fn

    def loader(epoch: int) -> DataLoader:
        order = None if isinstance(dataset, IterableDataset) else RandomSampler(dataset, generator=seeded_generator(seed, epoch))
        return DataLoader(dataset, batch_size=batch_size, sampler=order, collate_fn=collate)

    return loader


class LayerwiseCallback(TrainerCallback):
    """Run layerwise method ``method`` inside a ``transformers.Trainer``.

    ``method_options`` are the method's config keys (``k``, ``switch_every``, ``schedule``,
    ``layers``, ``r``, ``samples``, ``probe_every``, ...), checked like ``method.*`` keys of a
    layerwise config. ``args`` (a ``TrainingArguments``) supplies the defaults for ``lr``,
    ``weight_decay``, the Adam betas and epsilon, ``seed`` and ``max_steps``. ``blocks``
    overrides where the blocks are (``"model.layers"``); ``task`` is ``classification`` or
    ``causal_lm`` (inferred). ``optimizer_state`` applies unless the method fixes its own.

    Attributes: ``model`` (the model to train: ``model`` itself, or the PEFT model for the
    adapter methods), ``method``, ``optimizer`` (torch AdamW to hand to the Trainer), ``active``
    (the :class:`ActiveOptimizer` around it), ``plan`` (the current plan), ``switches``, and
    ``history``: ``(step, plan)`` for every optimizer step begun.
    """

    def __init__(
        self,
        model: nn.Module,
        method: str = "lift",
        *,
        args: Any = None,
        lr: float | None = None,
        weight_decay: float | None = None,
        seed: int | None = None,
        max_steps: int | None = None,
        optimizer_state: str = "reset",
        blocks: str | None = None,
        task: str | None = None,
        **method_options,
    ):
        if method in METHODS and not METHODS[method].trainer_ok:
            supported = ", ".join(names_where(lambda m: m.trainer_ok))
            raise ConfigError(
                f"method '{method}' cannot run inside transformers.Trainer (it needs the layerwise engine): "
                f"use one of {supported}, or `layerwise train --method {method}`"
            )
        lr = lr if lr is not None else (args.learning_rate if args is not None else 1e-4)
        weight_decay = weight_decay if weight_decay is not None else (args.weight_decay if args is not None else 0.0)
        seed = seed if seed is not None else (args.seed if args is not None else 0)
        max_steps = max_steps if max_steps is not None else (max(args.max_steps, 0) if args is not None else 0)
        betas = (args.adam_beta1, args.adam_beta2) if args is not None else (0.9, 0.999)
        eps = args.adam_epsilon if args is not None else 1e-8
        mcfg = method_config({"name": method, **method_options})
        # The Trainer's data reaches a callback only at on_train_begin.
        context = RunContext(data_later=True)
        try:
            self.method, self.model = setup(mcfg, model, task=task or _task_of(model), blocks=blocks, seed=seed, max_steps=max_steps,
                                            context=context)
        except UnsupportedModelError as exc:
            raise ModelError(str(exc)) from None
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.plan: Plan = self.method.plan(0)
        # TrainingArguments.optim="adamw_torch_fused" (transformers' default) -> torch's fused kernel, as the Trainer would.
        device = next(self.model.parameters()).device
        fused = args is not None and "fused" in str(getattr(args, "optim", "")).lower() and fused_supported(device)
        self.active = ActiveOptimizer(
            self.method.parameters(self.plan), lr=lr, weight_decay=weight_decay, betas=betas, eps=eps,
            state_policy=self.method.optimizer_state or optimizer_state, fused=fused, lr_scale=self.method.lr_scale,
            scales=self.method.lr_scales(),
        )
        self.optimizer: torch.optim.Optimizer = self.active.optimizer
        self.switches = 0
        self.history: list[tuple[int, Plan]] = []

    # -- Trainer events -------------------------------------------------------------------
    def on_train_begin(self, args, state, control, optimizer=None, train_dataloader=None, **kwargs):
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it in AcceleratedOptimizer
        if optimizer is not None and inner is not self.optimizer:
            raise ConfigError(
                "the Trainer built its own optimizer, which would not follow the layerwise plan: "
                "pass optimizers=(callback.optimizer, None) to the Trainer"
            )
        if args.world_size > 1 and self.method.switching:
            raise ConfigError(
                f"'{self.method.name}' changes the trainable set, which the Trainer's DistributedDataParallel wrapper "
                "cannot follow: run it data parallel with `torchrun -m layerwise train` (docs/scale-out.md)"
            )
        on = getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False)
        gc_kwargs = getattr(args, "activation_checkpointing_kwargs", None) or getattr(args, "gradient_checkpointing_kwargs", None) or {}
        if on and not gc_kwargs.get("use_reentrant", False):
            # The Trainer enabled (non-reentrant) checkpointing before this call.
            keep_inputs_grad_free(kwargs.get("model") or self.model)
        if state.global_step:
            raise ConfigError(
                "resume_from_checkpoint restores torch's optimizer state by position, which cannot describe a switched "
                "trainable set: resume layerwise runs with `layerwise train --resume` (docs/checkpoints.md)"
            )
        context = self.method.context
        if context.train_loader is None:  # a second train() keeps what the first one gave
            context.train_loader = train_loader_from(train_dataloader, args.per_device_train_batch_size, self.method.seed)
            self.method.data_ready(self.model)
            plan = self.method.plan(0)
            if plan != self.plan:
                if args.world_size > 1:
                    raise ConfigError(
                        f"'{self.method.name}' chose its trainable set from the training data after the Trainer's "
                        "DistributedDataParallel wrapper fixed the set: choose it before training (salf: method probe=probe.json "
                        "from `layerwise probe`) or run data parallel with `torchrun -m layerwise train` (docs/scale-out.md)"
                    )
                self.active.set_active(self.method.parameters(plan))
                self.plan = plan

    def on_step_begin(self, args, state, control, **kwargs):
        step = state.global_step
        self.method.before_step(step)
        plan = self.method.plan(step)
        if plan != self.plan:
            self.active.set_active(self.method.parameters(plan))
            self.plan = plan
            self.switches += 1
        self.history.append((step, plan))
