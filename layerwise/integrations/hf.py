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
``meft``); one that does not declare ``trainer_ok`` is refused. ``ist`` with
``importance_batch="heldout"`` is refused: callbacks get no held-out data.

Several processes (``torchrun``, ``accelerate launch``): a method whose trainable set changes
(``lift``, ``lisa``, ``ist``) or is chosen from the training data (``salf``'s probe) cannot live in
the Trainer's DistributedDataParallel wrapper, whose reducer fixes the set when it is built. So
the callback keeps the model out of it (it marks the model as prepared, so accelerate leaves it
unwrapped, and autocasts its forward itself under ``bf16``/``fp16``), starts every rank
from rank 0's weights, and when backward of a step's last micro-batch ends averages the active
gradients over the ranks itself (:class:`~layerwise.engine.distributed.ActiveGradSync`, as
``torchrun -m layerwise train`` does), before the Trainer clips them. Methods with a fixed set
keep the Trainer's own wrapper.

``resume_from_checkpoint``: the Trainer saves and loads torch's optimizer state by position in
the param groups, which cannot describe a switched set. The callback adds to it (``optimizer.pt``,
key ``"layerwise"``) the method's state (IST's scores and probe-data position, SALF's probe; LIFT's
and LISA's plans are functions of the step), the current plan and the AdamW state keyed by parameter name (active, retained or
stashed), and restores them when the Trainer loads it, so a resumed run continues the same plan
sequence.
"""

from __future__ import annotations

import itertools
import os
from collections import defaultdict
from types import MethodType
from typing import Any, Callable

import torch
import torch.distributed as dist
from accelerate.state import GradientState
from accelerate.utils import convert_outputs_to_fp32
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, RandomSampler
from transformers import TrainerCallback

from layerwise.anatomy import UnsupportedModelError
from layerwise.engine.checkpoint import load_named_optimizer_state, named_optimizer_state
from layerwise.engine.distributed import ActiveGradSync
from layerwise.engine.optim import ActiveOptimizer, fused_supported
from layerwise.engine.trainer import keep_inputs_grad_free
from layerwise.errors import ConfigError, ModelError
from layerwise.methods import METHODS, Plan, RunContext, method_config, names_where, setup
from layerwise.methods.base import Method, seeded_generator
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
    (the :class:`ActiveOptimizer` around it), ``plan`` (the current plan), ``switches``,
    ``history``: ``(step, plan)`` for every optimizer step begun, and ``sync``: the
    :class:`ActiveGradSync` averaging the active gradients under several processes (``None`` otherwise).
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
        self.sync: ActiveGradSync | None = None
        self._sync_queued = False
        self._ranks_joined = False
        self._watched: set[int] = set()
        world = args.world_size if args is not None else 1
        if world > 1 and self._set_may_change:
            self.sync = ActiveGradSync(world)
            self._keep_out_of_ddp(args)
        self._resumed: dict | None = None
        self.optimizer.register_state_dict_pre_hook(self._hide_state)
        self.optimizer.register_state_dict_post_hook(self._add_layerwise_state)
        self.optimizer.register_load_state_dict_pre_hook(self._take_layerwise_state)
        self.optimizer.register_load_state_dict_post_hook(self._restore_layerwise_state)

    @property
    def _set_may_change(self) -> bool:
        """The trainable set changes during training, or the training data chooses it (SALF's probe)."""
        return self.method.switching or type(self.method).data_ready is not Method.data_ready

    # -- Trainer events -------------------------------------------------------------------
    def on_train_begin(self, args, state, control, optimizer=None, train_dataloader=None, **kwargs):
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it in AcceleratedOptimizer
        if optimizer is not None and inner is not self.optimizer:
            raise ConfigError(
                "the Trainer built its own optimizer, which would not follow the layerwise plan: "
                "pass optimizers=(callback.optimizer, None) to the Trainer"
            )
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and args.world_size == 1:
            raise ConfigError(
                f"launched with {launched} processes, but the TrainingArguments see one, so each process would train alone: "
                "without a GPU pass use_cpu=True to TrainingArguments (transformers then runs them data parallel)"
            )
        if args.world_size > 1 and self._set_may_change and self.sync is None:
            raise ConfigError(
                f"'{self.method.name}' changes the trainable set, which the Trainer's DistributedDataParallel wrapper cannot "
                f"follow: build the callback with the Trainer's arguments, LayerwiseCallback(model, '{self.method.name}', "
                "args=training_args, ...), and it keeps the model out of that wrapper and averages the active gradients itself"
            )
        if self.sync is not None and not self._ranks_joined:
            self._join_ranks()
        on = getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False)
        gc_kwargs = getattr(args, "activation_checkpointing_kwargs", None) or getattr(args, "gradient_checkpointing_kwargs", None) or {}
        if on and not gc_kwargs.get("use_reentrant", False):
            # The Trainer enabled (non-reentrant) checkpointing before this call.
            keep_inputs_grad_free(kwargs.get("model") or self.model)
        if state.global_step and (self._resumed is None or self._resumed["step"] != state.global_step):
            raise ConfigError(
                "resume_from_checkpoint: the checkpoint has no optimizer.pt written through LayerwiseCallback (saved with "
                "save_only_model=True?), so the plan's position and the optimizer state by parameter cannot be restored: "
                "resume from a full checkpoint of a run that used the callback"
            )
        context = self.method.context
        if context.train_loader is None:  # a second train() keeps what the first one gave
            context.train_loader = train_loader_from(train_dataloader, args.per_device_train_batch_size, self.method.seed)
            self.method.data_ready(self.model)
            plan = self.method.plan(0)
            if plan != self.plan and not state.global_step:  # a resumed run's set is the checkpoint's
                self.active.set_active(self.method.parameters(plan))
                self.plan = plan

    def on_step_begin(self, args, state, control, **kwargs):
        step = state.global_step
        self._sync_queued = False  # a backward that raised never ran its queued averaging
        self.method.before_step(step)
        plan = self.method.plan(step)
        if plan != self.plan:
            self.active.set_active(self.method.parameters(plan))
            self.plan = plan
            self.switches += 1
        if self.sync is not None:
            self._watch_active()
        self.history.append((step, plan))

    # -- several processes --------------------------------------------------------------------
    def _keep_out_of_ddp(self, args) -> None:
        """Mark the model as prepared, so the Trainer's accelerate leaves it unwrapped; do here the one thing its
        preparation would still do for a model the Trainer already placed: autocast the forward for bf16/fp16."""
        name = self.method.name
        if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
            raise ConfigError(
                f"'{name}' changes the trainable set, which DeepSpeed and the Trainer's FSDP fix when they wrap the model: "
                f"run it data parallel without them (plain torchrun), or `torchrun -m layerwise train --method {name} --set train.fsdp=true`"
            )
        if getattr(args, "torch_compile", False):
            raise ConfigError(
                f"'{name}' under several processes runs outside accelerate's model preparation, which is where "
                "torch_compile applies: set torch_compile=False"
            )
        model = self.model
        if getattr(model, "_layerwise_out_of_ddp", False):
            return  # a second callback on the same model: already unwrapped and autocast
        precision = "bf16" if args.bf16 else "fp16" if args.fp16 else os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if precision in ("bf16", "fp16"):
            autocast = torch.autocast(args.device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
            model._original_forward = model.forward
            model.forward = MethodType(convert_outputs_to_fp32(autocast(model.forward.__func__)), model)
        model._is_accelerate_prepared = model._layerwise_out_of_ddp = True

    def _join_ranks(self) -> None:
        """Every rank starts from rank 0's weights and buffers (as DistributedDataParallel's constructor makes it)."""
        with torch.no_grad():
            for t in itertools.chain(self.model.parameters(), self.model.buffers()):
                dist.broadcast(t, src=0)
        # The Trainer's flag for "this micro-batch ends the step"; read through accelerate's shared state, taken here on
        # the main thread (the hooks run on autograd's).
        self._gradient_state = GradientState()
        self._ranks_joined = True

    def _watch_active(self) -> None:
        """Hook every active parameter (once; a hook needs requires_grad when it is registered)."""
        for p in self.active.active:
            if id(p) not in self._watched:
                p.register_post_accumulate_grad_hook(self._gradient_ready)
                self._watched.add(id(p))

    def _gradient_ready(self, param: nn.Parameter) -> None:
        # On the last micro-batch of a step, the first completed gradient queues one averaging of the active set for
        # when this backward has finished (under reentrant checkpointing, for each inner backward: more all_reduces,
        # the same result).
        if not self._sync_queued and self._gradient_state.sync_gradients:
            self._sync_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._average_active_gradients)

    def _average_active_gradients(self) -> None:
        self._sync_queued = False
        self.sync(self.active.active, 0.0)

    # -- resume_from_checkpoint: the Trainer's optimizer.pt carries the method's state ---------------------------------
    def _hide_state(self, optimizer) -> None:
        # By position torch cannot describe a switched set (nor retained or stashed state): kept by name instead.
        self._held_state, optimizer.state = optimizer.state, defaultdict(dict)

    def _add_layerwise_state(self, optimizer, state_dict: dict) -> dict:
        optimizer.state = self._held_state
        names = {id(p): n for n, p in self.model.named_parameters()}
        tensors, meta = named_optimizer_state(self.active, names)
        state_dict["layerwise"] = {
            "method": self.method.name,
            "step": self.history[-1][0] + 1 if self.history else 0,  # optimizer steps done
            "method_state": self.method.state_dict(),
            "plan": {"blocks": list(self.plan.blocks), "embeddings": self.plan.embeddings, "head": self.plan.head},
            "switches": self.switches,
            "optimizer": tensors,
            "optimizer_meta": meta,
        }
        return state_dict

    def _take_layerwise_state(self, optimizer, state_dict: dict) -> dict:
        saved = state_dict.get("layerwise")
        if saved is None or saved["method"] != self.method.name:
            what = "no LayerwiseCallback state" if saved is None else f"the state of method '{saved['method']}'"
            raise ConfigError(
                f"resume_from_checkpoint: the checkpoint's optimizer.pt holds {what}, so this '{self.method.name}' run cannot "
                "continue its plan: resume from a checkpoint of a run of the same method with the callback"
            )
        self._resumed = saved  # also when accelerate round-trips the state to place it on the device; dropped once restored
        # torch loads by position into the groups as they are now; the state itself is restored by name afterwards.
        groups, first = [], 0
        for mine, theirs in zip(optimizer.param_groups, state_dict["param_groups"]):
            groups.append({**{k: v for k, v in theirs.items() if k != "params"}, "params": list(range(first, first + len(mine["params"])))})
            first += len(mine["params"])
        return {"state": {}, "param_groups": groups}

    def _restore_layerwise_state(self, optimizer) -> None:
        saved = self._resumed
        params = dict(self.model.named_parameters())

        def param(name: str) -> nn.Parameter:
            if name not in params:
                raise ConfigError(f"resume_from_checkpoint: the checkpoint has optimizer state for '{name}', which this model does not have")
            return params[name]

        load_named_optimizer_state(self.active, saved["optimizer"], saved["optimizer_meta"], param)
        self.method.load_state_dict(saved["method_state"])
        plan = saved["plan"]
        self.plan = Plan(tuple(plan["blocks"]), embeddings=plan["embeddings"], head=plan["head"])
        self.switches = saved["switches"]
        self._resumed = {"step": saved["step"]}
