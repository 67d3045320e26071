"""Cost model: a method's step time predicted from measured per-block times, never calibrated on a run.

One full fine-tuning step is profiled with marker functions at every block boundary: the
forward time of each block (pre/post hooks) and its backward time (the moment the
gradient reaches the block's output and the moment it leaves through its input). One
block is then timed alone in three backward modes: full (input and weight gradients),
weight-only (the lowest trainable block: nothing flows below it) and input-only (a frozen
block that gradient must cross). The head's backward is timed twice, with its weights
trainable and frozen (a tied LM head's weight is the embedding matrix: it trains only
with the embeddings). Gradient clipping, the AdamW step and zero_grad are timed apart,
each scaled per parameter. A method whose blocks carry adapters has its own middle block
timed against the plain block (:func:`method_block_cost`): peft adapters, or MEFT's reversible
layer as MEFT runs it (its backward includes the recomputed forward).

For a step (:class:`Charge`: what trains and runs, read from the method's parameters)::

    T = F  +  B_head  +  sum_i c_i  +  [B_emb if an embedding parameter trains]  +  per-parameter work
        +  the method's own forwards (IST's importance loop)

with c_i = B_i for a trainable block above the lowest trainable point, B_i * r_weight for
the lowest one, B_i * r_input for a frozen block above it, B_i * r_adapter for a block
whose adapters train (MEFT's reversible blocks: their recomputed forward included), and 0
below the lowest. docs/cost-model.md has every term.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from layerwise.engine.optim import fused_supported
from layerwise.methods import Method, Plan


def _now() -> float:
    """Host clock; on CUDA after a synchronize, so that a block boundary is when its kernels ended
    (the profiled step is slower by the synchronizations, the per-block times are right)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


class _Mark(torch.autograd.Function):
    """Identity whose backward records when the gradient passed through it."""

    @staticmethod
    def forward(ctx, x, log, key):
        ctx.log, ctx.key = log, key
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.log[ctx.key] = _now()
        return grad, None, None


def _first_tensor(args, kwargs):
    if args and torch.is_tensor(args[0]):
        return "arg", args[0]
    if torch.is_tensor(kwargs.get("hidden_states")):
        return "kw", kwargs["hidden_states"]
    return None, None


@dataclass(frozen=True)
class BlockCost:
    """A method's blocks relative to the plain block, measured on its own middle block
    (:func:`method_block_cost`); the defaults are a block without adapters."""

    forward_factor: float = 1.0
    """Forward with the method's adapters over the plain block's forward (train mode; a reversible block: both without a graph)."""
    eval_forward_factor: float | None = None
    """The same in eval mode without a graph (the adapters' dropout off): a block with adapters that runs in eval mode,
    and the method's own forwards (IST's importance loop); None: ``forward_factor``."""
    adapter_fraction: float | None = None
    """Backward with only adapter weights trainable and the input gradient, over the plain block's full backward."""
    adapter_lowest_fraction: float | None = None
    """The same without the input gradient (the lowest block that trains)."""
    reversible: bool = False
    """Timed as the method runs it, forward without a graph and backward by recomputation (MEFT): the adapter
    fractions include the recomputed forward."""


@dataclass(frozen=True)
class Charge:
    """What one step of a method trains and runs, as the cost model charges it (from :func:`charge_for`)."""

    trainable_blocks: tuple[int, ...]
    """Blocks with a trainable parameter (adapters included)."""
    embeddings: bool
    """An embedding parameter trains (a tied LM head's weight included): backward reaches the embeddings."""
    head_weight: bool
    """A parameter of the head modules trains (for a tied head: the embedding matrix)."""
    n_trainable: int
    head_group: bool = False
    """A parameter of the head group trains (the final norm included): backward starts even when no block trains."""
    adapter_only: bool = False
    adapter_blocks: tuple[int, ...] = ()
    """Blocks that carry adapters: their forward costs ``BlockCost.forward_factor`` (``eval_forward_factor`` in eval mode)."""
    eval_blocks: tuple[int, ...] = ()
    """Blocks whose forward runs in eval mode (frozen blocks with ``train.frozen_dropout`` off)."""
    recomputed_blocks: tuple[int, ...] = ()
    """Blocks whose forward runs again in backward (MEFT's reversible blocks)."""
    extra_forward_examples: int = 0
    """Examples the method runs forward, without gradients, in eval mode, beside the step (IST's importance loop)."""


@dataclass
class Profile:
    forward_blocks: list[float]
    backward_blocks: list[float]
    forward_embeddings: float
    backward_embeddings: float
    forward_head: float
    backward_head: float
    optimizer_per_param: float
    """The AdamW step alone, seconds per parameter."""
    weight_only_fraction: float
    input_only_fraction: float
    step_seconds: float
    total_params: int
    forward_blocks_eval: list[float] | None = None
    """Forward time of each block in eval mode (no dropout): what a block that does not train
    costs when ``train.frozen_dropout`` is off."""
    forward_blocks_nograd: list[float] | None = None
    """Forward time of each block in train mode without recording a graph: a block below the lowest trainable one (or
    one that MEFT runs reversibly) saves nothing for backward."""
    backward_head_frozen: float | None = None
    """The head's backward with its weights frozen (only the gradient for the blocks below)."""
    clip_per_param: float = 0.0
    zero_grad_per_param: float = 0.0
    batch_size: int = 1

    @property
    def forward(self) -> float:
        return self.forward_embeddings + sum(self.forward_blocks) + self.forward_head

    def phases(self, charge: Charge, block: BlockCost = BlockCost()) -> dict:
        """Predicted seconds of one optimizer step by phase, on the suite's clock: ``method_hook`` (the method's own
        forwards), ``forward``, ``backward`` (gradient clipping included), ``optimizer`` (the AdamW step), ``other``
        (zero_grad); ``total``, and ``per_parameter`` (the part that does not grow with the batch)."""
        L = len(self.forward_blocks)
        f_eval = self.forward_blocks_eval or self.forward_blocks
        f_nograd = self.forward_blocks_nograd or self.forward_blocks
        lowest = -1 if charge.embeddings else (min(charge.trainable_blocks) if charge.trainable_blocks else None)

        eval_factor = block.forward_factor if block.eval_forward_factor is None else block.eval_forward_factor

        def block_forward(i: int, mode_eval: bool, graph: bool = True) -> float:
            t = f_eval[i] if mode_eval else (self.forward_blocks[i] if graph else f_nograd[i])
            return t * ((eval_factor if mode_eval else block.forward_factor) if i in charge.adapter_blocks else 1.0)

        # A block records a graph when backward will reach it and it is not run reversibly (MEFT recomputes it instead).
        graph = [lowest is not None and i >= lowest and i not in charge.recomputed_blocks for i in range(L)]
        forward = self.forward_embeddings + self.forward_head + sum(block_forward(i, i in charge.eval_blocks, graph[i]) for i in range(L))
        backward = 0.0
        head_frozen = self.backward_head if self.backward_head_frozen is None else self.backward_head_frozen
        if lowest is not None:
            backward += self.backward_head if charge.head_weight else head_frozen
            for i in range(max(lowest, 0), L):
                b = self.backward_blocks[i]
                at_bottom = i == lowest
                if i not in charge.trainable_blocks:
                    backward += b * self.input_only_fraction
                elif charge.adapter_only:
                    r_in = block.adapter_fraction if block.adapter_fraction is not None else self.input_only_fraction
                    r_low = block.adapter_lowest_fraction if block.adapter_lowest_fraction is not None else r_in
                    backward += b * (r_low if at_bottom else r_in)
                else:
                    backward += b * (self.weight_only_fraction if at_bottom else 1.0)
                if i in charge.recomputed_blocks and not block.reversible:
                    backward += block_forward(i, False)
            if charge.embeddings:
                backward += self.backward_embeddings
        elif charge.head_weight:
            # Only the head trains: its weight gradient, none for the blocks below.
            backward += max(self.backward_head - head_frozen, 0.0)
        elif charge.head_group:
            # Only the final norm (a tied head's group): the gradient crosses the output layer to reach it.
            backward += head_frozen
        hook = charge.extra_forward_examples / self.batch_size * (
            self.forward_embeddings + self.forward_head + sum(block_forward(i, True) for i in range(L)))
        n = charge.n_trainable
        clip, optimizer, other = self.clip_per_param * n, self.optimizer_per_param * n, self.zero_grad_per_param * n
        out = {"method_hook": hook, "forward": forward, "backward": backward + clip, "optimizer": optimizer, "other": other}
        out["total"] = sum(out.values())
        out["per_parameter"] = clip + optimizer + other
        return out

    def predict(self, charge: Charge, block: BlockCost = BlockCost()) -> float:
        """Predicted seconds for one optimizer step."""
        return self.phases(charge, block)["total"]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["forward"] = self.forward
        return d


def charge_for(method: Method, plan: Plan, step: int | None = None, frozen_eval: bool = False) -> Charge:
    """What ``method`` trains and runs at ``step`` under ``plan``, from the parameters it really trains
    (a plan's ``embeddings``/``head`` flags say which groups may train; an adapter method trains only its adapters there)."""
    anatomy = method.anatomy
    trainable = {id(p): p for p in method.parameters(plan)}
    groups = anatomy.groups()
    L = anatomy.num_blocks
    in_group = lambda name: any(id(p) in trainable for p in groups[name])  # noqa: E731
    blocks = tuple(i for i in range(L) if in_group(f"block.{i}"))
    head_weight = any(id(p) in trainable for m in anatomy.head_modules() for p in m.parameters())
    adapters = tuple(i for i in range(L) if any(id(p) in method.adapter_params for p in groups[f"block.{i}"])) if method.adapter_params else ()
    return Charge(
        trainable_blocks=blocks,
        embeddings=in_group("embeddings"),
        head_weight=head_weight,
        head_group=in_group("head"),
        n_trainable=sum(p.numel() for p in trainable.values()),
        adapter_only=method.adapter_only,
        adapter_blocks=adapters,
        eval_blocks=tuple(i for i in range(L) if i not in plan.blocks) if frozen_eval else (),
        recomputed_blocks=tuple(method.recomputed_blocks()),
        extra_forward_examples=method.extra_forward_examples(step) if step is not None else 0,
    )


def full_charge(profile: Profile) -> Charge:
    """Full fine-tuning: every parameter trains."""
    return Charge(tuple(range(len(profile.backward_blocks))), embeddings=True, head_weight=True, head_group=True,
                  n_trainable=profile.total_params)


def _detached(args, kwargs):
    """Captured block inputs without their graph, and without a KV cache (it would grow and hold its graph)."""
    det = lambda v: v.detach() if torch.is_tensor(v) else (type(v)(det(u) for u in v) if isinstance(v, tuple) else v)  # noqa: E731
    args, kwargs = tuple(det(a) for a in args), {k: det(v) for k, v in kwargs.items()}
    for key, value in list(kwargs.items()):
        if key in ("past_key_values", "past_key_value", "cache") or type(value).__name__.endswith("Cache"):
            kwargs[key] = None
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return args, kwargs


def _time_call(fn, x0: torch.Tensor, params: list[nn.Parameter], grad_params: list[nn.Parameter], x_grad: bool) -> tuple[float, float]:
    """Forward and backward seconds of ``fn(x)`` on a copy of ``x0`` (after one untimed call), with only ``grad_params``
    of ``params`` trainable and (``x_grad``) the gradient for ``x``; the loss sums every output that needs a gradient."""
    saved = [p.requires_grad for p in params]
    wanted = {id(p) for p in grad_params}
    try:
        for p in params:
            p.requires_grad_(id(p) in wanted)
        for _ in range(2):
            x = x0.detach().requires_grad_(x_grad)
            t0 = _now()
            out = fn(x)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            loss = sum(o.float().pow(2).mean() for o in outs if torch.is_tensor(o) and o.requires_grad)
            t1 = _now()
            loss.backward()
            t2 = _now()
            for p in params:
                p.grad = None
    finally:
        for p, rg in zip(params, saved):
            p.requires_grad_(rg)
    return t1 - t0, t2 - t1


def _block_call(block: nn.Module, args, kwargs):
    """``block`` as a function of its hidden states (the first tensor of its captured inputs), and those states."""
    which, x0 = _first_tensor(args, kwargs)

    def call(x):
        if which == "arg":
            return block(x, *args[1:], **kwargs)
        return block(*args, **{**kwargs, "hidden_states": x})

    return call, x0


def _time_block(block: nn.Module, args, kwargs, grad_params: list[nn.Parameter], x_grad: bool) -> tuple[float, float]:
    """:func:`_time_call` of ``block`` alone on its captured inputs (its hidden states as ``x``)."""
    call, x0 = _block_call(block, args, kwargs)
    return _time_call(call, x0, list(block.parameters()), grad_params, x_grad)


def _time_eval_forward(block: nn.Module, args, kwargs) -> float:
    """Seconds of ``block``'s forward in eval mode without a graph (after one untimed call); leaves it in train mode."""
    call, x0 = _block_call(block, args, kwargs)
    block.eval()
    try:
        with torch.no_grad():
            call(x0)
            t0 = _now()
            call(x0)
            return _now() - t0
    finally:
        block.train()


def _median_ratios(rounds: int, one_round) -> tuple[float, ...]:
    """The median of each ratio over ``rounds`` calls of ``one_round`` (which times every mode once, in turn, and
    returns their ratios): a slow moment of a shared machine hits one round's timings alike."""
    ratios = [one_round() for _ in range(rounds)]
    return tuple(statistics.median(r[k] for r in ratios) for k in range(len(ratios[0])))


def _block_fractions(block: nn.Module, args, kwargs, rounds: int = 7) -> tuple[float, float]:
    """Backward time of one block with weight-only and input-only gradients, as fractions of full."""
    args, kwargs = _detached(args, kwargs)
    params = list(block.parameters())

    def one_round():
        full = _time_block(block, args, kwargs, params, True)[1]
        return _time_block(block, args, kwargs, params, False)[1] / full, _time_block(block, args, kwargs, [], True)[1] / full

    return _median_ratios(rounds, one_round)


def _plain_copy(block: nn.Module) -> nn.Module:
    """A copy of ``block`` with every peft layer replaced by its base layer: the plain block the profile timed
    (peft's wrappers cost time even with their adapters disabled)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    plain = copy.deepcopy(block)
    for name, module in list(plain.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent) if parent else plain, child, module.get_base_layer())
    return plain


def measure_block_cost(model: nn.Module, anatomy, batch: dict, adapter_params: set[int], *, bf16: bool = False,
                       rounds: int = 7) -> BlockCost:
    """Forward and backward factors of the method's adapters, on its middle block: the block's inputs are captured
    in one forward of ``model`` (the method's prepared model), then the block is timed with its peft adapters (only
    adapters trainable) and as the plain block (every weight trainable: the reference of the profile's fractions)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    block = anatomy.blocks[anatomy.num_blocks // 2]
    tuners = [m for m in block.modules() if isinstance(m, BaseTunerLayer)]
    adapters = [p for p in block.parameters() if id(p) in adapter_params]
    if not tuners or not adapters:
        return BlockCost()  # no peft adapters in this block: charged as a plain block
    captured = {}

    def grab(module, args, kwargs):
        captured.setdefault("inputs", (args, kwargs))

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            model(**batch)
    finally:
        handle.remove()
    args, kwargs = _detached(*captured["inputs"])
    plain = _plain_copy(block)
    was_training = block.training
    block.train()
    plain.train()

    def one_round():
        f_plain, b_full = _time_block(plain, args, kwargs, list(plain.parameters()), True)
        f_on, b_ax = _time_block(block, args, kwargs, adapters, True)
        b_a = _time_block(block, args, kwargs, adapters, False)[1]
        # In eval mode the adapters skip their dropout, which costs a train-mode forward more than their matmuls.
        f_eval = _time_eval_forward(block, args, kwargs) / _time_eval_forward(plain, args, kwargs)
        return f_on / f_plain, b_ax / b_full, b_a / b_full, f_eval

    try:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            forward, adapter, lowest, eval_forward = _median_ratios(rounds, one_round)
    finally:
        block.train(was_training)
    return BlockCost(forward_factor=forward, eval_forward_factor=eval_forward, adapter_fraction=adapter, adapter_lowest_fraction=lowest)


def method_block_cost(method: Method, model: nn.Module, batch: dict, *, bf16: bool = False) -> BlockCost:
    """The factors of ``method``'s own blocks in its prepared ``model``: MEFT's reversible layers
    (:func:`measure_reversible_block`), peft adapters (:func:`measure_block_cost`), else a plain block."""
    if not method.adapter_params:
        return BlockCost()
    if method.recomputed_blocks():
        return measure_reversible_block(model, method, batch, bf16=bf16)
    return measure_block_cost(model, method.anatomy, batch, method.adapter_params, bf16=bf16)


def measure_reversible_block(model: nn.Module, method: Method, batch: dict, *, bf16: bool = False, rounds: int = 7) -> BlockCost:
    """MEFT's middle reversible layer timed as the method runs it (a one-layer stack: forward without a graph,
    backward by reconstruction and recomputation, only adapters trainable) against the same block run plainly
    (forward without a graph; forward and full backward with every weight trainable)."""
    stack, ops = method.runner.stack, method.runner.ops
    layer = stack.layers[len(stack.layers) // 2]
    block = method.anatomy.blocks[layer.index]
    captured = {}
    run = stack.run

    def grab(h0, aux):
        captured.setdefault("inputs", (h0.detach(), aux))
        return run(h0, aux)

    stack.run = grab  # an instance attribute over the method, removed below
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            model(**batch)
    finally:
        del stack.run
    h0, aux = captured["inputs"]
    # The timing copy never raises nor tightens on a reconstruction error (the method's own limits stay on its stack).
    one = dataclasses.replace(stack, layers=[layer], errors={}, tightened=[], log=None, max_error=None, check=False)
    params = list(block.parameters())
    base = [p for p in params if id(p) not in method.adapter_params]
    adapters = [p for p in params if id(p) in method.adapter_params]
    plain = lambda x: ops.ordinary(block, x, aux)  # noqa: E731
    reversible = lambda x: one.run(x, aux)  # noqa: E731

    def one_round():
        with torch.no_grad():
            plain(h0)  # untimed first call, as in _time_call
            t0 = _now()
            plain(h0)
            f_plain = _now() - t0
        b_plain = _time_call(plain, h0, params, base, True)[1]
        f_rev, b_rev = _time_call(reversible, h0, params, adapters, True)
        b_low = _time_call(reversible, h0, params, adapters, False)[1]
        return f_rev / f_plain, b_rev / b_plain, b_low / b_plain

    was_training = block.training
    block.train()
    try:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            forward, adapter, lowest = _median_ratios(rounds, one_round)
    finally:
        block.train(was_training)
    return BlockCost(forward_factor=forward, adapter_fraction=adapter, adapter_lowest_fraction=lowest, reversible=True)


def profile_model(model: nn.Module, anatomy, batch: dict, *, reps: int = 3, bf16: bool = False) -> Profile:
    """Profile full fine-tuning of ``model`` on ``batch``: medians over ``reps`` rounds after a warm-up round, each
    round two training steps, each followed by a forward of every block as a block that does not train runs."""
    device = next(model.parameters()).device
    blocks = anatomy.blocks
    L = len(blocks)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    fwd_log: dict = {}
    bwd_log: dict = {}
    captured: dict = {}
    handles = []

    def pre(i):
        def hook(module, args, kwargs):
            fwd_log[("in", i)] = _now()
            which, x = _first_tensor(args, kwargs)
            if x is None or not x.requires_grad:
                return None
            if i == L // 2 and "args" not in captured:
                captured["args"], captured["kwargs"] = args, kwargs
            marked = _Mark.apply(x, bwd_log, ("in", i))
            if which == "arg":
                return (marked,) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": marked}

        return hook

    def post(i):
        def hook(module, args, kwargs, out):
            fwd_log[("out", i)] = _now()
            if isinstance(out, (tuple, list)):
                return type(out)([_Mark.apply(out[0], bwd_log, ("out", i)), *out[1:]]) if out[0].requires_grad else out
            return _Mark.apply(out, bwd_log, ("out", i)) if out.requires_grad else out

        return hook

    for i, b in enumerate(blocks):
        handles.append(b.register_forward_pre_hook(pre(i), with_kwargs=True))
        handles.append(b.register_forward_hook(post(i), with_kwargs=True))

    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-6, fused=fused_supported(device) or None)  # as the engine's
    ctx = (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def train_step() -> dict:
        fwd_log.clear()
        bwd_log.clear()
        t0 = _now()
        with ctx():
            loss = model(**batch).loss
        t1 = _now()
        loss.backward()
        t2 = _now()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        t_clip = _now()
        opt.step()
        t_step = _now()
        opt.zero_grad(set_to_none=True)
        t3 = _now()
        return dict(fb=[fwd_log[("out", i)] - fwd_log[("in", i)] for i in range(L)],
                    bb=[bwd_log[("in", i)] - bwd_log[("out", i)] for i in range(L)],
                    fe=fwd_log[("in", 0)] - t0, fh=t1 - fwd_log[("out", L - 1)], bh=bwd_log[("out", L - 1)] - t1,
                    be=t2 - bwd_log[("in", 0)], clip=t_clip - t2, opt=t_step - t_clip, zero=t3 - t_step, step=t3 - t0)

    def frozen_forward(eval_mode: bool) -> list[float]:
        """Each block's forward as layerwise runs the blocks below the lowest trainable one: grad mode on, no
        parameter requiring a gradient, so no graph; in eval mode (``train.frozen_dropout`` off, the default) or in
        train mode (on). A frozen block above a trainable one records a graph for the gradient that crosses it: it
        is charged this eval-mode time too, an underestimate when such blocks run in eval mode."""
        fwd_log.clear()
        model.train(not eval_mode)
        try:
            for p in params:
                p.requires_grad_(False)
            with ctx():
                model(**batch)
        finally:
            for p in params:
                p.requires_grad_(True)
            model.train()
        return [fwd_log[("out", i)] - fwd_log[("in", i)] for i in range(L)]

    rows, eval_rows, nograd_rows = [], [], []
    try:
        # Each frozen forward right after a training step, as in a method's step (back-to-back forwards alone ran
        # faster than the same blocks inside training steps), and beside it in time (the machine's speed drifts).
        for rep in range(reps + 1):
            first = train_step()
            evals = frozen_forward(eval_mode=True)
            second = train_step()
            nograds = frozen_forward(eval_mode=False)
            if rep:  # the first round warms up
                rows += [first, second]
                eval_rows.append(evals)
                nograd_rows.append(nograds)
        # The head's backward with its weights frozen (a plan whose head does not train still sends the gradient
        # through it); a tied LM head's weight is the embedding matrix, frozen here with it.
        head_params = [p for m in anatomy.head_modules() for p in m.parameters()]
        frozen_head = []
        try:
            for p in head_params:
                p.requires_grad_(False)
            for rep in range(reps + 1):
                bwd_log.clear()
                with ctx():
                    loss = model(**batch).loss
                t1 = _now()
                loss.backward()
                model.zero_grad(set_to_none=True)
                if rep:
                    frozen_head.append(bwd_log[("out", L - 1)] - t1)
        finally:
            for p in head_params:
                p.requires_grad_(True)
    finally:
        for h in handles:
            h.remove()
    med = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
    medv = lambda key: [statistics.median(r[key][i] for r in rows) for i in range(L)]  # noqa: E731
    args, kwargs = captured["args"], captured["kwargs"]
    with ctx():
        r_w, r_in = _block_fractions(blocks[L // 2], args, kwargs)
    n = sum(p.numel() for p in model.parameters())
    return Profile(
        forward_blocks=medv("fb"),
        backward_blocks=medv("bb"),
        forward_embeddings=med("fe"),
        backward_embeddings=med("be"),
        forward_head=med("fh"),
        backward_head=med("bh"),
        optimizer_per_param=med("opt") / n,
        clip_per_param=med("clip") / n,
        zero_grad_per_param=med("zero") / n,
        backward_head_frozen=statistics.median(frozen_head),
        batch_size=int(next(v for v in batch.values() if torch.is_tensor(v)).shape[0]),
        weight_only_fraction=r_w,
        input_only_fraction=r_in,
        step_seconds=med("step"),
        total_params=n,
        forward_blocks_eval=[statistics.median(r[i] for r in eval_rows) for i in range(L)],
        forward_blocks_nograd=[statistics.median(r[i] for r in nograd_rows) for i in range(L)],
    )


def predicted_speedup(profile: Profile, method: Method, steps: dict[int, Plan], frozen_eval: bool = False,
                      block: BlockCost = BlockCost()) -> dict:
    """Predicted step time of ``method`` over the ``steps`` it ran (step index -> plan), by phase and in total,
    and the tokens/s ratio over full fine-tuning's predicted step; ``charges`` and ``block_cost`` keep what was
    charged, so :func:`predict_charges` can predict the same steps from another profile."""
    charges = [asdict(charge_for(method, plan, step, frozen_eval)) for step, plan in steps.items()]
    return predict_charges(profile, charges, asdict(block))


def predict_charges(profile: Profile, charges: list[dict], block: dict) -> dict:
    """:func:`predicted_speedup` from recorded charges (``Charge`` fields as JSON) and block factors."""
    cost = BlockCost(**block)
    per_step = [profile.phases(Charge(**{k: tuple(v) if isinstance(v, list) else v for k, v in c.items()}), cost) for c in charges]
    keys = ("method_hook", "forward", "backward", "optimizer", "other", "total")
    phases = {k: statistics.fmean(ph[k] for ph in per_step) for k in keys}
    t_full = profile.predict(full_charge(profile))
    return {"predicted_step_seconds": phases["total"], "predicted_full_step_seconds": t_full,
            "predicted_speedup": t_full / phases["total"], "phases": phases, "block_cost": block, "charges": charges}


def median_profile(profiles: list[Profile]) -> Profile:
    """Each measured time the median over ``profiles`` (per block for the per-block lists): profiles taken at several
    moments of a shared machine, so that one slow or fast moment does not move every prediction."""
    def med(values):
        first = values[0]
        if isinstance(first, list):
            return [statistics.median(v[i] for v in values) for i in range(len(first))]
        if isinstance(first, float):
            return statistics.median(values)
        return first  # counts (parameters, batch size): the same in every profile

    fields = [f.name for f in dataclasses.fields(Profile)]
    return Profile(**{name: med([getattr(p, name) for p in profiles]) for name in fields})
