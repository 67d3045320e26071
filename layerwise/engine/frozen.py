"""Small frozen weights (``train.frozen_dtype: bf16``): blocks that do not train this step are held
in bf16; the active blocks train in float32.

* Forward across dtypes: a forward pre-hook on every block casts the floating inputs of a bf16 block
  (hidden states, rotary cos/sin, an additive attention mask) to bf16 and a forward hook casts its
  floating outputs back to float32, so embeddings, float32 blocks and the head see float32 as before.
  The casts are differentiable: a gradient that has to cross a frozen block (LIFT above its active
  group) crosses it in bf16.
* A switch (:meth:`FrozenLowPrecision.apply`): a block that leaves the active set is cast to bf16, a
  block that joins is cast to float32 before its optimizer state is created. Parameters keep their
  identity (``p.data`` is replaced), so optimizer and anatomy references stay valid.
* Master copy (``train.frozen_master``):

  - ``rounded`` (default): no copy. A block that becomes active again starts from its bf16 value
    (pretrained weights lose their bits below bf16's 8-bit mantissa once; a trained block loses its
    updates below that when it leaves). Nothing extra is held.
  - ``host``: the float32 value of every block is kept in host (CPU) memory: the pretrained value
    before the first cast, the trained value when a block leaves. A block that becomes active gets
    its exact float32 master written back. On a CUDA device this costs host RAM only; on CPU it is
    the same memory, and it is counted in ``weights`` (so it saves nothing there).
  - ``disk``: the same exact float32 masters, kept in one safetensors file per frozen block in a
    scratch folder (``train.frozen_master_dir``, default the system temp folder) instead of memory:
    written when a block leaves the active set (atomically: temporary file, then rename), read
    back and deleted when it joins. Costs one block's float32 bytes of disk I/O each way per
    switch (timed in ``io_seconds``) and no process memory. The folder is removed by :meth:`close`.

Checkpoints store a frozen block's float32 master where one is kept (``host``, ``disk``) and its
bf16 value otherwise, so a resumed run continues from the same values (:meth:`masters`,
:meth:`restore_all` before loading, then :meth:`apply` with the checkpoint's plan).

Embeddings and head are never cast (they train in most plans; in SmolLM2 they are tied).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from layerwise.engine.io import replacing
from layerwise.errors import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}


def _cast(value, dtype):
    if torch.is_tensor(value):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, tuple):
        return type(value)(_cast(v, dtype) for v in value) if not hasattr(value, "_fields") else type(value)(*(_cast(v, dtype) for v in value))
    if isinstance(value, list):
        return [_cast(v, dtype) for v in value]
    return value


MASTERS = ("rounded", "host", "disk")


def _linears(block: nn.Module) -> list[nn.Linear]:
    return [m for m in block.modules() if isinstance(m, nn.Linear)]


def int8_weight_only():
    """torchao's int8 weight-only quantization config (per output row), or a ConfigError naming the fix."""
    try:  # its CUDA-kernel load warnings on a CPU build of torch are filtered in layerwise/__init__.py
        from torchao.quantization import Int8WeightOnlyConfig
    except ImportError as exc:
        raise ConfigError(
            f"train.frozen_dtype=int8 needs torchao ({exc}): pip install torchao, or use train.frozen_dtype=bf16"
        ) from exc
    return Int8WeightOnlyConfig()


def _float_bytes(block: nn.Module) -> int:
    return sum(p.numel() * 4 for p in block.parameters() if p.is_floating_point())


class FrozenLowPrecision:
    def __init__(self, blocks: list[nn.Module], dtype: torch.dtype = torch.bfloat16, master: str = "rounded",
                 master_dir: str | os.PathLike | None = None):
        if master not in MASTERS:
            raise ValueError(f"frozen_master must be one of {', '.join(MASTERS)}, got {master!r}")
        #: int8: the Linear weights of a frozen block are quantized (torchao int8 weight-only, one scale per
        #: output row); its other parameters and its activations stay float32.
        self.int8 = dtype == torch.int8
        if self.int8:
            if master == "rounded":
                raise ConfigError(
                    "train.frozen_dtype=int8 needs an exact float32 master (a trained block would be rounded to int8 at every "
                    "switch): set train.frozen_master=disk (no memory) or host"
                )
            self._int8_config = int8_weight_only()
        #: int8: the original float32 weight Parameter of each quantized Linear, by (block, linear index);
        #: put back (same object, so optimizer and checkpoint references hold) when the block trains again.
        self._orig: dict[tuple[int, int], nn.Parameter] = {}
        self.blocks = list(blocks)
        self.dtype = dtype
        self.master_policy = master
        self.low: set[int] = set()
        #: float32 host copies by block (``host`` policy).
        self.master: dict[int, list[torch.Tensor]] = {}
        #: ``disk`` policy: the scratch folder holding ``block-NNNN.safetensors`` per frozen block.
        self.dir: Path | None = None
        #: Seconds spent writing and reading disk masters, and the bytes moved each way.
        self.io_seconds = 0.0
        self.bytes_written = 0
        self.bytes_read = 0
        self._cleanup = None
        if master == "disk":
            self.dir = self._make_dir(master_dir)
            # Removed by close(), or when this object is collected / the interpreter exits (library use).
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.dir), True)
        self.casts = 0
        self._handles = []
        for i, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self._handles.append(block.register_forward_hook(self._post(i)))

    def _pre(self, i: int):
        def hook(module, args, kwargs):
            if i not in self.low or self.int8:
                return None
            return _cast(args, self.dtype), {k: _cast(v, self.dtype) for k, v in kwargs.items()}

        return hook

    def _post(self, i: int):
        def hook(module, args, out):
            if i not in self.low or self.int8:
                return None
            return _cast(out, torch.float32)

        return hook

    def _make_dir(self, master_dir) -> Path:
        parent = Path(master_dir).expanduser() if master_dir else Path(tempfile.gettempdir())
        need = sum(_float_bytes(b) for b in self.blocks)
        try:
            parent.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(parent).free
        except OSError as exc:
            raise ConfigError(f"train.frozen_master=disk cannot use '{parent}' ({exc}): set train.frozen_master_dir to a writable folder") from exc
        # Every block may be frozen at once; keep a tenth of the disk's free space in reserve.
        if need > 0.9 * free:
            raise ConfigError(
                f"train.frozen_master=disk needs about {need / 2**20:.1f} MiB (float32 copies of {len(self.blocks)} blocks) "
                f"but '{parent}' has {free / 2**20:.1f} MiB free: set train.frozen_master_dir to a larger disk, "
                "or use train.frozen_master=rounded (no copy) or host (in memory)"
            )
        return Path(tempfile.mkdtemp(prefix="layerwise-master-", dir=parent))

    def _path(self, i: int) -> Path:
        return self.dir / f"block-{i:04d}.safetensors"

    def _write(self, i: int, params) -> None:
        t0 = time.perf_counter()
        tensors = {str(j): p.detach().to("cpu", torch.float32).contiguous() for j, p in enumerate(params) if p.is_floating_point()}
        final = self._path(i)
        with replacing(final) as tmp:
            save_file(tensors, str(tmp))
        self.bytes_written += sum(t.nbytes for t in tensors.values())
        self.io_seconds += time.perf_counter() - t0

    def _read(self, i: int, n: int) -> list[torch.Tensor | None]:
        """Block ``i``'s float32 masters from disk, by position among its ``n`` parameters (None: not floating)."""
        t0 = time.perf_counter()
        tensors = load_file(str(self._path(i)))
        self.bytes_read += sum(t.nbytes for t in tensors.values())
        self.io_seconds += time.perf_counter() - t0
        return [tensors.get(str(j)) for j in range(n)]

    def _params(self, i: int) -> list[nn.Parameter]:
        return list(self.blocks[i].parameters())

    def _to_low(self, i: int) -> None:
        params = self._params(i)
        if self.master_policy == "host":
            self.master[i] = [p.detach().to("cpu", torch.float32, copy=True) for p in params]
        elif self.master_policy == "disk":
            self._write(i, params)
        if self.int8:
            from torchao.quantization import quantize_

            for k, lin in enumerate(_linears(self.blocks[i])):
                orig = lin.weight
                quantize_(lin, self._int8_config)  # lin.weight is now a new Parameter holding int8 values + scales
                self._orig[(i, k)] = orig
                orig.data = orig.data.new_empty(0)  # the float32 value lives in the master
        else:
            for p in params:
                if p.is_floating_point():
                    p.data = p.data.to(self.dtype)
        self.low.add(i)
        self.casts += 1

    def _to_fp32(self, i: int) -> None:
        if self.int8:
            for k, lin in enumerate(_linears(self.blocks[i])):
                lin.weight = self._orig.pop((i, k))  # same position in the module's parameters, same object
        params = self._params(i)
        saved = self.master.pop(i, None)
        if self.master_policy == "disk":
            saved = self._read(i, len(params))
            self._path(i).unlink()
        for j, p in enumerate(params):
            if not p.is_floating_point():
                continue
            p.data = saved[j].to(p.device) if saved is not None else p.data.to(torch.float32)
        self.low.discard(i)
        self.casts += 1

    def apply(self, active_blocks) -> bool:
        """Hold every block outside ``active_blocks`` in low precision and the active ones in float32.
        Returns True when any parameter changed storage (the caller refreshes its meters)."""
        active = set(active_blocks)
        changed = False
        for i in range(len(self.blocks)):
            if i in active and i in self.low:
                self._to_fp32(i)
                changed = True
            elif i not in active and i not in self.low:
                self._to_low(i)
                changed = True
        return changed

    def restore_all(self) -> None:
        """Every block back to float32 (from its master copy where one is kept): for evaluation and saving."""
        for i in sorted(self.low):
            self._to_fp32(i)

    def masters(self) -> list[tuple[nn.Parameter, nn.Parameter, torch.Tensor]]:
        """``(parameter in the model now, the block's own parameter, float32 master)`` for every floating
        parameter of a low block (``host`` and ``disk``; none for ``rounded``, whose master is the bf16
        value itself): what a checkpoint stores. The two parameters differ for an int8-quantized weight."""
        out = []
        if self.master_policy == "rounded":
            return out
        for i in sorted(self.low):
            params = self._params(i)
            own = dict(enumerate(params))
            if self.int8:
                now = {id(lin.weight): self._orig[(i, k)] for k, lin in enumerate(_linears(self.blocks[i]))}
                own = {j: now.get(id(p), p) for j, p in own.items()}
            values = self.master[i] if self.master_policy == "host" else self._read(i, len(params))
            for j, (p, v) in enumerate(zip(params, values)):
                if p.is_floating_point() and v is not None:
                    out.append((p, own[j], v))
        return out

    def master_bytes(self) -> int:
        """Bytes of master copies held in memory (``host``); ``disk`` masters are not in memory."""
        return sum(t.nbytes for ts in self.master.values() for t in ts)

    def disk_bytes(self) -> int:
        if self.dir is None or not self.dir.exists():
            return 0
        return sum(f.stat().st_size for f in self.dir.glob("block-*.safetensors"))

    def stats(self) -> dict:
        return {
            "dtype": "int8 (Linear weights; torchao weight-only)" if self.int8 else str(self.dtype).replace("torch.", ""),
            "master": self.master_policy, "casts": self.casts,
            "master_memory_bytes": self.master_bytes(), "master_disk_bytes": self.disk_bytes(),
            "master_dir": str(self.dir) if self.dir is not None else None,
            "io_seconds": round(self.io_seconds, 4), "bytes_written": self.bytes_written, "bytes_read": self.bytes_read,
        }

    def close(self) -> None:
        """Remove the ``disk`` masters' scratch folder (call after :meth:`restore_all`)."""
        if self._cleanup is not None:
            self._cleanup()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.close()
