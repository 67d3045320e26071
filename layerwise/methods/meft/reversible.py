"""Reversible two-stream couplings with a memory-saving backward (used by the ``meft`` method).

A reversible layer maps two streams ``(x1, x2)`` to

    y1 = lam  * x1 + F(x2)
    y2 = beta * x2 + G(y1)

(and optionally swaps them: ``(x1, x2) <- (y2, y1)``). Its inputs can be recovered from its
outputs: ``x2 = (y2 - G(y1)) / beta``, ``x1 = (y1 - F(x2)) / lam``. :class:`ReversibleStackFunction`
runs a stack of such layers without recording a graph, saves only the output streams (plus
optional *anchors*: the exact input streams of every k-th layer) and, in backward, walks the
stack top-down, reconstructing each layer's inputs, recomputing F and G with grad enabled and
back-propagating through them with :func:`torch.autograd.grad`.

Exactness:

* dropout masks are replayed: the CPU (and CUDA) RNG state is captured before every F and every
  G call in forward and restored before the same call in backward (the caller's RNG state is put
  back afterwards);
* autocast state of the forward is re-entered in backward;
* the coupling arithmetic (scale, add, subtract, divide) runs in the *stream dtype*: float32, or
  float64 when the model is float64, never bf16/fp16 even under autocast.

Reconstruction divides by ``lam``/``beta`` at each layer, so rounding error grows about
``1/lam`` (or ``1/beta``) per layer. Anchors bound the length of a reconstruction chain; at each
anchored (or, in check mode, stored) layer the reconstructed inputs are compared with the stored
ones and the relative error is recorded in :attr:`ReversibleStack.errors`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from layerwise.errors import LayerwiseError


class ReconstructionError(LayerwiseError, FloatingPointError):
    """Reconstructed layer inputs differ from the stored ones by more than the configured bound."""


class Adapter(nn.Module):
    """Bottleneck adapter: Linear(d->r), GELU, dropout, Linear(r->d); weights N(0, 0.02^2), biases 0."""

    def __init__(self, d: int, r: int, dropout: float = 0.0, *, dtype=None, device=None):
        super().__init__()
        self.down = nn.Linear(d, r, dtype=dtype, device=device)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(r, d, dtype=dtype, device=device)
        for lin in (self.down, self.up):
            nn.init.normal_(lin.weight, mean=0.0, std=0.02)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.down(x))))


@dataclass
class RevLayer:
    """One reversible layer: ``f``/``g`` are callables ``(x, aux) -> Tensor``; ``params`` the
    parameters (of F and G) that may need gradients; ``index`` the model's block index."""

    f: Callable[[torch.Tensor, dict], torch.Tensor]
    g: Callable[[torch.Tensor, dict], torch.Tensor]
    params: list[nn.Parameter]
    lam: float
    beta: float
    swap: bool
    index: int = 0


def stream_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, the dtype itself for float32/float64."""
    return torch.promote_types(dtype, torch.float32)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    num = float(torch.linalg.vector_norm((a - b).double()))
    den = float(torch.linalg.vector_norm(b.double()))
    return num / den if den > 0 else num


class _RNG:
    """Capture / restore the CPU RNG and, when the tensors are on CUDA, that device's RNG."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def get(self):
        cpu = torch.get_rng_state()
        gpu = torch.cuda.get_rng_state(self.device) if self.cuda else None
        return cpu, gpu

    def set(self, state) -> None:
        cpu, gpu = state
        torch.set_rng_state(cpu)
        if gpu is not None:
            torch.cuda.set_rng_state(gpu, self.device)


@dataclass
class ReversibleStack:
    """A stack of :class:`RevLayer` plus the numerical-safety settings and the last measurements.

    ``anchor_every``: 0 = store only the output (the paper); k >= 1 = also store the exact input
    streams of layers 0, k, 2k, ... of the stack (k = 1: no reconstruction is used at all).
    ``check``: also store every layer's inputs, only to compare them with the reconstruction.
    ``max_error``: bound on the recorded relative error; ``on_error``: "anchor" (halve
    ``anchor_every`` for the next steps, warn) or "stop" (raise :class:`ReconstructionError`).
    ``reversible``: False runs the same couplings with ordinary autograd (reference / debugging).
    """

    layers: list[RevLayer]
    anchor_every: int = 0
    check: bool = False
    max_error: float | None = None
    on_error: str = "anchor"
    reversible: bool = True
    errors: dict[int, float] = field(default_factory=dict)
    """Relative reconstruction error of the inputs of each measured block (last backward)."""
    max_seen: float = 0.0
    tightened: list[dict] = field(default_factory=list)
    log: Callable[[str], None] | None = None

    def run(self, h0: torch.Tensor, aux: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The two output streams for input ``h0`` (both streams start as ``h0``), in stream dtype."""
        if not self.reversible or not torch.is_grad_enabled():
            return _plain_forward(self.layers, h0, aux)
        params = []
        seen = set()
        for layer in self.layers:
            for p in layer.params:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        if not params and not h0.requires_grad:
            return _plain_forward(self.layers, h0, aux)
        leaves, spec = tree_flatten(aux)
        return ReversibleStackFunction.apply(self, spec, len(leaves), h0, *leaves, *params)

    # ------------------------------------------------------------------------------------
    def anchored(self, j: int) -> bool:
        k = self.anchor_every
        return k > 0 and j % k == 0

    def _after_backward(self) -> None:
        if not self.errors:
            return
        worst_j = max(self.errors, key=self.errors.get)
        worst = self.errors[worst_j]
        self.max_seen = max(self.max_seen, worst) if math.isfinite(worst) else float("inf")
        if self.max_error is None or self.anchor_every == 1:
            return  # k = 1: every layer's inputs are exact, nothing reconstructed is used
        if worst <= self.max_error:
            return
        msg = (
            f"MEFT: relative reconstruction error {worst:.2e} at block {worst_j} exceeds "
            f"method.max_reconstruction_error={self.max_error:g} (anchor_every={self.anchor_every})"
        )
        if self.on_error == "stop":
            raise ReconstructionError(
                msg + ": set method.anchor_every to a smaller value (1 = no reconstruction) or method.on_error=anchor"
            )
        n = len(self.layers)
        old = self.anchor_every
        self.anchor_every = max(1, (old if old > 0 else n) // 2)
        self.tightened.append({"error": worst, "block": worst_j, "anchor_every": self.anchor_every})
        if self.log:
            self.log(msg + f"; storing exact streams every {self.anchor_every} layers from now on")


def _plain_forward(layers: Sequence[RevLayer], h0: torch.Tensor, aux: dict):
    sd = stream_dtype(h0.dtype)
    x1 = x2 = h0.to(sd)
    for layer in layers:
        y1 = layer.lam * x1 + layer.f(x2, aux).to(sd)
        y2 = layer.beta * x2 + layer.g(y1, aux).to(sd)
        x1, x2 = (y2, y1) if layer.swap else (y1, y2)
    return x1, x2


def _autocast_state(device_type: str):
    enabled = torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type) if enabled else None
    return device_type, enabled, dtype


def _autocast(state):
    device_type, enabled, dtype = state
    if not enabled:
        return torch.autocast(device_type=device_type, enabled=False)
    return torch.autocast(device_type=device_type, dtype=dtype)


class ReversibleStackFunction(torch.autograd.Function):
    """Forward without a graph; backward by reconstruction (see the module docstring)."""

    @staticmethod
    def forward(ctx, stack: ReversibleStack, spec, n_aux: int, h0: torch.Tensor, *rest):
        aux_leaves = list(rest[:n_aux])
        params = list(rest[n_aux:])
        aux = tree_unflatten(aux_leaves, spec)
        sd = stream_dtype(h0.dtype)
        rng = _RNG(h0.device)
        states = []
        anchors: dict[int, tuple[int, int]] = {}
        checks: dict[int, tuple[int, int]] = {}
        stored: list[torch.Tensor] = []

        def store(t: torch.Tensor) -> int:
            for i, s in enumerate(stored):
                if s is t:
                    return i
            stored.append(t)
            return len(stored) - 1

        x1 = x2 = h0.detach().to(sd)
        for j, layer in enumerate(stack.layers):
            if stack.anchored(j):
                anchors[j] = (store(x1), store(x2))
            elif stack.check:
                checks[j] = (store(x1), store(x2))
            sf = rng.get()
            y1 = layer.lam * x1 + layer.f(x2, aux).to(sd)
            sg = rng.get()
            y2 = layer.beta * x2 + layer.g(y1, aux).to(sd)
            states.append((sf, sg))
            x1, x2 = (y2, y1) if layer.swap else (y1, y2)
        out1, out2 = x1, x2
        tensor_aux = [i for i, leaf in enumerate(aux_leaves) if isinstance(leaf, torch.Tensor)]
        ctx.save_for_backward(out1, out2, *stored, *[aux_leaves[i] for i in tensor_aux])
        ctx.meta = (stack, spec, aux_leaves, tensor_aux, len(stored), anchors, checks, states, rng, sd,
                    _autocast_state(h0.device.type), len(params), h0.dtype)
        return out1, out2

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d1, d2):
        stack, spec, aux_leaves, tensor_aux, n_stored, anchors, checks, states, rng, sd, ac, n_params, in_dtype = ctx.meta
        saved = ctx.saved_tensors
        x1, x2 = saved[0], saved[1]
        stored = saved[2:2 + n_stored]
        leaves = list(aux_leaves)
        for i, t in zip(tensor_aux, saved[2 + n_stored:]):
            leaves[i] = t
        aux = tree_unflatten(leaves, spec)
        params = stack_params = []
        # Map parameters (in the order given to apply) to gradient slots.
        seen: dict[int, int] = {}
        for layer in stack.layers:
            for p in layer.params:
                if p.requires_grad and id(p) not in seen:
                    seen[id(p)] = len(seen)
                    stack_params.append(p)
        grads: list[torch.Tensor | None] = [None] * len(params)
        dx1 = torch.zeros_like(x1) if d1 is None else d1.to(sd)
        dx2 = torch.zeros_like(x2) if d2 is None else d2.to(sd)
        need_input_grad = ctx.needs_input_grad[3]
        errors: dict[int, float] = {}
        caller_state = rng.get()
        try:
            for j in range(len(stack.layers) - 1, -1, -1):
                layer = stack.layers[j]
                sf, sg = states[j]
                if layer.swap:
                    y1, y2, dy1, dy2 = x2, x1, dx2, dx1
                else:
                    y1, y2, dy1, dy2 = x1, x2, dx1, dx2
                lp = [p for p in layer.params if p.requires_grad]
                # G: recompute on y1, back-propagate dy2.
                rng.set(sg)
                with torch.enable_grad(), _autocast(ac):
                    y1_ = y1.detach().requires_grad_(True)
                    g = layer.g(y1_, aux).to(sd)
                gr = torch.autograd.grad(g, [y1_, *lp], dy2, allow_unused=True)
                dy1 = dy1 + gr[0]
                _accumulate(grads, seen, lp, gr[1:])
                with torch.no_grad():
                    x2 = (y2 - g.detach()) / layer.beta
                del g
                exact = anchors.get(j)
                err2 = None
                if exact is not None:
                    err2 = rel_error(x2, stored[exact[1]])
                    x2 = stored[exact[1]]
                # F: recompute on x2, back-propagate dy1.
                rng.set(sf)
                want_dx = j > 0 or need_input_grad
                with torch.enable_grad(), _autocast(ac):
                    x2_ = x2.detach().requires_grad_(want_dx)
                    f = layer.f(x2_, aux).to(sd)
                inputs = ([x2_] if want_dx else []) + lp
                fr = torch.autograd.grad(f, inputs, dy1, allow_unused=True) if inputs else ()
                if want_dx:
                    gx2, fr = fr[0], fr[1:]
                else:
                    gx2 = None
                _accumulate(grads, seen, lp, fr)
                with torch.no_grad():
                    x1 = (y1 - f.detach()) / layer.lam
                del f
                if exact is not None:
                    errors[layer.index] = max(err2, rel_error(x1, stored[exact[0]]))
                    x1 = stored[exact[0]]
                elif j in checks:
                    c1, c2 = checks[j]
                    errors[layer.index] = max(rel_error(x1, stored[c1]), rel_error(x2, stored[c2]))
                dx2 = layer.beta * dy2 + (gx2 if gx2 is not None else 0)
                dx1 = layer.lam * dy1
        finally:
            rng.set(caller_state)
        stack.errors = errors
        stack._after_backward()
        dh0 = (dx1 + dx2).to(in_dtype) if need_input_grad else None
        return (None, None, None, dh0, *([None] * len(aux_leaves)), *grads)


def _accumulate(grads, slots, params, new) -> None:
    for p, g in zip(params, new):
        if g is None:
            continue
        i = slots[id(p)]
        grads[i] = g if grads[i] is None else grads[i] + g
