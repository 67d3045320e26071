"""Measuring what a step costs: bytes saved for backward, parameter/grad/optimizer bytes,
peak process memory (peak RSS on CPU, ``max_memory_allocated`` on CUDA)."""

from __future__ import annotations

import contextlib
import resource

import torch
from torch import nn


class SavedTensorMeter:
    """Counts the bytes autograd saves for backward, via ``saved_tensors_hooks``.

    Each storage is counted once; storages that belong to parameters are not activations
    and are excluded (autograd saves weights for the input gradient, but they exist anyway).
    """

    def __init__(self, model: nn.Module):
        self.refresh(model)
        self.last_bytes = 0

    def refresh(self, model: nn.Module) -> None:
        # FSDP (train.fsdp): a DTensor parameter's storage is its local shard; a quantized weight
        # (train.frozen_dtype=int8) is its inner tensors.
        self._param_ptrs = {t.untyped_storage().data_ptr() for p in model.parameters() for t in leaves(p)}

    @contextlib.contextmanager
    def track(self):
        seen: dict[int, int] = {}
        param_ptrs = self._param_ptrs

        def pack(t: torch.Tensor):
            try:
                storage = t.untyped_storage()
            except (RuntimeError, NotImplementedError):  # e.g. sparse or meta tensors
                return t
            ptr = storage.data_ptr()
            if ptr not in param_ptrs and ptr not in seen:
                seen[ptr] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield seen
        self.last_bytes = sum(seen.values())


def leaves(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding ``t``'s data: itself, a DTensor's local shard, or the inner tensors of
    a tensor subclass such as torchao's ``Int8Tensor`` (int8 values and their scales)."""
    if hasattr(t, "to_local"):
        return [t.to_local()]
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return [leaf for name in names for leaf in leaves(getattr(t, name))]
    return [t]


def tensor_bytes(t: torch.Tensor) -> int:
    return sum(leaf.nbytes for leaf in leaves(t))


def param_bytes(model: nn.Module) -> int:
    return sum(tensor_bytes(p) for p in model.parameters())


def grad_bytes(params) -> int:
    return sum(p.grad.nbytes for p in params if p.grad is not None)


class PeakMemory:
    """Measured peak memory of the process during a window: VmHWM on Linux CPU (reset through
    /proc/self/clear_refs), ``torch.cuda.max_memory_allocated`` on CUDA; and the same above what was
    in use when the window began (the loaded model), which is what training itself adds."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_memory_allocated" if device.type == "cuda" else "peak_rss"
        self.baseline = 0

    def reset(self) -> None:
        """Start a window: the peak restarts from the memory in use now, which becomes the baseline."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = int(torch.cuda.memory_allocated(self.device))
            return
        with contextlib.suppress(OSError):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        self.baseline = _status_bytes("VmRSS:") or 0

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        peak = _status_bytes("VmHWM:")
        return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def peak_above_baseline(self) -> int:
        return max(0, self.peak_bytes() - self.baseline)


def _status_bytes(field: str) -> int | None:
    """A size field of /proc/self/status (Linux), in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def format_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
