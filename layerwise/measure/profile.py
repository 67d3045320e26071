"""The cost model's column in ``layerwise bench``: profile per-block cost once, predict every method.

``layerwise measure profile DIR/configs/full.yaml --methods full,lift --steps N --output profile.json``
(the bench runs it in its own process; the suite in a forked one).
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

from layerwise.config import resolve
from layerwise.data import Splits
from layerwise.measure.costmodel import BlockCost, method_block_cost, predicted_speedup, profile_model
from layerwise.methods import create_method, setup
from layerwise.run import Run
from layerwise.schema import load_yaml


def profile_methods(config: str | Path, methods: list[str], steps: int, output: str | Path, splits: Splits | None = None) -> dict:
    """Profile one full fine-tuning step of ``config`` and predict each of ``methods`` (``METHOD.yaml``
    beside ``config``) over ``steps`` steps; writes and returns ``{"profile": ..., "methods": ...}``.
    ``splits``: the config's data, already tokenized (else loaded here)."""
    raw = load_yaml(config)
    raw["method"] = {"name": "full"}
    with tempfile.TemporaryDirectory(prefix="layerwise-profile-") as scratch:  # the profile run saves nothing
        raw["output"] = scratch
        result = _profile(raw, config, methods, steps, splits)
    Path(output).write_text(json.dumps(result, indent=2))
    return result


def _profile(raw: dict, config: str | Path, methods: list[str], steps: int, splits: Splits | None) -> dict:
    cfg, mcfg = resolve(raw)
    run = Run(cfg, mcfg, log=lambda *a: None, splits=splits)
    train_loader, _ = run.loaders()
    batch = {k: v.to(run.device) for k, v in next(iter(train_loader(0))).items()}
    model = run.model.to(run.device)
    prof = profile_model(model, run.method.anatomy, batch, bf16=cfg.train.bf16)
    predictions = {}
    for name in methods:
        _, m_cfg = resolve(load_yaml(Path(config).parent / f"{name}.yaml"))
        try:
            method = create_method(m_cfg, run.method.anatomy, task=run.task, seed=cfg.train.seed, max_steps=steps)
            block = BlockCost()
            if method.adapter_only:  # it plans over the adapters it injects: prepare a copy of the model
                method, prepared = setup(m_cfg, copy.deepcopy(model), task=run.task, blocks=cfg.blocks, seed=cfg.train.seed,
                                         max_steps=steps, context=run.method.context)
                block = method_block_cost(method, prepared, batch, bf16=cfg.train.bf16)
            # The plans of the steps the bench times (all but the first).
            plans = {s: method.plan(s) for s in range(1, steps)}
            predictions[name] = predicted_speedup(prof, method, plans, frozen_eval=not cfg.train.frozen_dropout, block=block)
        except Exception as exc:  # the prediction is a side note: never lose the bench over it
            predictions[name] = {"predicted_speedup": None, "error": f"{type(exc).__name__}: {exc}"}
    return {"profile": prof.to_dict(), "methods": predictions}
