"""A whole run: validate config, load model and data, train, evaluate, write the run folder.

Everything that can be wrong with the input (config keys, model, data columns, labels,
layer indices) is checked before the run folder is created, so a bad input leaves nothing
behind. Final artefacts (summary, model) are written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
import yaml

from . import __version__
from .anatomy import UnsupportedModelError, find_anatomy
from .config import RunConfig, to_dict
from .data import load_splits, make_loader, tokenize_splits
from .engine import Trainer, evaluate, resolve_device
from .engine.trainer import batches_forever
from .errors import ConfigError, ModelError
from .methods import create_method
from .methods.base import RunContext
from .models import default_task_for, load_model_and_tokenizer, resolve_model_path


def default_output(cfg: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.method['name']}-{stamp}"


def _check_output(path: Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"output folder '{path}' already exists and is not empty: pass a new --output (nothing was overwritten)")


class Run:
    """Holds everything a run needs once the input has been validated."""

    def __init__(self, cfg: RunConfig, mcfg, *, log=print):
        self.cfg = cfg
        self.mcfg = mcfg
        self.log = log
        torch.manual_seed(cfg.train.seed)
        self.device = resolve_device(cfg.train.device)
        self.output = Path(cfg.output) if cfg.output else default_output(cfg)
        _check_output(self.output)

        model_path = resolve_model_path(cfg.model)
        self.task = cfg.task or default_task_for(model_path)
        splits = load_splits(cfg.data, self.task)
        self.label_names = splits.label_names
        num_labels = len(splits.label_names) if splits.label_names else None
        model, self.tokenizer, self.model_info = load_model_and_tokenizer(
            cfg.model,
            self.task,
            num_labels=num_labels,
            trust_remote_code=cfg.trust_remote_code,
            label_names=splits.label_names,
        )
        try:
            anatomy = find_anatomy(model, cfg.blocks)
        except UnsupportedModelError as exc:
            raise ModelError(str(exc)) from None
        except (AttributeError, ValueError) as exc:
            raise ConfigError(f"blocks: {exc}") from None
        self.splits = tokenize_splits(splits, self.tokenizer, cfg.data, self.task)
        self.method = create_method(mcfg, anatomy, task=self.task, seed=cfg.train.seed, max_steps=cfg.train.max_steps)
        train_loader, eval_loader = self.loaders()
        self.method.context = RunContext(
            train_loader=train_loader,
            eval_loader=eval_loader,
            tokenizer=self.tokenizer,
            output=self.output,
            device=self.device,
            task=self.task,
        )
        self.model = self.method.prepare(model)
        if self.model is not model:
            # Adapters wrap the model: find the groups again so new modules are included.
            self.method.anatomy = find_anatomy(self.model, cfg.blocks)

    # ------------------------------------------------------------------------------------
    def loaders(self):
        cfg = self.cfg

        def train_loader(epoch: int):
            return make_loader(
                self.splits.train, self.tokenizer, cfg.data, batch_size=cfg.train.batch_size, shuffle=True, seed=cfg.train.seed + epoch
            )

        eval_loader = make_loader(self.splits.eval, self.tokenizer, cfg.data, batch_size=cfg.train.eval_batch_size, shuffle=False, seed=0)
        return train_loader, eval_loader

    def execute(self) -> dict:
        cfg, tcfg = self.cfg, self.cfg.train
        train_loader, eval_loader = self.loaders()
        trainer = Trainer(self.model, self.method, tcfg, batches_forever(train_loader), device=self.device)
        out = self.output
        out.mkdir(parents=True, exist_ok=True)
        resolved = to_dict(cfg)
        resolved["method"] = to_dict(self.mcfg)
        resolved["task"] = self.task
        (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        try:
            summary = self._train(trainer, eval_loader, out)
        except BaseException:
            # A run that did not finish leaves no summary or model that could be mistaken for results.
            for name in ("summary.json", "model"):
                p = out / name
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                elif p.exists():
                    p.unlink()
            raise
        return summary

    def _train(self, trainer: Trainer, eval_loader, out: Path) -> dict:
        cfg, tcfg = self.cfg, self.cfg.train
        metric = "accuracy" if self.task == "classification" else "loss"
        eval_before = evaluate(trainer.model, eval_loader, self.task, self.device, tcfg.bf16) if tcfg.eval_before else None
        if eval_before:
            self.log(f"held-out {metric} before: {eval_before[metric]:.4f}")
        from tqdm.auto import tqdm

        bar = tqdm(total=tcfg.max_steps, desc=f"{self.method.name}", disable=not tcfg.progress, dynamic_ncols=True)
        trainer.peak_memory.reset()
        window_loss, window_tokens, window_seconds, window_n = 0.0, 0, 0.0, 0
        first_step_seconds = 0.0
        first_step_tokens = 0
        with open(out / "metrics.jsonl", "w") as metrics:
            for _ in range(tcfg.max_steps):
                rec = trainer.train_step()
                if rec.step == 0:
                    first_step_seconds, first_step_tokens = rec.seconds, rec.tokens
                window_loss += rec.loss
                window_tokens += rec.tokens
                window_seconds += rec.seconds
                window_n += 1
                bar.update(1)
                bar.set_postfix(loss=f"{rec.loss:.4f}", active=rec.plan.describe(), refresh=False)
                if window_n >= tcfg.log_every or rec.step == tcfg.max_steps - 1:
                    row = {
                        "step": rec.step + 1,
                        "loss": window_loss / window_n,
                        "lr": rec.lr,
                        "active": rec.plan.describe(),
                        "active_blocks": list(rec.plan.blocks),
                        "tokens_per_s": window_tokens / max(window_seconds, 1e-9),
                        "bytes": rec.bytes,
                        **self.method.log_values(),
                    }
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                    window_loss, window_tokens, window_seconds, window_n = 0.0, 0, 0.0, 0
        bar.close()
        peak_process = trainer.peak_memory.peak_bytes()
        totals = trainer.totals
        # The first step pays one-off costs (allocator warm-up, lazy init); leave it out of the rates when there is more than one.
        seconds, tokens, samples = totals.seconds, totals.tokens, totals.samples
        if totals.steps > 1:
            seconds -= first_step_seconds
            tokens -= first_step_tokens
            samples -= samples // totals.steps
        eval_after = evaluate(trainer.model, eval_loader, self.task, self.device, tcfg.bf16) if tcfg.eval_after else None
        if eval_after:
            self.log(f"held-out {metric} after:  {eval_after[metric]:.4f}")
        summary = {
            "layerwise_version": __version__,
            "method": self.method.name,
            "method_config": to_dict(self.mcfg),
            "model": cfg.model,
            "model_info": self.model_info,
            "task": self.task,
            "data": cfg.data.source,
            "steps": totals.steps,
            "batch_size": tcfg.batch_size,
            "grad_accum": tcfg.grad_accum,
            "bf16": tcfg.bf16,
            "device": str(self.device),
            "threads": torch.get_num_threads(),
            "train_seconds": totals.seconds,
            "tokens_per_s": tokens / max(seconds, 1e-9),
            "samples_per_s": samples / max(seconds, 1e-9),
            "peak_memory_bytes": peak_process,
            "peak_memory_kind": trainer.peak_memory.kind,
            "memory": {k: int(v) for k, v in totals.peak.items()},
            "trainable_parameters_max": trainer.max_trainable,
            "total_parameters": sum(p.numel() for p in trainer.model.parameters()),
            "switches": trainer.switches,
            "eval_before": eval_before,
            "eval": eval_after,
        }
        self.log(
            f"tokens/s {summary['tokens_per_s']:.0f} | peak training memory {summary['memory']['total'] / 2**20:.1f} MiB "
            f"(weights {summary['memory']['weights'] / 2**20:.1f}, grads {summary['memory']['grads'] / 2**20:.1f}, "
            f"optimizer {summary['memory']['optimizer'] / 2**20:.1f}, activations {summary['memory']['activations'] / 2**20:.1f}) | "
            f"peak process memory {peak_process / 2**20:.0f} MiB"
        )
        summary.update(self.method.finish(out))
        if tcfg.save_model:
            self.save_model(trainer.model, out)
        tmp = out / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, out / "summary.json")
        self.log(f"run folder: {out}")
        return summary

    def save_model(self, model, out: Path) -> None:
        """The trained model as safetensors, loadable with ``from_pretrained`` (LoRA is merged; the adapter is kept too)."""
        tmp = out / "model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if hasattr(model, "merge_and_unload"):
            model.save_pretrained(out / "adapter.tmp", safe_serialization=True)
            os.replace(out / "adapter.tmp", out / "adapter")
            import copy

            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(tmp, safe_serialization=True)
        self.tokenizer.save_pretrained(tmp)
        os.replace(tmp, out / "model")


def train(cfg: RunConfig, mcfg, *, log=print) -> dict:
    return Run(cfg, mcfg, log=log).execute()
