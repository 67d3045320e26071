"""Subprocess entry used by ``layerwise bench``: profile per-block cost once, predict every method.

``python -m layerwise.profile_cli CONFIG --methods full,lift --steps N --output profile.json``
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def main() -> None:
    from transformers.utils import logging as hf_logging

    from .anatomy import find_anatomy
    from .config import load_yaml, resolve
    from .costmodel import predicted_speedup, profile_model
    from .methods import create_method
    from .run import Run

    hf_logging.set_verbosity_error()
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("--methods", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--output", required=True)
    args = p.parse_args()
    raw = load_yaml(args.config)
    raw["method"] = {"name": "full"}
    raw["output"] = tempfile.mkdtemp(prefix="layerwise-profile-")
    cfg, mcfg = resolve(raw)
    run = Run(cfg, mcfg, log=lambda *a: None)
    train_loader, _ = run.loaders()
    batch = next(iter(train_loader(0)))
    batch = {k: v.to(run.device) for k, v in batch.items()}
    model = run.model.to(run.device)
    anatomy = find_anatomy(model, cfg.blocks)
    prof = profile_model(model, anatomy, batch, bf16=cfg.train.bf16)
    methods = {}
    config_dir = os.path.dirname(os.path.abspath(args.config))
    for name in args.methods.split(","):
        mraw = load_yaml(os.path.join(config_dir, f"{name}.yaml"))
        _, m_cfg = resolve(mraw)
        try:
            method = create_method(m_cfg, anatomy, task=run.task, seed=cfg.train.seed, max_steps=args.steps)
            if method.adapter_only:
                # Adapter methods plan over the adapters they inject: prepare a copy of the model.
                method.context = run.method.context
                wrapped = method.prepare(copy.deepcopy(model))
                if wrapped is not model:
                    method.anatomy = find_anatomy(wrapped, cfg.blocks)
            # Step 0 is not timed in the bench, so it is left out here too.
            methods[name] = predicted_speedup(prof, method, args.steps, frozen_eval=not cfg.train.frozen_dropout)
        except Exception as exc:  # the prediction is a side note: never lose the bench over it
            methods[name] = {"predicted_speedup": None, "error": f"{type(exc).__name__}: {exc}"}
    with open(args.output, "w") as f:
        json.dump({"profile": prof.to_dict(), "methods": methods}, f, indent=2)


if __name__ == "__main__":
    main()
