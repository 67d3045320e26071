"""``ActiveOptimizer``: an AdamW that owns exactly the active parameters.

On a switch the parameter groups are replaced in place (so an LR scheduler bound to the
optimizer keeps working) and the leaving parameters' state is dropped (``reset``) or
stashed off the device and restored when they come back (``keep``). Parameters outside
the active set are never in a param group, so they cannot drift through momentum or
weight decay, and their ``.grad`` is set to ``None``.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn


def fused_supported(device: torch.device | str) -> bool:
    """Whether torch's fused AdamW kernel runs on ``device`` (one kernel over all active parameters;
    the same update as the for-each implementation up to float rounding)."""
    return torch.device(device).type in ("cpu", "cuda")


def _is_decayed(p: nn.Parameter) -> bool:
    # Biases and norm gains (1-D) are not weight-decayed, as in most HF recipes.
    return p.ndim >= 2


class ActiveOptimizer:
    def __init__(
        self,
        params: Iterable[nn.Parameter],
        *,
        lr: float,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        state_policy: str = "reset",
        fused: bool = False,
        lr_scale: Callable[[nn.Parameter], float] | None = None,
        scales: Iterable[float] = (),
    ):
        if state_policy not in ("reset", "keep", "retain"):
            raise ValueError(f"optimizer_state must be 'reset', 'keep' or 'retain', got {state_policy!r}")
        self.state_policy = state_policy
        # Two groups (decayed, not decayed) per lr multiplier; the first two are the plain lr, so
        # param_groups[0]["lr"] is train.lr's schedule. A scheduler scales every group alike.
        self.scales = [1.0] + sorted({float(x) for x in scales} - {1.0})
        for x in self.scales:
            if not (x > 0 and math.isfinite(x)):
                raise ValueError(f"lr scales must be finite and > 0, got {x}")
        self._lr_scale = lr_scale
        groups = []
        for x in self.scales:
            groups += [{"params": [], "weight_decay": weight_decay, "lr": lr * x}, {"params": [], "weight_decay": 0.0, "lr": lr * x}]
        self.optimizer = torch.optim.AdamW(
            groups,
            lr=lr,
            betas=betas,
            eps=eps,
            fused=fused or None,
        )
        self._stash: dict[nn.Parameter, dict] = {}
        self.active: list[nn.Parameter] = []
        self.set_active(params)

    @property
    def fused(self) -> bool:
        """Whether the step runs torch's fused AdamW kernel."""
        return bool(self.optimizer.defaults.get("fused"))

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def set_active(self, params: Iterable[nn.Parameter]) -> None:
        """Make ``params`` the trainable set: requires_grad, param groups and state follow."""
        new = list(dict.fromkeys(params))  # dedupe, keep order
        new_ids = {id(p) for p in new}
        for p in self.active:
            if id(p) in new_ids:
                continue
            p.grad = None
            p.requires_grad_(False)
            if self.state_policy == "retain":
                # State stays in place, untouched, as in one optimizer over all parameters whose
                # inactive ones have grad None (IST). Counted by state_bytes().
                continue
            state = self.optimizer.state.pop(p, None)
            if state and self.state_policy == "keep":
                self._stash[p] = {k: (v.to("cpu", copy=True) if torch.is_tensor(v) else v) for k, v in state.items()}
        for p in new:
            p.requires_grad_(True)
            if p in self._stash:
                saved = self._stash.pop(p)
                self.optimizer.state[p] = {k: (v.to(p.device) if torch.is_tensor(v) else v) for k, v in saved.items()}
        slot = {x: 2 * i for i, x in enumerate(self.scales)}
        for g in self.optimizer.param_groups:
            g["params"] = []
        for p in new:
            x = float(self._lr_scale(p)) if self._lr_scale is not None else 1.0
            if x not in slot:
                raise ValueError(f"lr scale {x} of a parameter was not declared (declared: {self.scales})")
            self.optimizer.param_groups[slot[x] + (0 if _is_decayed(p) else 1)]["params"].append(p)
        self.active = new

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def state_bytes(self) -> int:
        """Bytes of optimizer state held on the device (the active set's; with ``retain`` also the inactive ones')."""
        return sum(v.nbytes for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v))

    def stashed_bytes(self) -> int:
        """Bytes of state stashed off the device for inactive parameters (``keep`` policy)."""
        return sum(v.nbytes for s in self._stash.values() for v in s.values() if torch.is_tensor(v))

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()
