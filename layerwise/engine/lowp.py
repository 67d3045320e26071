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

Embeddings and head are never cast (they train in most plans; in SmolLM2 they are tied).
"""

from __future__ import annotations

import torch
from torch import nn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _cast(value, dtype):
    if torch.is_tensor(value):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, tuple):
        return type(value)(_cast(v, dtype) for v in value) if not hasattr(value, "_fields") else type(value)(*(_cast(v, dtype) for v in value))
    if isinstance(value, list):
        return [_cast(v, dtype) for v in value]
    return value


class FrozenLowPrecision:
    def __init__(self, blocks: list[nn.Module], dtype: torch.dtype = torch.bfloat16, master: str = "rounded"):
        if master not in ("rounded", "host"):
            raise ValueError(f"frozen_master must be 'rounded' or 'host', got {master!r}")
        self.blocks = list(blocks)
        self.dtype = dtype
        self.master_policy = master
        self.low: set[int] = set()
        #: float32 host copies by block (``host`` policy).
        self.master: dict[int, list[torch.Tensor]] = {}
        self.casts = 0
        self._handles = []
        for i, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self._handles.append(block.register_forward_hook(self._post(i)))

    def _pre(self, i: int):
        def hook(module, args, kwargs):
            if i not in self.low:
                return None
            return _cast(args, self.dtype), {k: _cast(v, self.dtype) for k, v in kwargs.items()}

        return hook

    def _post(self, i: int):
        def hook(module, args, out):
            if i not in self.low:
                return None
            return _cast(out, torch.float32)

        return hook

    def _params(self, i: int) -> list[nn.Parameter]:
        return list(self.blocks[i].parameters())

    def _to_low(self, i: int) -> None:
        params = self._params(i)
        if self.master_policy == "host":
            self.master[i] = [p.detach().to("cpu", torch.float32, copy=True) for p in params]
        for p in params:
            if p.is_floating_point():
                p.data = p.data.to(self.dtype)
        self.low.add(i)
        self.casts += 1

    def _to_fp32(self, i: int) -> None:
        params = self._params(i)
        saved = self.master.pop(i, None)
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

    def master_bytes(self) -> int:
        return sum(t.nbytes for ts in self.master.values() for t in ts)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
