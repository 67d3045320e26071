"""Frozen-prefix cache (``train.prefix_cache``): compute the output of the frozen blocks below the
lowest trainable block once per example, keep it on disk, and read it back instead of recomputing it.

When no step of a run trains the embeddings or a block below depth ``d`` (``freeze``, ``salf``;
``lift`` whose schedule never reaches below ``d`` in the run), and those blocks run in eval mode
(``train.frozen_dropout: false``), the hidden states entering block ``d`` are a deterministic
function of each example. :class:`PrefixCache` stores them per example (no padding) in one
memory-mapped file (bf16 by default, or fp32), with offsets and a manifest.

How a cached step runs: the model's own forward runs as usual (embeddings, attention masks,
BERT's extended mask, Llama's causal mask and rotary embeddings, the head and the loss), but
blocks ``0..d-2`` return their input unchanged and block ``d-1`` returns the cached hidden
states of the batch's examples, re-padded to the batch's width (:meth:`PrefixCache.feed`). Padded
positions hold zeros; the upper blocks mask padded keys, so real positions are unaffected.
Batches carry the example index (``example_index``, added by ``make_loader(with_index=True)``),
so shuffling and resuming map every row to its cached states.

Validity: the cache lives in ``<root>/<key hash>/``, where the key holds a hash of the prefix
weights (embeddings + blocks ``0..d-1``, parameters and buffers, with their dtypes), the model
class and config, the tokenizer, a fingerprint of the tokenized training examples, the depth,
max_length/padding, the storage dtype, the compute settings (device type, bf16 autocast) and
the torch/transformers versions. A directory is used only when its manifest holds exactly that
key and its files have the recorded sizes; anything else is stale and rebuilt. Builds write to
``<key>.tmp-<pid>-<random>`` and are renamed into place after the manifest is written, so a
crash mid-build leaves nothing that is ever read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from layerwise.engine.io import fsync_dir, fsync_file, swap_folder, write_text
from layerwise.engine.meter import format_bytes
from layerwise.errors import ConfigError, ResourceError
from layerwise.methods import names_where
from layerwise.models import cache_dir
from layerwise.preflight import free_disk

MODES = ("off", "auto", "on")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_NUMPY = {"bf16": np.uint16, "fp32": np.float32}  # bf16 is stored as its raw 16-bit pattern
INDEX_KEY = "example_index"
FORMAT = 1
MANIFEST = "manifest.json"


def default_root() -> Path:
    return cache_dir() / "prefix"


# --------------------------------------------------------------------------------------------
# Deciding whether a run can use a cache, and how deep


def prefix_depth(method, max_steps: int) -> tuple[int, str]:
    """(depth, why): the number of blocks below every step's lowest trainable block (0: nothing to cache)."""
    if not method.plan_known_ahead:
        supported = ", ".join(names_where(lambda m: m.plan_known_ahead))
        return 0, f"method {method.name}'s trainable blocks are not known before training (supported: {supported})"
    L = method.num_blocks
    depth, worst = L, None
    with torch.random.fork_rng(devices=[]):
        for step in range(max(max_steps, 1)):
            plan = method.plan(step)
            low = L if plan.lowest is None else plan.lowest
            if low < depth:
                depth, worst = low, (step, plan)
            if depth <= 0:
                break
    if depth <= 0:
        step, plan = worst
        what = "the embeddings train" if plan.embeddings else f"block {plan.lowest} trains"
        return 0, f"{what} at step {step + 1} ({method.name}), so no frozen prefix stays fixed over the run"
    return depth, f"blocks 0..{depth - 1} and the embeddings are frozen at every step"


@dataclass
class Decision:
    """A run that will use the cache (``depth`` frozen blocks), or one that will not (``depth`` 0)."""

    mode: str
    depth: int
    reason: str

    @property
    def enabled(self) -> bool:
        return self.depth > 0


def decide(cfg, method, n_train: int, *, distributed: bool = False, memory_mapped: bool = False, log=print) -> Decision:
    """Whether ``cfg`` (a RunConfig) can use the cache. ``on``: a ConfigError says why not; ``auto``: a log line."""
    tcfg = cfg.train
    mode = tcfg.prefix_cache
    if mode == "off":
        return Decision(mode, 0, "train.prefix_cache=off")
    why = None
    depth = 0
    if tcfg.frozen_dropout:
        why = "train.frozen_dropout=true makes the frozen blocks random (dropout), so their output cannot be stored"
    elif distributed or tcfg.fsdp:
        why = "data-parallel and FSDP runs are not supported"
    elif memory_mapped:
        why = "the data are memory-mapped (data.memory_map), and the cache would hold every example's activations"
    else:
        depth, reason = prefix_depth(method, tcfg.max_steps)
        if depth <= 0:
            why = reason
    passes = tcfg.max_steps * tcfg.batch_size * tcfg.grad_accum / max(n_train, 1)
    if why is None and mode == "auto" and passes < 2:
        why = f"the run covers {passes:.2f} passes over the {n_train} training examples; a cache pays off from 2"
    if why is not None:
        if mode == "on":
            raise ConfigError(f"train.prefix_cache=on cannot be used: {why}; set train.prefix_cache=off (or auto)")
        log(f"prefix cache: off ({why})")
        return Decision(mode, 0, why)
    return Decision(mode, depth, reason)


# --------------------------------------------------------------------------------------------
# Validity key


def _hash_modules(modules: list[nn.Module]) -> str:
    h = hashlib.sha256()
    seen: set[int] = set()
    for i, m in enumerate(modules):
        for name, t in list(m.named_parameters()) + list(m.named_buffers()):
            if id(t) in seen:
                continue
            seen.add(id(t))
            t = t.detach()
            h.update(f"{i}.{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _example_columns(ds) -> tuple[np.ndarray, str]:
    """Per-example token counts and a fingerprint of the model inputs of a tokenized dataset."""
    import pyarrow.compute as pc

    table = ds.with_format("arrow")[:]
    h = hashlib.sha256()
    lengths = None
    for col in ("input_ids", "attention_mask", "token_type_ids"):
        if col not in table.column_names:
            continue
        arr = table.column(col).combine_chunks()
        n = pc.list_value_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)
        if lengths is None:
            lengths = n
        h.update(f"{col}:{len(n)};".encode())
        h.update(n.tobytes())
        h.update(np.asarray(arr.flatten().to_numpy(zero_copy_only=False), dtype=np.int64).tobytes())
    if lengths is None:
        raise ConfigError("train.prefix_cache needs tokenized training data with input_ids")
    return lengths, h.hexdigest()


def _hidden_size(model) -> int:
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for key in ("hidden_size", "d_model", "n_embd", "dim"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    raise ConfigError("train.prefix_cache: the model's hidden size is unknown (no hidden_size in its config)")


def estimate_bytes(n_tokens: int, n_examples: int, hidden: int, dtype: str) -> int:
    """Bytes of a cache: one row of ``hidden`` values per token, plus the offsets and manifest."""
    return n_tokens * hidden * np.dtype(_NUMPY[dtype]).itemsize + (n_examples + 1) * 8 + 4096


# --------------------------------------------------------------------------------------------


class PrefixCache:
    """The stored outputs of blocks ``0..depth-1`` for every training example, and the forward stubs that use them."""

    def __init__(self, path: Path, manifest: dict, anatomy):
        self.path = Path(path)
        self.manifest = manifest
        self.anatomy = anatomy
        self.depth = int(manifest["key"]["depth"])
        self.hidden = int(manifest["hidden"])
        self.dtype = manifest["key"]["dtype"]
        self.out_dtype = getattr(torch, manifest["output"]["dtype"])
        self.out_tuple = int(manifest["output"]["tuple"])
        self.offsets = np.load(self.path / "offsets.npy")
        n_tokens = int(self.offsets[-1])
        raw = np.memmap(self.path / "hidden.bin", dtype=_NUMPY[self.dtype], mode="r", shape=(n_tokens, self.hidden)) if n_tokens else None
        self._rows = raw
        self.built = False
        self.build_seconds = 0.0
        self.reads = 0

    # -- reading ----------------------------------------------------------------------------
    def hidden_for(self, index: list[int], width: int, device: torch.device) -> tuple[torch.Tensor, list[int]]:
        """The cached states of examples ``index``, right-padded with zeros to ``width``: (B, width, H)."""
        idx = np.asarray(index, dtype=np.int64)
        lo, n = self.offsets[idx], self.offsets[idx + 1] - self.offsets[idx]
        if len(idx) and n.max() > width:
            i = int(idx[int(np.argmax(n))])
            raise RuntimeError(f"prefix cache: example {i} has {int(n.max())} cached positions but the batch is {width} wide")
        # One gather from the map (rows of every example, in order) and one scatter into the padded batch.
        within = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
        src = torch.from_numpy(self._rows[np.repeat(lo, n) + within]) if len(within) else torch.zeros(0, self.hidden)
        if self.dtype == "bf16":
            src = src.view(torch.bfloat16)
        out = torch.zeros(len(idx) * width, self.hidden, dtype=DTYPES[self.dtype])
        out.index_copy_(0, torch.from_numpy(np.repeat(np.arange(len(idx), dtype=np.int64) * width, n) + within), src)
        self.reads += 1
        return out.view(len(idx), width, self.hidden).to(device=device, dtype=self.out_dtype, non_blocking=True), n.tolist()

    def _wrap(self, h: torch.Tensor):
        return (h,) + (None,) * (self.out_tuple - 1) if self.out_tuple else h

    def feed(self, batch: dict, plan=None):
        """Take ``example_index`` out of ``batch`` and return a context in which the model's forward
        reads blocks ``0..depth-1``'s output from the cache (the rest of the forward is unchanged)."""
        index = batch.pop(INDEX_KEY).tolist()
        if plan is not None and (plan.embeddings or (plan.lowest is not None and plan.lowest < self.depth)):
            raise RuntimeError(
                f"prefix cache of depth {self.depth} used while {plan.describe()} trains: the cached prefix would be stale"
            )
        ids = batch["input_ids"]
        h, lengths = self.hidden_for(index, ids.shape[1], ids.device)
        mask = batch.get("attention_mask")
        if mask is not None and mask.sum(1).tolist() != lengths:
            raise RuntimeError("prefix cache: the batch's attention mask does not match the cached example lengths")
        return self._stubs(h)

    @contextlib.contextmanager
    def _stubs(self, h: torch.Tensor):
        blocks = self.anatomy._current_blocks()[: self.depth]
        cache = self

        def passthrough(*args, **kwargs):
            return cache._wrap(args[0] if args else kwargs["hidden_states"])

        def cached(*args, **kwargs):
            return cache._wrap(h)

        before = [b.__dict__.get("forward") for b in blocks]
        try:
            for b in blocks[:-1]:
                b.forward = passthrough
            blocks[-1].forward = cached
            yield
        finally:
            for b, f in zip(blocks, before):
                if f is None:
                    b.__dict__.pop("forward", None)
                else:
                    b.forward = f

    def summary(self) -> dict:
        return {
            "used": True,
            "path": str(self.path),
            "depth": self.depth,
            "dtype": self.dtype,
            "bytes": int(self.manifest["bytes"]),
            "examples": int(self.manifest["examples"]),
            "tokens": int(self.manifest["tokens"]),
            "built": self.built,
            "build_seconds": self.build_seconds,
        }


# --------------------------------------------------------------------------------------------
# Finding, validating and building


def cache_key(model, anatomy, tokenizer, ds_fingerprint: str, n_examples: int, n_tokens: int, depth: int, cfg, device) -> dict:
    """Everything the cached states depend on (a cache is used only for an identical key)."""
    import transformers

    config = getattr(model, "config", None)
    prefix = list(anatomy._current("embeddings")) + anatomy._current_blocks()[:depth]
    return {
        "format": FORMAT,
        "model_class": type(anatomy._root()).__name__,
        "model_config": hashlib.sha256(config.to_json_string().encode()).hexdigest() if config is not None else None,
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "prefix_weights": _hash_modules(prefix),
        "depth": depth,
        "tokenizer": {
            "class": type(tokenizer).__name__,
            "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
            "size": len(tokenizer) if tokenizer is not None else None,
        },
        "data": ds_fingerprint,
        "examples": n_examples,
        "tokens": n_tokens,
        "max_length": cfg.data.max_length,
        "padding": cfg.data.padding,
        "dtype": cfg.train.prefix_cache_dtype,
        "compute": {"device": torch.device(device).type, "bf16_autocast": bool(cfg.train.bf16), "frozen_dtype": cfg.train.frozen_dtype},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def key_name(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def check_cache(path: Path, key: dict) -> str | None:
    """None if ``path`` holds a complete cache for ``key``; otherwise why it cannot be used."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return "no readable manifest"
    if manifest.get("key") != key:
        differs = sorted(k for k in set(key) | set(manifest.get("key") or {}) if (manifest.get("key") or {}).get(k) != key.get(k))
        return f"stale: built for a different {', '.join(differs) or 'key'}"
    for name, size in (manifest.get("files") or {}).items():
        p = path / name
        if not p.is_file() or p.stat().st_size != size:
            return f"file {name} is missing or has the wrong size"
    if set(manifest.get("files") or {}) != {"hidden.bin", "offsets.npy"}:
        return "incomplete file list"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_dead_builds(root: Path, name: str) -> None:
    """Leftovers of builds that crashed (their process is gone) are removed; they are never read."""
    for p in root.glob(f"{name}.tmp-*"):
        try:
            pid = int(p.name.split(".tmp-", 1)[1].split("-", 1)[0])
        except ValueError:
            continue
        if not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def _capture(block: nn.Module, box: dict):
    class _Stop(Exception):
        pass

    def hook(module, args, out):
        box["out"] = out
        raise _Stop

    return block.register_forward_hook(hook), _Stop


@torch.no_grad()
def build(path_tmp: Path, model, anatomy, ds, collate, lengths: np.ndarray, depth: int, dtype: str, *,
          device, autocast, batch_size: int = 64, progress: bool = False) -> dict:
    """Run embeddings + blocks ``0..depth-1`` over every example (eval mode, no graph) and write the states."""
    hidden = _hidden_size(model)
    n_tokens = int(lengths.sum())
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    path_tmp.mkdir(parents=True)
    rows = np.memmap(path_tmp / "hidden.bin", dtype=_NUMPY[dtype], mode="w+", shape=(max(n_tokens, 1), hidden))
    order = np.argsort(lengths, kind="stable")  # similar lengths together: little padding
    block = anatomy._current_blocks()[depth - 1]
    box: dict = {}
    was_training = model.training
    model.eval()
    out_info = None
    handle, stop = _capture(block, box)
    store = DTYPES[dtype]
    from tqdm.auto import tqdm

    try:
        for start in tqdm(range(0, len(order), batch_size), desc="prefix cache", disable=not progress, dynamic_ncols=True):
            idx = order[start : start + batch_size].tolist()
            batch = collate(ds.__getitems__(idx) if hasattr(ds, "__getitems__") else [ds[i] for i in idx])
            batch.pop("labels", None)
            batch = {k: v.to(device) for k, v in batch.items()}
            box.clear()
            try:
                with autocast():
                    model(**batch)
            except stop:
                pass
            if "out" not in box:
                raise RuntimeError(f"prefix cache: block {depth - 1} did not run in the model's forward")
            out = box["out"]
            h = out[0] if isinstance(out, (tuple, list)) else out
            if out_info is None:
                out_info = {"dtype": str(h.dtype).replace("torch.", ""), "tuple": len(out) if isinstance(out, (tuple, list)) else 0}
            if h.shape[-1] != hidden:
                raise RuntimeError(f"prefix cache: block {depth - 1} returned width {h.shape[-1]}, expected the hidden size {hidden}")
            h = h.to(store).cpu()
            if dtype == "bf16":
                h = h.view(torch.int16)
            arr = h.numpy()
            for r, i in enumerate(idx):
                lo, hi = offsets[i], offsets[i + 1]
                rows[lo:hi] = arr[r, : hi - lo].view(_NUMPY[dtype])
    finally:
        handle.remove()
        model.train(was_training)
    rows.flush()
    del rows
    np.save(path_tmp / "offsets.npy", offsets)
    files = {name: (path_tmp / name).stat().st_size for name in ("hidden.bin", "offsets.npy")}
    return {"hidden": hidden, "tokens": n_tokens, "examples": int(len(lengths)), "output": out_info, "files": files,
            "bytes": sum(files.values())}


def _sync_folder(path: Path) -> None:
    """Files, then the folder itself, on disk before the rename that makes the cache visible."""
    for p in path.iterdir():
        fsync_file(p)
    fsync_dir(path)


def open_or_build(cfg, decision: Decision, model, anatomy, tokenizer, ds, collate, *, device, autocast, log=print) -> PrefixCache | None:
    """The valid cache for this run (reused, or built now); ``None`` when ``auto`` gives up (no disk space).

    Raises :class:`~layerwise.errors.ResourceError` (mode ``on``) when a new cache would not fit on disk.
    """
    tcfg = cfg.train
    root = Path(tcfg.prefix_cache_dir).expanduser() if tcfg.prefix_cache_dir else default_root()
    depth = decision.depth
    t0 = time.perf_counter()
    lengths, fingerprint = _example_columns(ds)
    key = cache_key(model, anatomy, tokenizer, fingerprint, len(lengths), int(lengths.sum()), depth, cfg, device)
    name = key_name(key)
    path = root / name
    if path.exists():
        problem = check_cache(path, key)
        if problem is None:
            manifest = json.loads((path / MANIFEST).read_text())
            cache = PrefixCache(path, manifest, anatomy)
            cache.build_seconds = time.perf_counter() - t0
            log(f"prefix cache: reusing {path} (blocks 0..{depth - 1}, {len(lengths)} examples, {format_bytes(manifest['bytes'])})")
            return cache
        log(f"prefix cache: not using {path} ({problem}); building a new one")
    hidden = _hidden_size(model)
    need = estimate_bytes(int(lengths.sum()), len(lengths), hidden, tcfg.prefix_cache_dtype)
    free = free_disk(root)
    if free is not None and need > free:
        msg = (
            f"the frozen-prefix cache needs about {format_bytes(need)} ({len(lengths)} examples, {int(lengths.sum())} tokens x "
            f"{hidden} values in {tcfg.prefix_cache_dtype}, blocks 0..{depth - 1}) but '{root}' has {format_bytes(free)} free: "
            f"free disk space, set train.prefix_cache_dir to a larger disk"
            + (", use train.prefix_cache_dtype=bf16 (half the size)" if tcfg.prefix_cache_dtype == "fp32" else "")
            + ", or set train.prefix_cache=off"
        )
        if decision.mode == "on":
            raise ResourceError(msg)
        log(f"prefix cache: off ({msg})")
        return None
    root.mkdir(parents=True, exist_ok=True)
    _remove_dead_builds(root, name)
    tmp = root / f"{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    log(f"prefix cache: building {path} (blocks 0..{depth - 1}, {len(lengths)} examples, ~{format_bytes(need)})")
    try:
        with torch.random.fork_rng(devices=[torch.device(device)] if torch.device(device).type == "cuda" else []):
            info = build(tmp, model, anatomy, ds, collate, lengths, depth, tcfg.prefix_cache_dtype, device=device,
                         autocast=autocast, batch_size=tcfg.eval_batch_size, progress=tcfg.progress)
        manifest = {"key": key, **info, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
        _sync_folder(tmp)
        if path.exists() and check_cache(path, key) is None:  # a concurrent build finished first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            swap_folder(tmp, path)  # replaces a stale cache whole
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest = json.loads((path / MANIFEST).read_text())
    cache = PrefixCache(path, manifest, anatomy)
    cache.built = True
    cache.build_seconds = time.perf_counter() - t0
    log(f"prefix cache: built in {cache.build_seconds:.1f}s ({format_bytes(manifest['bytes'])})")
    return cache
