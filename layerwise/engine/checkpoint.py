"""Atomic, verifiable training checkpoints for exact resume (safetensors + JSON, never pickle).

A checkpoint is a folder ``RUN/checkpoints/step-000123/`` (123 = optimizer steps completed):

``model.safetensors``
    every parameter that has been trainable at some step of the run so far (``Trainer.touched``)
    plus every buffer, keyed by name. Parameters that never trained still hold the values the
    model loader and :meth:`Method.prepare` give them, and a resumed run rebuilds the model
    through the same code path with the same seed, so they need not be saved. Size: 4 bytes
    per touched fp32 parameter (LIFT/LISA: the blocks visited so far, at most the full model;
    IST/LoRA: the adapters and head only).
``optimizer.safetensors`` + ``optimizer.json``
    AdamW state keyed by parameter NAME (``state/<name>/<key>``), for the active set and for
    every parameter whose state is retained (``retain``) or stashed (``keep``,
    ``stash/<name>/<key>``); the JSON holds the state policy, the active parameters in order,
    the param-group hyper-parameters and any non-tensor state values. (torch's own
    ``optimizer.state_dict()`` keys state by position in the param groups, which cannot
    describe retained or stashed parameters.)
``rng.safetensors`` + ``trainer.json``
    torch CPU (and CUDA) generator states; python ``random`` and numpy states, the LR
    scheduler's state, the method's ``state_dict()``, the data position (epoch and batch
    within it), the current plan, step counters, totals, and the run loop's own state.
``manifest.json``
    format version, step, and the size and sha256 of every other file. Written last.

Writing goes to ``checkpoints/.tmp-step-...`` first; every file and the folder are fsync'd,
then the folder is renamed into place (atomic on POSIX) and the parent fsync'd. Loading
verifies the manifest and every checksum and falls back to the newest complete checkpoint,
so a run killed at any point (even mid-save) resumes from the last good one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from layerwise.engine.fsdp import like
from layerwise.engine.io import fsync_dir, fsync_file, swap_folder
from layerwise.errors import ConfigError
from layerwise.methods.base import Plan

FORMAT = 1
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ConfigError):
    """No usable checkpoint (missing, incomplete or corrupt)."""


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


# ------------------------------------------------------------------------------------------------
# Files


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1, allow_nan=True))


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    # Clones: safetensors refuses tensors that share storage, and the files hold CPU copies.
    # FSDP (train.fsdp): a sharded DTensor is saved whole (full_tensor() is a collective every rank joins).
    save_file({k: _whole(v).detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}, str(path))


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _like(target: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A saved whole tensor laid out like ``target``: sharded the same way if it is an FSDP DTensor."""
    if not hasattr(target, "device_mesh"):
        return value

    return like(target, value)


# ------------------------------------------------------------------------------------------------
# State collection


def _named(model) -> tuple[dict[int, str], dict[str, torch.nn.Parameter]]:
    names, by_name = {}, {}
    for name, p in model.named_parameters():
        names[id(p)] = name
        by_name[name] = p
    return names, by_name


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, internal, gauss = random.getstate()
    meta: dict = {"python": {"version": version, "state": list(internal), "gauss": gauss}}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        tensors["numpy_keys"] = torch.from_numpy(keys.astype("int64"))
        meta["numpy"] = {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}
    except ImportError:
        pass
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    py = meta["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "numpy" in meta and "numpy_keys" in tensors:
        import numpy as np

        n = meta["numpy"]
        np.random.set_state((n["kind"], tensors["numpy_keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached"]))


def named_optimizer_state(opt, names: dict[int, str]) -> tuple[dict[str, torch.Tensor], dict]:
    """An :class:`~layerwise.engine.optim.ActiveOptimizer`'s state keyed by parameter NAME (``names``: id -> name):
    flat tensors (``state/<name>/<key>``, ``stash/<name>/<key>``) and JSON meta (policy, active set in order, param-group
    hyper-parameters, non-tensor values). Read back by :func:`load_named_optimizer_state`."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict] = {"state": {}, "stash": {}}

    def put(kind: str, p, state: dict) -> None:
        name = names.get(id(p))
        if name is None:
            raise RuntimeError("optimizer state belongs to a parameter that is not in the model")
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{kind}/{name}/{key}"] = value
            else:
                plain[kind].setdefault(name, {})[key] = value

    for p, state in opt.optimizer.state.items():
        if state:
            put("state", p, state)
    for p, state in opt._stash.items():
        put("stash", p, state)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    meta = {
        "policy": opt.state_policy,
        "active": [names[id(p)] for p in opt.active],
        "param_groups": groups,
        "non_tensor": plain,
    }
    return tensors, meta


def load_named_optimizer_state(opt, tensors: dict[str, torch.Tensor], meta: dict, param: Callable[[str], torch.nn.Parameter]) -> None:
    """Make ``opt`` what :func:`named_optimizer_state` described: its active set, state, stash and group
    hyper-parameters (``param``: name -> the model's parameter)."""
    if meta["policy"] != opt.state_policy:
        raise CheckpointError(f"the checkpoint used optimizer_state={meta['policy']}, this run {opt.state_policy}")
    opt.set_active([param(n) for n in meta["active"]])
    opt.optimizer.state.clear()
    opt._stash.clear()
    per_param: dict[tuple[str, str], dict] = {}
    for key, value in tensors.items():
        kind, rest = key.split("/", 1)
        name, sk = rest.rsplit("/", 1)
        per_param.setdefault((kind, name), {})[sk] = value
    for kind in ("state", "stash"):
        for name, values in meta["non_tensor"].get(kind, {}).items():
            per_param.setdefault((kind, name), {}).update(values)
    for (kind, name), values in per_param.items():
        p = param(name)
        if kind == "state":
            # Moments live with the parameter; AdamW keeps `step` on the CPU unless fused (then with the parameter).
            entry = {k: (_like(p, v.to(p.device)) if torch.is_tensor(v) and k != "step" else v) for k, v in values.items()}
            if opt.fused and torch.is_tensor(entry.get("step")):
                entry["step"] = entry["step"].to(p.device)
            opt.optimizer.state[p] = entry
        else:
            # The stash lives off the device (a plain tensor; under FSDP laid out like its parameter, as stashed).
            opt._stash[p] = {k: ((_like(p, v) if hasattr(p, "device_mesh") else v.cpu()) if torch.is_tensor(v) and k != "step" else v)
                             for k, v in values.items()}
    for group, saved in zip(opt.param_groups, meta["param_groups"]):
        for k, v in saved.items():
            group[k] = tuple(v) if k == "betas" else v


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        return None


def save_checkpoint(
    run_dir: str | Path,
    trainer,
    *,
    stream=None,
    loop_state: dict | None = None,
    keep_last: int = 2,
) -> Path:
    """Write a checkpoint of ``trainer`` after ``trainer.step_index`` steps; returns its folder.

    ``stream`` (default ``trainer.batches``) must have ``state_dict()`` (a :class:`BatchStream`).
    ``loop_state`` is JSON the caller wants back on resume (metric windows, eval results).
    """
    stream = trainer.batches if stream is None else stream
    if not hasattr(stream, "state_dict"):
        raise TypeError("the training batches cannot be checkpointed: use engine.trainer.BatchStream")
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    step = trainer.step_index
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()

    model = trainer.model
    names, _ = _named(model)
    weights = {names[i]: p for i, p in ((id(p), p) for p in model.parameters()) if i in trainer.touched}
    touched = set(weights)
    frozen = trainer.frozen
    if frozen is not None:
        # train.frozen_dtype: a frozen block's exact float32 master (host/disk), not its bf16 or int8 copy
        # (for int8 the model holds a quantized Parameter in place of the block's own one, which is touched).
        for now, own, value in frozen.masters():
            if id(own) in trainer.touched and id(now) in names:
                weights[names[id(now)]] = value
                touched.add(names[id(now)])
    weights.update({f"buffer/{name}": b for name, b in model.named_buffers()})
    _save_tensors(tmp / "model.safetensors", weights)

    opt_tensors, opt_meta = named_optimizer_state(trainer.optimizer, names)
    _save_tensors(tmp / "optimizer.safetensors", opt_tensors)
    _write_json(tmp / "optimizer.json", opt_meta)

    rng_tensors, rng_meta = _rng_state()
    _save_tensors(tmp / "rng.safetensors", rng_tensors)

    sched = {k: _jsonable(v) for k, v in trainer.scheduler.state_dict().items()}
    plan = trainer.plan
    totals = trainer.totals
    state = {
        "step": step,
        "rng": rng_meta,
        "scheduler": sched,
        "method": {"name": trainer.method.name, "state": trainer.method.state_dict()},
        "data": stream.state_dict(),
        "plan": {"blocks": list(plan.blocks), "embeddings": plan.embeddings, "head": plan.head},
        "switches": trainer.switches,
        "skipped_steps": trainer.skipped_steps,
        "consecutive_skips": trainer.consecutive_skips,
        "max_trainable": trainer.max_trainable,
        "touched": sorted(touched),
        "totals": {"steps": totals.steps, "tokens": totals.tokens, "samples": totals.samples, "seconds": totals.seconds, "peak": dict(totals.peak)},
        "loop": loop_state or {},
    }
    _write_json(tmp / "trainer.json", state)

    files = {}
    for path in sorted(tmp.iterdir()):
        fsync_file(path)
        files[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {"format": FORMAT, "step": step, "created": time.time(), "files": files}
    _write_json(tmp / MANIFEST, manifest)
    fsync_file(tmp / MANIFEST)
    fsync_dir(tmp)
    swap_folder(tmp, final)  # the same step saved again (a stop right after a periodic save) replaces it whole
    fsync_dir(root)
    prune(root, keep_last)
    return final


def prune(root: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` step folders; remove leftovers of interrupted saves by other processes."""
    steps = sorted(_step_dirs(root), key=lambda sp: sp[0], reverse=True)
    for _, path in steps[max(keep_last, 1):]:
        shutil.rmtree(path, ignore_errors=True)
    for path in root.iterdir():
        if path.name.startswith((".tmp-", ".old-")) and not path.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# Finding and loading


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    out = []
    for path in root.iterdir():
        m = _STEP_DIR.match(path.name)
        if m and path.is_dir():
            out.append((int(m.group(1)), path))
    return out


def verify(path: Path) -> str | None:
    """``None`` when the checkpoint at ``path`` is complete and every checksum matches, else the reason."""
    mf = path / MANIFEST
    if not mf.is_file():
        return "no manifest.json (incomplete save)"
    try:
        manifest = json.loads(mf.read_text())
        files = manifest["files"]
        if manifest.get("format") != FORMAT:
            return f"format {manifest.get('format')!r} is not {FORMAT}"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "manifest.json is unreadable"
    for name in ("model.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors", "trainer.json"):
        if name not in files:
            return f"manifest lists no {name}"
    for name, info in files.items():
        f = path / name
        if "/" in name or name.startswith(".") or not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != info.get("bytes"):
            return f"{name} has {f.stat().st_size} bytes, the manifest says {info.get('bytes')}"
        if _sha256(f) != info.get("sha256"):
            return f"{name} does not match its sha256"
    return None


def find_latest(run_dir: str | Path, log: Callable[[str], None] | None = None) -> Path | None:
    """The newest complete, verified checkpoint of a run (``None`` if there is none); skipped ones are logged."""
    for step, path in sorted(_step_dirs(checkpoint_root(run_dir)), key=lambda sp: sp[0], reverse=True):
        reason = verify(path)
        if reason is None:
            return path
        if log:
            log(f"skipping checkpoint {path.name}: {reason}")
    return None


def load_checkpoint(path: str | Path, trainer, *, stream=None) -> dict:
    """Restore ``trainer`` (model, optimizer, scheduler, method, data position, counters, RNG) from
    a verified checkpoint folder. Returns the checkpoint's ``loop`` state. RNG states are set last,
    so nothing after this call but the next training step draws from them."""
    path = Path(path)
    reason = verify(path)
    if reason is not None:
        raise CheckpointError(f"checkpoint {path} is not usable: {reason}")
    stream = trainer.batches if stream is None else stream
    state = json.loads((path / "trainer.json").read_text())
    opt_meta = json.loads((path / "optimizer.json").read_text())
    model = trainer.model
    names, by_name = _named(model)
    buffers = dict(model.named_buffers())

    def param(name: str) -> torch.nn.Parameter:
        if name not in by_name:
            raise CheckpointError(f"checkpoint {path.name} has parameter '{name}' that this model does not have: was the config changed?")
        return by_name[name]

    method_state = state["method"]
    if method_state["name"] != trainer.method.name:
        raise CheckpointError(f"checkpoint {path.name} is of method '{method_state['name']}', not '{trainer.method.name}'")

    frozen = trainer.frozen
    if frozen is not None:
        # Every block float32 while the saved values are copied in; re-applied below for the saved plan.
        frozen.restore_all()
        names, by_name = _named(model)  # int8: the blocks' own weight Parameters are back in the model
    with torch.no_grad():
        for name, value in load_file(str(path / "model.safetensors")).items():
            if name.startswith("buffer/"):
                target = buffers.get(name[len("buffer/"):])
                if target is None:
                    raise CheckpointError(f"checkpoint {path.name} has buffer '{name[7:]}' that this model does not have")
            else:
                target = param(name)
            if target.shape != value.shape:
                raise CheckpointError(f"checkpoint {path.name}: '{name}' has shape {tuple(value.shape)}, the model {tuple(target.shape)}")
            target.copy_(_like(target, value))

    p = state["plan"]
    plan = Plan(tuple(p["blocks"]), embeddings=p["embeddings"], head=p["head"])
    if frozen is not None:
        # Blocks outside the saved plan back to bf16 (fresh masters from the loaded float32 values), the
        # plan's blocks float32 before their optimizer state is loaded.
        frozen.apply(plan.blocks)
        trainer.meter.refresh(model)
        trainer.weight_bytes = trainer._weights_now()
    try:
        load_named_optimizer_state(trainer.optimizer, load_file(str(path / "optimizer.safetensors")), opt_meta, param)
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint {path.name}: {exc}") from None
    sched = dict(state["scheduler"])
    if sched.get("lr_lambdas") is None:
        sched["lr_lambdas"] = [None] * len(getattr(trainer.scheduler, "lr_lambdas", []))
    trainer.scheduler.load_state_dict(sched)

    trainer.method.load_state_dict(method_state["state"])
    stream.load_state_dict(state["data"])
    trainer.plan = plan
    trainer.step_index = state["step"]
    trainer.switches = state["switches"]
    for key in ("skipped_steps", "consecutive_skips"):  # train.on_nonfinite=skip counters
        if hasattr(trainer, key):
            setattr(trainer, key, state.get(key, 0))
    trainer.max_trainable = state["max_trainable"]
    trainer.touched = {id(param(n)) for n in state["touched"]}
    t = state["totals"]
    trainer.totals.steps, trainer.totals.tokens, trainer.totals.samples, trainer.totals.seconds = t["steps"], t["tokens"], t["samples"], t["seconds"]
    trainer.totals.peak.update(t["peak"])
    _set_rng_state(load_file(str(path / "rng.safetensors")), state["rng"])
    return state.get("loop", {})
