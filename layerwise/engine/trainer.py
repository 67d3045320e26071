"""The training loop: plan -> requires_grad + optimizer ownership -> forward/backward/step -> meter.

Kept short on purpose; the run folder, data and model loading live in :mod:`layerwise.run`.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn
from transformers import get_scheduler

from layerwise.engine.frozen import DTYPES, FrozenLowPrecision
from layerwise.engine.meter import PeakMemory, SavedTensorMeter, grad_bytes, param_bytes
from layerwise.engine.optim import ActiveOptimizer, fused_supported
from layerwise.engine.settings import TrainConfig
from layerwise.errors import NumericalError
from layerwise.methods import Method, Plan, default_lr


@dataclass
class StepRecord:
    step: int
    loss: float
    lr: float
    plan: Plan
    tokens: int
    seconds: float
    bytes: dict
    skipped: bool = False
    """The loss or a gradient was not finite and the optimizer step was skipped (train.on_nonfinite=skip)."""


@dataclass
class Totals:
    steps: int = 0
    tokens: int = 0
    samples: int = 0
    seconds: float = 0.0
    peak: dict = field(default_factory=lambda: {"weights": 0, "grads": 0, "optimizer": 0, "activations": 0, "total": 0})


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class BatchStream:
    """Endless, resumable batches: epoch ``e`` comes from ``make_loader(e)`` (seeded, so the order is
    reproducible), and ``state_dict()`` records the epoch and how many of its batches were handed out.
    ``load_state_dict()`` makes the next batch the one after that position: the epoch's loader is
    re-created and its :class:`~layerwise.data.batches.SeededSampler` skips the consumed examples (without
    collating them); a loader without a resumable sampler has its consumed batches drawn and dropped.
    """

    def __init__(self, make_loader: Callable[[int], torch.utils.data.DataLoader]):
        self.make_loader = make_loader
        self.epoch = 0
        self.batch = 0
        self._it: Iterator[dict] | None = None

    def __iter__(self):
        return self

    def _open(self) -> Iterator[dict]:
        loader = self.make_loader(self.epoch)
        skip = self.batch
        if not skip:
            return iter(loader)
        # Re-opening an epoch mid-way (resume): the DataLoader draws its base seed from the global
        # RNG when an iterator is made; the interrupted run drew it at the epoch's start, so this
        # draw must not happen again or every later random number (dropout) would shift.
        rng = torch.get_rng_state()
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "load_state_dict") and hasattr(sampler, "state_dict") and loader.batch_size:
            state = dict(sampler.state_dict())
            state["position"] = min(skip * loader.batch_size, len(sampler))
            sampler.load_state_dict(state)
            it = iter(loader)
        else:
            it = iter(loader)
            for _ in range(skip):
                if next(it, None) is None:
                    break
        torch.set_rng_state(rng)
        return it

    def __next__(self) -> dict:
        for _ in range(2):
            if self._it is None:
                self._it = self._open()
            batch = next(self._it, None)
            if batch is not None:
                self.batch += 1
                return batch
            fresh = self.batch == 0
            self._it, self.epoch, self.batch = None, self.epoch + 1, 0
            if fresh:
                break
        raise RuntimeError("the training data loader produced no batches")

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self._it = None


class Trainer:
    """Runs a :class:`Method` on a model. ``train_batches`` yields dicts of tensors that the
    model accepts as keyword arguments (including ``labels``)."""

    def __init__(
        self,
        model: nn.Module,
        method: Method,
        cfg: TrainConfig,
        train_batches: Iterator[dict],
        *,
        device: torch.device | None = None,
    ):
        self.model = model
        self.method = method
        self.cfg = cfg
        self.device = device or resolve_device(cfg.device)
        self.batches = train_batches
        self.model.to(self.device)
        self.model.train()
        if cfg.gradient_checkpointing:
            if not getattr(self.model, "supports_gradient_checkpointing", False) and not hasattr(self.model, "gradient_checkpointing_enable"):
                raise ValueError("this model does not support gradient checkpointing: set train.gradient_checkpointing=false")
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            keep_inputs_grad_free(self.model)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.step_index = 0
        self.plan = method.plan(0)
        #: train.frozen_dtype: blocks outside the plan held in bf16 (:mod:`layerwise.engine.frozen`).
        self.frozen = None
        if cfg.frozen_dtype != "fp32":
            self.frozen = FrozenLowPrecision(method.anatomy.blocks, DTYPES[cfg.frozen_dtype], cfg.frozen_master,
                                           cfg.frozen_master_dir)
            try:
                self.frozen.apply(self.plan.blocks)
            except BaseException:
                self.frozen.close()  # frozen_master=disk: leave no scratch folder behind
                raise
        self.optimizer = ActiveOptimizer(
            method.parameters(self.plan),
            lr=default_lr(method.config) if cfg.lr is None else cfg.lr,
            weight_decay=cfg.weight_decay,
            # A method may fix its own policy (IST: ``retain``, one optimizer over all adapters).
            state_policy=method.optimizer_state or cfg.optimizer_state,
            fused=cfg.fused_optimizer and fused_supported(self.device) and not cfg.fsdp,
            lr_scale=method.lr_scale,
            scales=method.lr_scales(),
        )
        self.scheduler = get_scheduler(
            {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.lr_schedule],
            self.optimizer.optimizer,
            num_warmup_steps=cfg.warmup_steps,
            num_training_steps=max(cfg.max_steps, 1),
        )
        self.meter = SavedTensorMeter(self.model)
        self.weight_bytes = self._weights_now()
        self.totals = Totals()
        self.switches = 0
        self.max_trainable = sum(p.numel() for p in self.optimizer.active)
        #: Every parameter that has been trainable so far (by id): all a checkpoint must hold besides buffers.
        self.touched: set[int] = {id(p) for p in self.optimizer.active}
        #: Data parallel: ``grad_sync(active_params, loss) -> loss`` averages the active gradients (and
        #: the loss) over ranks after backward (:class:`~layerwise.engine.distributed.ActiveGradSync`).
        self.grad_sync = None
        self.peak_memory = PeakMemory(self.device)
        #: Optimizer steps skipped for a non-finite loss or gradient (in all, and in a row now).
        self.skipped_steps = 0
        self.consecutive_skips = 0
        #: train.prefix_cache: a :class:`~layerwise.engine.prefix_cache.PrefixCache` (set by the run), or None.
        self.prefix_cache = None
        method.attach(self)

    # ------------------------------------------------------------------------------------
    def autocast(self):
        if not self.cfg.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _weights_now(self) -> int:
        """Parameter bytes; with frozen_master=host on a CPU device the float32 master copies too (same memory)."""
        n = param_bytes(self.model)
        if self.frozen is not None and self.device.type == "cpu":
            n += self.frozen.master_bytes()
        return n

    def apply_plan(self, plan: Plan) -> None:
        if plan == self.plan:
            return
        if self.frozen is not None and self.frozen.apply(plan.blocks):
            # New storages: the meter must still recognise parameters; the weights' bytes changed.
            self.meter.refresh(self.model)
            self.weight_bytes = self._weights_now()
        self.optimizer.set_active(self.method.parameters(plan))
        self.plan = plan
        self.switches += 1
        self.max_trainable = max(self.max_trainable, sum(p.numel() for p in self.optimizer.active))
        self.touched.update(id(p) for p in self.optimizer.active)

    def apply_modes(self, plan: Plan) -> None:
        """Train/eval mode per block: with ``frozen_dropout`` off, blocks (and embeddings) that
        do not train this step run in eval mode. Re-applied every step because evaluation
        resets every module to train mode."""
        self.model.train()
        if self.cfg.frozen_dropout:
            return
        anatomy = self.method.anatomy
        active = set(plan.blocks)
        lowest = plan.lowest
        for i, block in enumerate(anatomy.blocks):
            if i not in active:
                block.eval()
                if self.cfg.gradient_checkpointing and lowest is not None and i > lowest and getattr(block, "gradient_checkpointing", False):
                    # A frozen block the gradient must cross: transformers checkpoints a layer only when
                    # the layer itself is in training mode, so flag the layer alone (its children stay in
                    # eval mode: no dropout, and the recomputation is exact).
                    block.training = True
        if not plan.embeddings:
            for module in anatomy.embeddings:
                module.eval()

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _nonfinite_blocks(self, params: list[nn.Parameter]) -> str:
        """The active blocks (and embeddings/head/adapters) whose gradients hold NaN or inf."""
        anatomy = self.method.anatomy
        names: list[str] = []
        for p in params:
            if p.grad is None or bool(torch.isfinite(p.grad).all()):
                continue
            where = "other"
            if anatomy is not None:
                block = anatomy.block_index_of(p)
                if block is not None:
                    where = f"block {block}"
                elif any(p is q for q in anatomy.embedding_parameters()):
                    where = "embeddings"
                elif any(p is q for q in anatomy.head_parameters()):
                    where = "head"
            if where not in names:
                names.append(where)
        return ", ".join(names) if names else "none (the loss itself)"

    def _nonfinite(self, loss: float, norm: float, params: list[nn.Parameter]) -> None:
        """A non-finite loss or gradient: raise (on_nonfinite=stop, or too many skips in a row) or count a skip."""
        what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {norm}"
        where = f"at step {self.step_index + 1} (training {self.plan.describe()}; non-finite gradients in: {self._nonfinite_blocks(params)})"
        if self.cfg.on_nonfinite != "skip":
            raise NumericalError(
                f"{what} {where}: lower train.lr, enable train.max_grad_norm or train.bf16=false, "
                f"or set train.on_nonfinite=skip to skip such steps"
            )
        self.skipped_steps += 1
        self.consecutive_skips += 1
        limit = self.cfg.max_skipped_steps
        if self.consecutive_skips >= limit:
            raise NumericalError(f"{what} {where}: {self.consecutive_skips} steps in a row skipped (train.max_skipped_steps={limit}); lower train.lr")

    def train_step(self) -> StepRecord:
        """One optimizer step (``grad_accum`` micro-batches)."""
        t0 = time.perf_counter()
        self.method.before_step(self.step_index)
        self.apply_plan(self.method.plan(self.step_index))
        self.apply_modes(self.plan)
        total_loss = 0.0
        tokens = samples = 0
        activations = 0
        for _ in range(self.cfg.grad_accum):
            batch = self._to_device(next(self.batches))
            # The frozen-prefix cache takes the example indices out and feeds the stored prefix output.
            feed = self.prefix_cache.feed(batch, self.plan) if self.prefix_cache is not None else contextlib.nullcontext()
            with self.meter.track(), self.autocast(), feed:
                out = self.model(**batch)
                loss = out.loss / self.cfg.grad_accum
            # Everything saved for backward is alive once the forward is done.
            activations = max(activations, self.meter.last_bytes)
            loss.backward()
            total_loss += float(loss.detach())
            tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            samples += batch["input_ids"].shape[0]
        if self.grad_sync is not None:
            total_loss = self.grad_sync(self.optimizer.active, total_loss)
        active = self.optimizer.active
        grads = grad_bytes(active)
        with_grad = [p for p in active if p.grad is not None]
        # The total norm is what clip_grad_norm_ computes (and then clips with): checking it costs one reduction.
        norm = torch.nn.utils.get_total_norm([p.grad for p in with_grad]) if with_grad else torch.zeros(())
        skipped = not (math.isfinite(total_loss) and bool(torch.isfinite(norm)))
        if skipped:
            self._nonfinite(total_loss, float(norm), with_grad)
        elif self.cfg.max_grad_norm and with_grad:
            torch.nn.utils.clip_grads_with_norm_(with_grad, self.cfg.max_grad_norm, norm)
        if not skipped:
            self.consecutive_skips = 0
            self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.optimizer.zero_grad()
        opt_bytes = self.optimizer.state_bytes()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # kernels run asynchronously: time their end, not their launch
        seconds = time.perf_counter() - t0
        b = {"weights": self.weight_bytes, "grads": grads, "optimizer": opt_bytes, "activations": activations}
        b["total"] = sum(b.values())
        for k, v in b.items():
            self.totals.peak[k] = max(self.totals.peak[k], v)
        rec = StepRecord(self.step_index, total_loss, lr, self.plan, tokens, seconds, b, skipped)
        self.step_index += 1
        self.totals.steps += 1
        self.totals.tokens += tokens
        self.totals.samples += samples
        self.totals.seconds += seconds
        return rec


def keep_inputs_grad_free(model: nn.Module) -> None:
    """Undo what enabling checkpointing does to the embeddings' output in transformers 5 (and peft, and TRL): hooks
    (``enable_input_require_grads``) that make it require grad, so that reentrant checkpointing sees a gradient.
    Non-reentrant checkpointing (the engine's) does not need them, and with them every frozen block below the lowest
    trainable one records a graph, saves activations and is crossed by backward: the early stop of LIFT, SALF and IST
    would be lost. Each caller may add one and only the last stays reachable as an attribute (through a PEFT
    wrapper not even that), so every such hook is found by its function's name."""
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if getattr(hook, "__qualname__", "").endswith("enable_input_require_grads.<locals>.make_inputs_require_grads"):
                del module._forward_hooks[key]


@torch.no_grad()
def evaluate(model: nn.Module, loader, task: str, device: torch.device, bf16: bool = False) -> dict:
    """Held-out metrics: accuracy (and loss) for classification; loss, perplexity and first-token accuracy for causal LM.

    Causal-LM loss is the token-weighted mean over all label tokens (not a mean of batch means). First-token accuracy
    is the share of examples whose first target token (the answer's first token: BoolQ's yes/no) is the argmax over
    the whole vocabulary.
    """
    was_training = model.training
    model.eval()
    ctx = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    correct = count = 0
    loss_sum = 0.0
    tokens = 0
    with ctx:
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            if task == "classification":
                loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
                correct += int((logits.argmax(-1) == labels).sum())
                count += labels.numel()
            else:
                shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
                shift_labels = labels[:, 1:].reshape(-1)
                loss_sum += float(
                    torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
                )
                tokens += int((shift_labels != -100).sum())
                targets = labels[:, 1:]
                answered = (targets != -100).any(dim=1)
                first = (targets != -100).int().argmax(dim=1, keepdim=True)
                hit = logits[:, :-1].gather(1, first.unsqueeze(-1).expand(-1, -1, logits.shape[-1])).argmax(-1) == targets.gather(1, first)
                correct += int((hit.squeeze(1) & answered).sum())
                count += int(answered.sum())
    model.train(was_training)
    if task == "classification":
        return {"accuracy": correct / max(count, 1), "loss": loss_sum / max(count, 1), "examples": count}
    loss = loss_sum / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens, "first_token_accuracy": correct / max(count, 1),
            "examples": count}
