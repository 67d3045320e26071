"""Cost model: the best speedup a method can reach, from measured per-block times.

One full fine-tuning step is profiled with marker functions at every block boundary: the
forward time of each block (pre/post hooks) and its backward time (the moment the
gradient reaches the block's output and the moment it leaves through its input). One
block is then timed alone in three backward modes: full (input and weight gradients),
weight-only (the lowest trainable block: nothing flows below it) and input-only (a frozen
block that gradient must cross). The optimizer step is timed over all parameters and
scaled per parameter.

For a plan (trainable blocks, embeddings, head) the predicted step time is::

    T = F  +  B_head  +  sum_i c_i  +  [B_emb if embeddings train]  +  opt_per_param * n_trainable

with c_i = B_i for a trainable block above the lowest trainable point, B_i * r_weight for
the lowest one, B_i * r_input for a frozen block above it, and 0 below it. Forward is
charged in full (a frozen prefix still runs forward), so the prediction is an upper bound
on the equal-batch speedup.
"""

from __future__ import annotations

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


@dataclass
class Profile:
    forward_blocks: list[float]
    backward_blocks: list[float]
    forward_embeddings: float
    backward_embeddings: float
    forward_head: float
    backward_head: float
    optimizer_per_param: float
    weight_only_fraction: float
    input_only_fraction: float
    step_seconds: float
    total_params: int
    forward_blocks_eval: list[float] | None = None
    """Forward time of each block in eval mode (no dropout): what a block that does not train
    costs when ``train.frozen_dropout`` is off."""

    @property
    def forward(self) -> float:
        return self.forward_embeddings + sum(self.forward_blocks) + self.forward_head

    def predict(self, plan: Plan, trainable_params: int, adapter_only: bool = False, frozen_eval: bool = False) -> float:
        """Predicted seconds for one optimizer step under ``plan``; ``frozen_eval``: blocks
        outside the plan run their forward in eval mode."""
        t = self.forward
        if frozen_eval and self.forward_blocks_eval:
            for i, (f_train, f_eval) in enumerate(zip(self.forward_blocks, self.forward_blocks_eval)):
                if i not in plan.blocks:
                    t += f_eval - f_train
        lowest = plan.lowest
        if lowest is None and not plan.head:
            return t + self.optimizer_per_param * trainable_params
        t += self.backward_head
        if lowest is not None:
            for i, b in enumerate(self.backward_blocks):
                if i < lowest:
                    continue
                trains = (i in plan.blocks) and not adapter_only
                if i == lowest and not plan.embeddings:
                    # Adapters in the lowest block still need its input for their weight gradient only.
                    t += b * (self.weight_only_fraction if trains else self.input_only_fraction * 0.5)
                else:
                    t += b if trains else b * self.input_only_fraction
            if plan.embeddings:
                t += self.backward_embeddings
        return t + self.optimizer_per_param * trainable_params

    def to_dict(self) -> dict:
        d = asdict(self)
        d["forward"] = self.forward
        return d


def _block_fractions(block: nn.Module, args, kwargs, reps: int = 3) -> tuple[float, float]:
    """Backward time of one block with weight-only and input-only gradients, as fractions of full."""
    params = [p for p in block.parameters()]
    saved = [p.requires_grad for p in params]
    # Captured inputs may hang on the profiled step's (freed) graph: use detached copies.
    det = lambda v: v.detach() if torch.is_tensor(v) else (type(v)(det(u) for u in v) if isinstance(v, tuple) else v)  # noqa: E731
    args, kwargs = tuple(det(a) for a in args), {k: det(v) for k, v in kwargs.items()}
    for key, value in list(kwargs.items()):
        if key in ("past_key_values", "past_key_value", "cache") or type(value).__name__.endswith("Cache"):
            kwargs[key] = None  # a KV cache from the profiled step would grow (and hold its graph)
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    which, x0 = _first_tensor(args, kwargs)

    def timed(x_grad: bool, w_grad: bool) -> float:
        for p in params:
            p.requires_grad_(w_grad)
        times = []
        for _ in range(reps + 1):
            x = x0.detach().requires_grad_(x_grad)
            a, k = (((x,) + tuple(args[1:])), kwargs) if which == "arg" else (args, {**kwargs, "hidden_states": x})
            out = block(*a, **k)
            out = out[0] if isinstance(out, (tuple, list)) else out
            loss = out.float().pow(2).mean()
            t0 = _now()
            loss.backward()
            times.append(_now() - t0)
            for p in params:
                p.grad = None
        return statistics.median(times[1:])

    try:
        full = timed(True, True)
        weight_only = timed(False, True)
        input_only = timed(True, False)
    finally:
        for p, rg in zip(params, saved):
            p.requires_grad_(rg)
    return weight_only / full, input_only / full


def profile_model(model: nn.Module, anatomy, batch: dict, *, reps: int = 3, bf16: bool = False) -> Profile:
    """Profile full fine-tuning of ``model`` on ``batch`` (median over ``reps`` after a warm-up)."""
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

    opt = torch.optim.AdamW([p for p in model.parameters()], lr=1e-6, fused=fused_supported(device) or None)  # as the engine's
    ctx = (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)) if bf16 else None
    rows = []
    try:
        for rep in range(reps + 1):
            fwd_log.clear()
            bwd_log.clear()
            t0 = _now()
            if ctx:
                with ctx():
                    loss = model(**batch).loss
            else:
                loss = model(**batch).loss
            t1 = _now()
            loss.backward()
            t2 = _now()
            torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            t3 = _now()
            if rep == 0:
                continue  # warm-up
            fb = [fwd_log[("out", i)] - fwd_log[("in", i)] for i in range(L)]
            bb = [bwd_log[("in", i)] - bwd_log[("out", i)] for i in range(L)]
            rows.append(
                dict(
                    fb=fb,
                    bb=bb,
                    fe=fwd_log[("in", 0)] - t0,
                    fh=t1 - fwd_log[("out", L - 1)],
                    bh=bwd_log[("out", L - 1)] - t1,
                    be=t2 - bwd_log[("in", 0)],
                    opt=t3 - t2,
                    step=t3 - t0,
                )
            )
        # Forward of every block in eval mode (no dropout), for blocks that do not train.
        model.eval()
        eval_rows = []
        with torch.no_grad():
            for rep in range(reps + 1):
                fwd_log.clear()
                if ctx:
                    with ctx():
                        model(**batch)
                else:
                    model(**batch)
                if rep:
                    eval_rows.append([fwd_log[("out", i)] - fwd_log[("in", i)] for i in range(L)])
        model.train()
    finally:
        for h in handles:
            h.remove()
    med = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
    medv = lambda key: [statistics.median(r[key][i] for r in rows) for i in range(L)]  # noqa: E731
    args, kwargs = captured["args"], captured["kwargs"]
    if ctx:
        with ctx():
            r_w, r_in = _block_fractions(blocks[L // 2], args, kwargs)
    else:
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
        weight_only_fraction=r_w,
        input_only_fraction=r_in,
        step_seconds=med("step"),
        total_params=n,
        forward_blocks_eval=[statistics.median(r[i] for r in eval_rows) for i in range(L)],
    )


def predicted_speedup(profile: Profile, method: Method, plans: list[Plan], frozen_eval: bool = False) -> dict:
    """Ideal tokens/s ratio of ``method`` over full fine-tuning, averaged over the steps' ``plans``."""
    full_plan = Plan(tuple(range(len(profile.backward_blocks))), embeddings=True, head=True)
    t_full = profile.predict(full_plan, profile.total_params)
    times = []
    cache: dict = {}
    for plan in plans:
        if plan not in cache:
            n = sum(p.numel() for p in method.parameters(plan))
            cache[plan] = profile.predict(plan, n, adapter_only=method.adapter_only, frozen_eval=frozen_eval)
        times.append(cache[plan])
    t_method = sum(times) / max(len(times), 1)
    return {"predicted_step_seconds": t_method, "predicted_full_step_seconds": t_full, "predicted_speedup": t_full / t_method}
