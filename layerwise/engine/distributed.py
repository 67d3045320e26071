"""Data parallel training while the trainable set changes (``torchrun`` / ``accelerate launch``).

Mechanism: no DDP wrapper. Every rank holds the whole model and runs the same method with
the same seed, so the plan (LIFT phase, LISA draw, IST selection from identical scores) is the
same on every rank without any communication. Each rank takes its slice of the global batch
(``train.batch_size`` rows, the same batch on every rank: :class:`ShardedStream`), runs
forward and backward, then :class:`ActiveGradSync` averages the gradients of the ACTIVE
parameters only: they are packed into flat buckets (one ``all_reduce`` per bucket, the
step's loss riding in the first one) and unpacked in place. Frozen parameters have no
gradient and are never communicated; nothing has to be rebuilt when the set changes, and
there is no "unused parameters" failure because there is no reducer to expect them.
Identical gradients and identical optimizer state keep the weights bitwise identical across
ranks (checked at the end of a run: ``summary.json`` ``distributed.weights_identical``).
See docs/scale-out.md for the measurement against rebuilding a DDP reducer on every switch.
"""

from __future__ import annotations

import hashlib
import os

import torch
import torch.distributed as dist

from layerwise.errors import ConfigError


def launched() -> bool:
    """True when started by torchrun / accelerate with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: torch.device) -> tuple[int, int] | None:
    """Join the process group torchrun/accelerate describe in the environment; ``(rank, world)``, or None alone."""
    if not launched():
        return None
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed: run a single process")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


class ShardedStream:
    """Rank ``rank``'s rows of every global batch from ``stream`` (which every rank reads identically).

    Resumable like the stream it wraps (``state_dict`` is the global stream's position).
    """

    def __init__(self, stream, rank: int, world: int):
        self.stream, self.rank, self.world = stream, rank, world

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.stream)
        n = next(iter(batch.values())).shape[0]
        if n % self.world:
            raise ConfigError(
                f"a batch of {n} examples cannot be split evenly over {self.world} processes: make train.batch_size a multiple "
                f"of {self.world} (and the training set, or the last batch of an epoch is uneven)"
            )
        per = n // self.world
        lo = self.rank * per
        return {k: v[lo : lo + per] for k, v in batch.items()}

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)


class ActiveGradSync:
    """Average the active parameters' gradients (and the loss) over all ranks, in flat buckets.

    Called by the Trainer after backward; ``bucket_bytes`` bounds the temporary flat buffer.
    Counters: ``calls``, ``bytes`` (gradient bytes communicated per rank) and ``seconds``.
    """

    def __init__(self, world: int, bucket_bytes: int = 25 * 2**20, group=None):
        self.world = world
        self.bucket_bytes = bucket_bytes
        self.group = group
        self.calls = 0
        self.bytes = 0
        self.seconds = 0.0

    def __call__(self, params: list[torch.nn.Parameter], loss: float) -> float:
        import time

        t0 = time.perf_counter()
        grads = [p.grad for p in params if p.grad is not None]
        # Buckets of same-dtype gradients; the loss rides in the first bucket (no extra collective).
        buckets: list[list[torch.Tensor]] = []
        size = 0
        for g in grads:
            if not buckets or size + g.numel() * g.element_size() > self.bucket_bytes or buckets[-1][0].dtype != g.dtype:
                buckets.append([])
                size = 0
            buckets[-1].append(g)
            size += g.numel() * g.element_size()
        if not buckets:
            buckets = [[]]
        for i, bucket in enumerate(buckets):
            dtype = bucket[0].dtype if bucket else torch.float32
            device = bucket[0].device if bucket else torch.device("cpu")
            parts = [g.reshape(-1) for g in bucket]
            if i == 0:
                parts.append(torch.tensor([loss], dtype=dtype, device=device))
            flat = torch.cat(parts)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
            flat.div_(self.world)
            offset = 0
            for g in bucket:
                n = g.numel()
                g.copy_(flat[offset : offset + n].view_as(g))
                offset += n
            if i == 0:
                loss = float(flat[-1])
            self.bytes += sum(g.numel() * g.element_size() for g in bucket)
        self.calls += 1
        self.seconds += time.perf_counter() - t0
        return loss


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter's bytes in name order: equal digests mean bitwise-equal weights."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        h.update(name.encode())
        t = p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP: the whole parameter (a collective)
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def gather_digests(model: torch.nn.Module, world: int) -> list[str]:
    """Every rank's :func:`weights_digest` (a collective: call it on all ranks)."""
    out: list = [None] * world
    dist.all_gather_object(out, weights_digest(model))
    return out
