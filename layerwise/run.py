"""A whole run: validate config, load model and data, train, evaluate, write the run folder.

Everything that can be wrong with the input (config keys, model, data columns, labels,
layer indices) is checked before the run folder is created, so a bad input leaves nothing
behind. Final artefacts (summary, model) are written to a temporary name and renamed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import yaml

from layerwise import __version__
from layerwise.anatomy import UnsupportedModelError, find_anatomy
from layerwise.card import write_model_card
from layerwise.config import RunConfig
from layerwise.data import Splits, load_splits, make_collate, make_loader, tokenize_splits
from layerwise.engine import Trainer, evaluate, prefix_cache, resolve_device
from layerwise.engine.checkpoint import find_latest, load_checkpoint, save_checkpoint
from layerwise.engine.distributed import ActiveGradSync, ShardedStream, gather_digests, init_distributed, launched
from layerwise.engine.fsdp import LossSync, check_fsdp, shard_model
from layerwise.engine.io import swap_folder, write_text
from layerwise.engine.trainer import BatchStream
from layerwise.errors import ConfigError, ModelError
from layerwise.generate import describe_samples, held_out_prompts, sample_completions, sample_records
from layerwise.methods import METHODS, setup
from layerwise.methods.base import RunContext
from layerwise.models import default_task_for, load_model_and_tokenizer, resolve_model_path
from layerwise.preflight import check_length, check_resources, estimate, warn_slow_bf16
from layerwise.schema import to_dict
from layerwise.tracking import Trackers, check_trackers


def default_output(cfg: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.method['name']}-{stamp}"


def check_output(path: Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"output folder '{path}' already exists and is not empty: pass a new --output (nothing was overwritten)")


class TrainingStopped(Exception):
    """The run stopped early on request (a signal, or ``stop_at``) after saving a checkpoint.

    ``signum`` is the signal (None for ``stop_at``); the CLI exits with 128 + signum, or 0.
    """

    def __init__(self, message: str, *, step: int, checkpoint: Path, signum: int | None = None):
        super().__init__(message)
        self.step, self.checkpoint, self.signum = step, checkpoint, signum


class _StopSignals:
    """SIGINT/SIGTERM set a flag (the loop saves and stops at the next step boundary); a second one stops at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(
            f"layerwise: {signal.Signals(signum).name} received: saving a checkpoint after this step, then stopping "
            "(send it again to stop at once without saving)",
            file=sys.stderr,
            flush=True,
        )

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics rows written after checkpoint ``step`` (and a torn last line), so a resumed run appends, never duplicates."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            keep.append(line)
    write_text(path, "".join(line + "\n" for line in keep))


def load_inputs(cfg: RunConfig, splits: Splits | None = None):
    """Task, tokenized splits, model, tokenizer, model info and anatomy for ``cfg``: what every
    command that runs a model on data (train, probe) loads first. Bad input raises LayerwiseError.
    ``splits``: the data of ``cfg``, loaded already (the suite loads it once for many runs)."""
    task = cfg.task or default_task_for(resolve_model_path(cfg.model, cfg.model_revision))
    splits = splits or load_splits(cfg.data, task)
    num_labels = len(splits.label_names) if splits.label_names else None
    model, tokenizer, info = load_model_and_tokenizer(
        cfg.model,
        task,
        num_labels=num_labels,
        trust_remote_code=cfg.trust_remote_code,
        label_names=splits.label_names,
        revision=cfg.model_revision,
    )
    try:
        anatomy = find_anatomy(model, cfg.blocks)
    except UnsupportedModelError as exc:
        raise ModelError(str(exc)) from None
    except (AttributeError, ValueError) as exc:
        raise ConfigError(f"blocks: {exc}") from None
    return task, tokenize_splits(splits, tokenizer, cfg.data, task), model, tokenizer, info, anatomy


class Run:
    """Holds everything a run needs once the input has been validated.

    ``resume=True`` continues the run in ``cfg.output`` from its newest complete checkpoint;
    ``stop_at=N`` saves a checkpoint after step N and raises :class:`TrainingStopped`.
    """

    def __init__(self, cfg: RunConfig, mcfg, *, log=print, resume: bool = False, stop_at: int | None = None,
                 splits: Splits | None = None):
        self.cfg = cfg
        self.mcfg = mcfg
        self.log = log
        self.resume = resume
        self.stop_at = stop_at
        self.prefix_cache = None  # train.prefix_cache, opened in execute(); the training loader then yields example indices
        self.trackers: Trackers | None = None  # train.report_to, started in execute() once the run folder exists
        check_trackers(cfg.train.report_to)  # a tracker whose package is missing fails now, before anything is written
        torch.manual_seed(cfg.train.seed)
        self.device = resolve_device(cfg.train.device)
        # Data parallel (torchrun / accelerate launch): (rank, world) or None; rank 0 writes the run folder.
        self.dist = init_distributed(self.device)
        self.rank = self.dist[0] if self.dist else 0
        if self.rank:
            self.log = log = lambda *a, **k: None
        warn_slow_bf16(cfg.train, self.device, log)
        if self.dist and cfg.output is None:
            raise ConfigError("a distributed run needs --output (every process must agree on the run folder)")
        if cfg.train.fsdp:
            check_fsdp(cfg.train, METHODS[mcfg.name], self.dist)
        self.output = Path(cfg.output) if cfg.output else default_output(cfg)
        self.checkpoint = None
        if resume:
            done = self.output / "summary.json"
            # Read from the summary, not the newest checkpoint: without an end checkpoint
            # (train.checkpoint_at_end off) that one is older than a finished run.
            if done.exists() and json.loads(done.read_text()).get("steps", 0) >= cfg.train.max_steps:
                raise ConfigError(f"run '{self.output}' is complete ({cfg.train.max_steps} steps, summary.json): nothing to resume")
            self.checkpoint = find_latest(self.output, log=log)
            if self.checkpoint is None:
                raise ConfigError(f"run folder '{self.output}' has no complete checkpoint to resume from: start a new run instead")
        else:
            check_output(self.output)
        if self.dist:
            torch.distributed.barrier()  # every rank has checked the folder before rank 0 creates it

        self.task, self.splits, model, self.tokenizer, self.model_info, anatomy = load_inputs(cfg, splits)
        self.label_names = self.splits.label_names
        train_loader, eval_loader = self.loaders()
        context = RunContext(train_loader=train_loader, eval_loader=eval_loader, tokenizer=self.tokenizer, output=self.output,
                             device=self.device)
        started = time.perf_counter()
        self.method, self.model = setup(mcfg, model, task=self.task, blocks=cfg.blocks, seed=cfg.train.seed,
                                        max_steps=cfg.train.max_steps, context=context, anatomy=anatomy)
        # What a method does before its first step (salf's probe) is part of its end-to-end time.
        self.setup_seconds = time.perf_counter() - started
        if self.method.anatomy.tied_head():
            n = sum(p.numel() for p in self.method.anatomy.head_parameters())
            log(f"head: the output projection is tied to the input embeddings, so a plan's head trains the final norm only "
                f"({n:,} parameters); the projection trains when the embeddings do")
        # Memory and disk guards: refuse now, with the estimate, rather than die mid-run.
        check_length(self.model, cfg)
        self.estimate = estimate(self.model, self.method, cfg, self.task)
        check_resources(self.estimate, cfg, self.device, self.output, log=log)
        # train.prefix_cache: can this run use a frozen-prefix cache (refused here for `on` when not)?
        self.prefix_decision = prefix_cache.decide(cfg, self.method, len(self.splits.train), distributed=bool(self.dist),
                                                   memory_mapped=self.splits.layout is not None, log=log)

    # ------------------------------------------------------------------------------------
    def loaders(self):
        cfg = self.cfg

        def train_loader(epoch: int):
            return make_loader(
                self.splits.train, self.tokenizer, cfg.data, batch_size=cfg.train.batch_size, shuffle=True, seed=cfg.train.seed + epoch,
                with_index=self.prefix_cache is not None,  # decided before the first batch is drawn
            )

        eval_loader = make_loader(self.splits.eval, self.tokenizer, cfg.data, batch_size=cfg.train.eval_batch_size, shuffle=False, seed=0)
        return train_loader, eval_loader

    def execute(self) -> dict:
        cfg, tcfg = self.cfg, self.cfg.train
        train_loader, eval_loader = self.loaders()
        stream = BatchStream(train_loader)
        if self.dist:
            stream = ShardedStream(stream, *self.dist)
        if tcfg.fsdp:
            shard_model(self.model, self.method.anatomy)  # before the Trainer takes the (now DTensor) parameters
        trainer = Trainer(self.model, self.method, tcfg, stream, device=self.device)
        with contextlib.ExitStack() as cleanup:
            if trainer.frozen is not None:
                cleanup.callback(trainer.frozen.close)  # frozen_master=disk: the scratch folder of float32 masters
            out = self.output
            if self.dist:
                if tcfg.fsdp:
                    trainer.grad_sync = LossSync(self.dist[1])  # FSDP's reduce-scatter averages the gradients
                else:
                    trainer.grad_sync = ActiveGradSync(self.dist[1])
                if self.rank:
                    # Other ranks train the same way and write into a scratch folder, removed at the end.
                    out = Path(tempfile.mkdtemp(prefix=f"layerwise-rank{self.rank}-"))
            loop_state = None
            if self.checkpoint is not None:
                loop_state = load_checkpoint(self.checkpoint, trainer)
                _truncate_metrics(out / "metrics.jsonl", trainer.step_index)
                self.log(f"resuming from {self.checkpoint} (step {trainer.step_index} of {tcfg.max_steps})")
            if self.prefix_decision.enabled:
                self._open_prefix_cache(trainer)  # may refuse (no disk space) before a new run folder is made
            if self.checkpoint is None:
                out.mkdir(parents=True, exist_ok=True)
                resolved = to_dict(cfg)
                resolved["method"] = to_dict(self.mcfg)
                resolved["task"] = self.task
                (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
            if tcfg.report_to and not self.rank:
                try:
                    self.trackers = Trackers(tcfg.report_to, out, out.name, {**to_dict(cfg), "method": to_dict(self.mcfg)})
                except ConfigError:
                    if self.checkpoint is None:
                        shutil.rmtree(out, ignore_errors=True)  # a new run that never started leaves no folder
                    raise
                cleanup.callback(self.trackers.finish)
            try:
                summary = self._train(trainer, eval_loader, out, loop_state)
            except BaseException:
                # A run that did not finish leaves no summary or model that could be mistaken for results.
                for name in ("summary.json", "model"):
                    p = out / name
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                    elif p.exists():
                        p.unlink()
                raise
            finally:
                if self.rank:
                    shutil.rmtree(out, ignore_errors=True)
            return summary

    def _open_prefix_cache(self, trainer: Trainer) -> None:
        """Reuse or build the frozen-prefix cache (after a checkpoint is loaded: the key hashes the weights as they are).
        Its build time counts as training time, so tokens/s includes it."""
        cache = prefix_cache.open_or_build(
            self.cfg, self.prefix_decision, trainer.model, self.method.anatomy, self.tokenizer, self.splits.train,
            # The build pads each (length-sorted) batch to its longest example only: the states at real
            # positions do not depend on the padding, and max_length padding would make the build pay for it.
            make_collate(self.tokenizer, dataclasses.replace(self.cfg.data, padding="longest")),
            device=self.device, autocast=trainer.autocast, log=self.log,
        )
        if cache is not None:
            trainer.prefix_cache = self.prefix_cache = cache
            trainer.totals.seconds += cache.build_seconds

    def _train(self, trainer: Trainer, eval_loader, out: Path, loop_state: dict | None = None) -> dict:
        cfg, tcfg = self.cfg, self.cfg.train
        metric = "accuracy" if self.task == "classification" else "loss"
        # Sample completions on rank 0 alone (FSDP's sharded forward would need every rank).
        sampling = self.task == "causal_lm" and tcfg.sample_generations and not self.rank and not tcfg.fsdp
        prompts = held_out_prompts(self.splits.eval, tcfg.sample_generations) if sampling else []
        if loop_state is not None:
            eval_before = loop_state.get("eval_before")
            samples_before = loop_state.get("samples_before")
        else:
            eval_before = evaluate(trainer.model, eval_loader, self.task, self.device, tcfg.bf16) if tcfg.eval_before else None
            if eval_before:
                self.log(f"held-out {metric} before: {eval_before[metric]:.4f}")
            samples_before = self.sample(trainer.model, prompts)
        from tqdm.auto import tqdm

        bar = tqdm(total=tcfg.max_steps, initial=trainer.step_index, desc=f"{self.method.name}", disable=not tcfg.progress, dynamic_ncols=True)
        trainer.peak_memory.reset()
        window_loss, window_tokens, window_seconds, window_n = 0.0, 0, 0.0, 0
        first_step_seconds = 0.0
        first_step_tokens = 0
        window_skipped = 0  # steps skipped for a non-finite loss (train.on_nonfinite=skip) in this metrics window
        if loop_state:
            window_loss, window_tokens, window_seconds, window_n = (loop_state[k] for k in ("window_loss", "window_tokens", "window_seconds", "window_n"))
            first_step_seconds, first_step_tokens = loop_state["first_step_seconds"], loop_state["first_step_tokens"]
        saved_step = trainer.step_index if loop_state is not None else -1
        path = self.checkpoint

        def checkpoint():
            state = {
                "window_loss": window_loss, "window_tokens": window_tokens, "window_seconds": window_seconds, "window_n": window_n,
                "first_step_seconds": first_step_seconds, "first_step_tokens": first_step_tokens, "eval_before": eval_before,
                "samples_before": samples_before,
            }
            return save_checkpoint(out, trainer, loop_state=state, keep_last=tcfg.keep_last)

        resume_hint = f"resume with: layerwise train --resume {out}"
        with open(out / "metrics.jsonl", "a") as metrics, _StopSignals() as stop:
            while trainer.step_index < tcfg.max_steps:
                rec = trainer.train_step()
                if rec.step == 0:
                    first_step_seconds, first_step_tokens = rec.seconds, rec.tokens
                window_loss += rec.loss if not rec.skipped else 0.0
                window_skipped += rec.skipped
                window_tokens += rec.tokens
                window_seconds += rec.seconds
                window_n += 1
                bar.update(1)
                bar.set_postfix(loss=f"{rec.loss:.4f}", active=rec.plan.describe(), refresh=False)
                if window_n >= tcfg.log_every or rec.step == tcfg.max_steps - 1:
                    row = {
                        "step": rec.step + 1,
                        "loss": window_loss / (window_n - window_skipped) if window_n > window_skipped else None,
                        "lr": rec.lr,
                        "active": rec.plan.describe(),
                        "active_blocks": list(rec.plan.blocks),
                        "tokens_per_s": window_tokens / max(window_seconds, 1e-9),
                        "bytes": rec.bytes,
                        **({"skipped_steps": trainer.skipped_steps} if trainer.skipped_steps else {}),
                        **self.method.log_values(),
                    }
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                    if self.trackers is not None:
                        self.trackers.log({"train/loss": row["loss"], "train/lr": rec.lr, "train/tokens_per_s": row["tokens_per_s"],
                                           "train/active_blocks": len(rec.plan.blocks),
                                           "memory/measured_peak_bytes": trainer.peak_memory.peak_above_baseline(),
                                           **{f"memory/{k}_bytes": v for k, v in rec.bytes.items()}}, step=rec.step + 1)
                    window_loss, window_tokens, window_seconds, window_n = 0.0, 0, 0.0, 0
                    window_skipped = 0
                step = trainer.step_index
                stopping = stop.signum is not None or step == self.stop_at
                if self.dist:
                    # Ranks may see a signal at different steps: stop together or not at all.
                    flag = torch.tensor([1.0 if stopping else 0.0])
                    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                    stopping = bool(flag.item())
                at_end = step == tcfg.max_steps and tcfg.checkpoint_at_end
                if (tcfg.save_every and step % tcfg.save_every == 0) or stopping or at_end:
                    if saved_step != step:
                        path = checkpoint()
                        saved_step = step
                if stopping and step < tcfg.max_steps:
                    bar.close()
                    why = signal.Signals(stop.signum).name if stop.signum is not None else f"stop_at={self.stop_at}"
                    raise TrainingStopped(
                        f"stopped after step {step} of {tcfg.max_steps} ({why}); checkpoint {path}; {resume_hint}",
                        step=step, checkpoint=path, signum=stop.signum,
                    )
        bar.close()
        peak_process = trainer.peak_memory.peak_bytes()
        # The method's work before the first step (SALF's probe) has its own window: the run's peak is the larger.
        measured_peak = max(trainer.peak_memory.peak_above_baseline(), self.method.setup_measured_peak)
        totals = trainer.totals
        # The first step pays one-off costs (allocator warm-up, lazy init); leave it out of the rates when there is more than one.
        seconds, tokens, samples = totals.seconds, totals.tokens, totals.samples
        if totals.steps > 1:
            seconds -= first_step_seconds
            tokens -= first_step_tokens
            samples -= samples // totals.steps
        if trainer.frozen is not None:
            trainer.frozen.restore_all()  # train.frozen_dtype: evaluate and save the float32 model (its master copies)
        eval_after = evaluate(trainer.model, eval_loader, self.task, self.device, tcfg.bf16) if tcfg.eval_after else None
        if eval_after:
            self.log(f"held-out {metric} after:  {eval_after[metric]:.4f}")
            if self.trackers is not None:
                self.trackers.log({f"eval/{k}": v for k, v in eval_after.items()}, step=totals.steps)
        generations = sample_records(self.tokenizer, prompts, samples_before, self.sample(trainer.model, prompts))
        for line in describe_samples(generations):
            self.log(line)
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
            "setup_seconds": self.setup_seconds,
            "tokens_per_s": tokens / max(seconds, 1e-9),
            "samples_per_s": samples / max(seconds, 1e-9),
            "peak_memory_bytes": peak_process,
            "peak_memory_kind": trainer.peak_memory.kind,
            # Accounted: weights + grads + optimizer + activations, each at its peak (layerwise's meter); measured_peak:
            # the process's peak above what it held when the first step began (the loaded model), from the OS or CUDA,
            # or above what it held when the method's own setup work began (setup_measured_peak), whichever is larger.
            "memory": {**{k: int(v) for k, v in totals.peak.items()}, "measured_peak": measured_peak,
                       "measured_baseline": trainer.peak_memory.baseline, "setup_measured_peak": self.method.setup_measured_peak},
            "trainable_parameters_max": trainer.max_trainable,
            "total_parameters": sum(p.numel() for p in trainer.model.parameters()),
            "switches": trainer.switches,
            "skipped_steps": trainer.skipped_steps,
            "estimate": self.estimate.as_dict(),
            **({"frozen_weights": trainer.frozen.stats()} if trainer.frozen is not None else {}),
            **({"prefix_cache": self.prefix_cache.summary() if self.prefix_cache else {"used": False, "reason": self.prefix_decision.reason}}
               if self.cfg.train.prefix_cache != "off" else {}),
            "eval_before": eval_before,
            "eval": eval_after,
            **({"samples": generations} if generations else {}),
        }
        self.log(
            f"tokens/s {summary['tokens_per_s']:.0f} | measured peak memory above the loaded model {measured_peak / 2**20:.1f} MiB "
            f"| accounted peak {summary['memory']['total'] / 2**20:.1f} MiB "
            f"(weights {summary['memory']['weights'] / 2**20:.1f}, grads {summary['memory']['grads'] / 2**20:.1f}, "
            f"optimizer {summary['memory']['optimizer'] / 2**20:.1f}, activations {summary['memory']['activations'] / 2**20:.1f}) | "
            f"peak process memory {peak_process / 2**20:.0f} MiB"
        )
        summary.update(self.method.finish(out))
        if self.dist:
            digests = gather_digests(trainer.model, self.dist[1])
            sync = trainer.grad_sync
            summary["distributed"] = {
                "world_size": self.dist[1],
                "mechanism": "FSDP2 fully_shard (one unit per block + root): reduce-scatter of gradients" if tcfg.fsdp
                else "all_reduce of the active parameters' gradients (flat buckets)",
                "weights_identical": len(set(digests)) == 1,
                "weights_sha256": digests,
                "grad_sync_bytes_per_rank": sync.bytes,
                "grad_sync_seconds": sync.seconds,
            }
        if tcfg.save_model and tcfg.fsdp:
            # Sharded parameters: every rank joins the gathering, rank 0 writes.
            state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in trainer.model.state_dict().items()}
            if not self.rank:
                self.save_model(trainer.model, out, summary, state_dict=state)
        elif tcfg.save_model and not self.rank:
            self.save_model(trainer.model, out, summary)
        write_text(out / "summary.json", json.dumps(summary, indent=2))
        self.log(f"run folder: {out}")
        return summary

    def sample(self, model, prompts) -> list[str]:
        """Greedy completions of the held-out ``prompts`` (train.sample_max_new_tokens each)."""
        return sample_completions(model, self.tokenizer, prompts, max_new_tokens=self.cfg.train.sample_max_new_tokens,
                                  device=self.device)

    def save_model(self, model, out: Path, summary: dict, state_dict: dict | None = None) -> None:
        """The trained model as safetensors, loadable with ``from_pretrained`` (LoRA is merged; the adapter is kept too),
        with a model card (README.md) from ``summary``."""
        tmp = out / "model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if hasattr(model, "merge_and_unload"):
            model.save_pretrained(out / "adapter.tmp", safe_serialization=True)
            swap_folder(out / "adapter.tmp", out / "adapter")
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict is not None else {}))
        self.tokenizer.save_pretrained(tmp)
        write_model_card(tmp, summary, {**to_dict(self.cfg), "method": to_dict(self.mcfg)})
        swap_folder(tmp, out / "model")


def train(cfg: RunConfig, mcfg, *, log=print, resume: bool = False, stop_at: int | None = None) -> dict:
    """Run (or, with ``resume``, continue) a training run; raises :class:`TrainingStopped` on a graceful stop."""
    joins = launched() and torch.distributed.is_available() and not torch.distributed.is_initialized()
    try:
        return Run(cfg, mcfg, log=log, resume=resume, stop_at=stop_at).execute()
    finally:
        if joins and torch.distributed.is_initialized():
            # A process group left to interpreter exit can abort the process while its threads are torn down.
            torch.distributed.destroy_process_group()
