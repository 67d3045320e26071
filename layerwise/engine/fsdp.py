"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the data-parallel path: ``train.fsdp: true``.

One FSDP unit per transformer block (``Anatomy.blocks``), then one for the root (embeddings,
head and anything else). Every parameter becomes a DTensor sharded over the ranks on dim 0;
forward all-gathers a unit's parameters when it runs, backward reduce-scatters the gradients
of the parameters that require grad (averaged over ranks), and the optimizer steps on the
local shards. Switching the trainable set between steps needs nothing from FSDP: the
:class:`~layerwise.engine.optim.ActiveOptimizer` flips ``requires_grad`` and replaces its param
groups as in a single process, and frozen units produce no gradient and no reduce-scatter.

Methods: ``full``, ``freeze`` and ``lift`` (checked with torchrun on CPU/gloo against one
process: tests/test_fsdp.py). ``lora`` is refused: on torch 2.13 CPU/gloo the PEFT model sharded
this way gives a loss without grad_fn at the first backward (not solved here). Others are refused
as untested: ``ist`` and ``meft`` change the blocks' forward (suppression scales, reversible
couplings) under FSDP's hooks; ``salf`` and ``lisa`` were not run with it. ``train.frozen_dtype=bf16`` (per-block dtype changes) and gradient
checkpointing are refused too.

Checkpoints hold full tensors (each DTensor is gathered with ``full_tensor()``, a collective every
rank joins since every rank saves), so they are the same files as without FSDP and a run can be
resumed with or without it.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from layerwise.errors import ConfigError
from layerwise.methods import Method, names_where


def check_fsdp(cfg, method: type[Method], distributed) -> None:
    """Refuse ``train.fsdp`` where it cannot work (or was not verified) with a message naming the fix."""
    if method.fsdp_refusal:
        raise ConfigError(f"train.fsdp=true with {method.name} {method.fsdp_refusal}")
    if not method.fsdp_ok:
        raise ConfigError(
            f"train.fsdp=true supports the methods {', '.join(names_where(lambda m: m.fsdp_ok))}, not '{method.name}': "
            "set train.fsdp=false (data parallel without sharding works for every method)"
        )
    if not distributed:
        raise ConfigError(
            "train.fsdp=true shards the model over processes: launch with torchrun or accelerate launch (2 or more processes), "
            "or set train.fsdp=false"
        )
    if cfg.frozen_dtype != "fp32":
        raise ConfigError("train.fsdp=true cannot change a sharded block's dtype between steps: set train.frozen_dtype=fp32")
    if cfg.gradient_checkpointing:
        raise ConfigError("train.fsdp=true with train.gradient_checkpointing is not supported here: set one of them to false")
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        raise ConfigError("this torch has no torch.distributed.fsdp.fully_shard (FSDP2, torch >= 2.6): set train.fsdp=false") from None


def shard_model(model: torch.nn.Module, anatomy) -> int:
    """``fully_shard`` every block, then the root; returns the number of FSDP units."""
    from torch.distributed.fsdp import fully_shard

    for block in anatomy.blocks:
        fully_shard(block)
    fully_shard(model)
    return anatomy.num_blocks + 1


def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective), else ``t``."""
    return t.full_tensor() if is_dtensor(t) else t


def like(target: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor, the same on every rank) laid out like ``target`` (sharded if it is a DTensor)."""
    if not is_dtensor(target):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(target.device), target.device_mesh, target.placements, src_data_rank=None)


class LossSync:
    """Under FSDP the gradients are already averaged by the reduce-scatter; only the loss is averaged here."""

    def __init__(self, world: int, group=None):
        self.world, self.group = world, group
        self.calls = 0
        self.bytes = 0
        self.seconds = 0.0

    def __call__(self, params, loss: float) -> float:
        t0 = time.perf_counter()
        flat = torch.tensor([loss], dtype=torch.float64)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        self.calls += 1
        self.seconds += time.perf_counter() - t0
        return float(flat[0] / self.world)
