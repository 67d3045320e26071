"""``layerwise`` command line: ``train``, ``cache``, ``bench``, ``probe``, ``plan``, ``generate``, ``eval``
(EleutherAI's lm-evaluation-harness) and ``measure`` (one measurement of the benchmarks alone), and the glue that
turns each command's arguments into a run.

Bad input exits with status 2 and one line on stderr that names the problem and the fix.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

# Set before the tokenizers library is imported. The hub is used as huggingface_hub is told (HF_HUB_OFFLINE=1: cache only).
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from layerwise.config import resolve  # noqa: E402
from layerwise.data import PACKAGED_DATA, make_loader  # noqa: E402
from layerwise.engine import resolve_device  # noqa: E402
from layerwise.errors import ConfigError, LayerwiseError  # noqa: E402
from layerwise.generate import generate_text  # noqa: E402
from layerwise.harness import LOCAL_TASKS, run_eval  # noqa: E402
from layerwise.measure import meft as meft_reports  # noqa: E402
from layerwise.measure.bench import bench_report, run_bench  # noqa: E402
from layerwise.measure.gpu_check import write_report as write_gpu_check_report  # noqa: E402
from layerwise.measure.memory import plan_command  # noqa: E402
from layerwise.measure.peers import run_peer  # noqa: E402
from layerwise.measure.profile import profile_methods  # noqa: E402
from layerwise.measure.quality import write_report as write_quality_report  # noqa: E402
from layerwise.measure.suite import run_scaling, run_suite, run_worker  # noqa: E402
from layerwise.methods import METHODS, load_plugins  # noqa: E402
from layerwise.methods.salf.probe import check_budget, format_table, run_probe, sample_batches, write_outputs  # noqa: E402
from layerwise.models import PACKAGED_MODELS, add_to_hub_cache  # noqa: E402
from layerwise.run import TrainingStopped, check_output, load_inputs, train  # noqa: E402
from layerwise.schema import load_yaml, parse_override, set_path  # noqa: E402


def _cache_parser(sub) -> None:
    p = sub.add_parser("cache", help="lay a packaged model out in the Hugging Face cache under its hub id (offline use by id)")
    p.add_argument("name", choices=sorted(PACKAGED_MODELS))


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a model with a method and report what it cost")
    p.add_argument("config", nargs="?", help="YAML config (optional: defaults train LIFT on the packaged MiniLM + Rotten Tomatoes)")
    p.add_argument("--method", help=", ".join(sorted(METHODS)))
    p.add_argument("--model", help="packaged name (minilm, smollm2), local HF folder, .gguf file, or hub id org/name (from the HF cache)")
    p.add_argument("--data", help=f"local .jsonl/.csv/.parquet file, saved datasets folder, or packaged name ({', '.join(PACKAGED_DATA)})")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--output", help="run folder (must not exist or be empty)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. train.lr=3e-4 or method.k=2")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest complete checkpoint, with its config.yaml")
    p.add_argument("--stop-at", type=int, metavar="STEP", help="save a checkpoint after STEP optimizer steps and stop (exit 0); continue with --resume")


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="run methods side by side (one subprocess each) and compare cost")
    p.add_argument("config", nargs="?", help="YAML config shared by every method (optional)")
    p.add_argument("--methods", help="comma-separated method names (default full,lift,lisa,freeze,lora; with --suite: every suite method); "
                   "peers run through their own libraries: badam (pip install 'layerwise[peers]'), peft_lora")
    p.add_argument("--model")
    p.add_argument("--data")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--repeats", type=int, help="run each method this many times, interleaved, and take the median "
                   "(default 1; with --suite 3, --quick 1: the repeats after the first time the equal-batch steps alone)")
    p.add_argument("--eval", dest="eval_samples", type=int, default=0, help="held-out examples to evaluate after training (0 = skip)")
    p.add_argument("--output", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--suite", choices=["paper"], help="paper: every method on both packaged models, fp32 and bf16, report.md + charts (docs/benchmarks.md)")
    p.add_argument("--quick", action="store_true", help="with --suite: fewer steps and sizes, same report (under 10 minutes on 2 CPU cores)")
    p.add_argument("--models", help="with --suite: comma-separated models (minilm, smollm2, tiny-bert, tiny-llama; default minilm,smollm2)")
    p.add_argument("--precisions", help="with --suite: fp32, bf16 or both (default)")
    p.add_argument("--no-scaling", action="store_true", help="with --suite: skip the depth/length/batch scaling runs")
    p.add_argument("--device", help="with --suite: cpu or cuda (default: cuda when available; times then come from CUDA events)")
    p.add_argument("--docs", metavar="FILE", help="with --suite: also write FILE (e.g. docs/benchmarks.md): the report, chart links relative to FILE")


def _probe_parser(sub) -> None:
    p = sub.add_parser("probe", help="SALF probe: which blocks are worth fine-tuning on this data (probe.json, probe.png)")
    p.add_argument("config", nargs="?", help="YAML config (optional: defaults probe the packaged MiniLM + Rotten Tomatoes)")
    p.add_argument("--model", help="local HF folder, .gguf file, or packaged name (minilm, smollm2)")
    p.add_argument("--data", help=f"local data file or packaged name ({', '.join(PACKAGED_DATA)})")
    p.add_argument("--samples", type=int, default=512, help="training examples in the probe's forward pass (default 512)")
    p.add_argument("--budget", type=float, help="fraction of full fine-tuning's backward cost, e.g. 0.5: how many top blocks fit")
    p.add_argument("--output", required=True, help="folder for probe.json and probe.png (must not exist or be empty)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. data.max_length=128")


def _plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="predict peak training memory per method, the largest batch that fits a budget, and tokens/s")
    p.add_argument("config", nargs="?", help="YAML config (optional)")
    p.add_argument("--model", help="local HF folder, .gguf file, or packaged name (minilm, smollm2)")
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--memory", required=True, help="memory budget, e.g. 8GiB, 16GB, 512MiB")
    p.add_argument("--seq-len", type=int, help="tokens per example (default: data.max_length)")
    p.add_argument("--methods", help="comma-separated methods (default: every method)")
    p.add_argument("--batch-size", type=int, help="batch for the per-component table (default: train.batch_size)")
    p.add_argument("--output", help="also write the plan as JSON: a .json path, or a folder for plan.json (default: print only)")
    p.add_argument("--no-speed", action="store_true", help="skip the cost-model profile (no tokens/s prediction)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (train.max_steps=100) or a method's (lift.switch_every=10)")


def _measure_parser(sub) -> None:
    p = sub.add_parser("measure", help="one measurement of the benchmarks alone (the command each result records)")
    what = p.add_subparsers(dest="what", required=True, parser_class=_Parser)
    for name, help_ in (("worker", "one method of the suite from its SPEC.json"), ("scaling", "one method's scaling runs from SPEC.json")):
        w = what.add_parser(name, help=help_)
        w.add_argument("spec", metavar="SPEC.json")
    prof = what.add_parser("profile", help="profile per-block cost once and predict each method (bench's cost model column)")
    prof.add_argument("config", help="a bench folder's configs/METHOD.yaml (its siblings hold the other methods)")
    prof.add_argument("--methods", required=True)
    prof.add_argument("--steps", type=int, required=True)
    prof.add_argument("--output", required=True)
    peer = what.add_parser("peer", help="one peer library's run on a bench config (BAdam, a plain PEFT loop; bench's peer entries)")
    peer.add_argument("config", help="a bench folder's configs/PEER.yaml")
    peer.add_argument("--peer", required=True, help="badam or peft_lora")
    peer.add_argument("--output", required=True)
    meft = what.add_parser("meft", help="MEFT: reconstruction error by depth, gradient error, saved bytes (docs/meft.md)")
    meft.add_argument("report", choices=["errors", "grads", "memory"])
    meft.add_argument("model", nargs="?", default="minilm")
    meft.add_argument("--batch", type=int, default=None)
    meft.add_argument("--length", type=int, default=None)
    meft.add_argument("--variants", default="1,2,3")
    rebuild = what.add_parser("bench-report", help="results.json/md of a bench folder from its runs (a bench stopped early, repeats run by hand)")
    rebuild.add_argument("folder", metavar="BENCH_DIR")
    rebuild.add_argument("--methods", default=None, help="comma-separated entries, in order (default: every configs/*.yaml, full first)")
    gpu = what.add_parser("gpu-check-report", help="summary.md of a scripts/gpu-check.sh folder (docs/benchmarks.md)")
    gpu.add_argument("out_dir", metavar="OUT_DIR")
    quality = what.add_parser("quality-report", help="held-out metric mean and sd over bench folders (seeds), with speed and memory (docs/quality.md)")
    quality.add_argument("folders", nargs="+", metavar="BENCH_DIR", help="`layerwise bench --output` folders, e.g. one per seed")
    quality.add_argument("--metrics", default="accuracy", help="comma-separated held-out metrics (summary.json `eval`), the first ranks: accuracy, loss, first_token_accuracy, ...")
    quality.add_argument("--output", required=True, help="writes OUTPUT.json and OUTPUT.md")


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="complete a prompt with a run's trained model (or any causal LM), greedy")
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="a finished `layerwise train` run (its model/ folder)")
    p.add_argument("--model", help="instead of RUN_DIR: any model layerwise trains (smollm2, a folder, .gguf, hub id)")
    p.add_argument("--prompt", required=True, help="the text to answer (a user turn if the model has a chat template)")
    p.add_argument("--no-chat-template", action="store_true", help="pass the prompt as plain text even to a chat model")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, help="sample at this temperature (default: greedy, always the same)")
    p.add_argument("--seed", type=int, default=0, help="with --temperature: the sampling seed")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="score a run's model (or any causal LM) with EleutherAI's lm-evaluation-harness")
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="a finished `layerwise train` run (its model/ folder)")
    p.add_argument("--model", help="score this model instead (smollm2, a folder, a .gguf file, a hub id), "
                                   "on the run's held-out split")
    p.add_argument("--tasks", help=f"comma-separated: {', '.join(LOCAL_TASKS)} or the harness's own "
                                   f"(default: the one that matches the run's data)")
    p.add_argument("--limit", type=int, help="score the first N examples of each task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--chat-template", choices=["auto", "on", "off"], default="auto",
                   help="wrap prompts in the model's chat template (auto: for the chat task)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="model dtype (default: its own)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    p.add_argument("--output", help="results folder (default: RUN_DIR/eval, or RUN_DIR/eval-NAME with --model NAME)")


def build_raw_config(args) -> dict:
    raw = load_yaml(args.config) if args.config else {}
    method = raw.get("method")
    if isinstance(method, str):
        raw["method"] = {"name": method}
    if getattr(args, "method", None):
        current = raw.get("method") or {}
        # Switching method on the command line drops the file's method-specific keys only if they name another method.
        raw["method"] = {**current, "name": args.method} if current.get("name") in (None, args.method) else {"name": args.method}
    if args.model:
        raw["model"] = args.model
    if args.data:
        raw.setdefault("data", {})["source"] = args.data
    if getattr(args, "max_steps", None) is not None:
        raw.setdefault("train", {})["max_steps"] = args.max_steps
    if getattr(args, "output", None) and args.command == "train":
        raw["output"] = args.output
    for text in args.overrides:
        path, value = parse_override(text)
        if path[0] == "method" and len(path) > 1:
            raw.setdefault("method", {"name": "lift"})
            if isinstance(raw["method"], str):
                raw["method"] = {"name": raw["method"]}
        set_path(raw, path, value)
    return raw


def _resume_config(args) -> dict:
    given = [flag for flag, v in (("config", args.config), ("--method", args.method), ("--model", args.model), ("--data", args.data),
                                  ("--max-steps", args.max_steps), ("--output", args.output), ("--set", args.overrides)) if v]
    if given:
        raise ConfigError(f"--resume continues a run with its own config.yaml: drop {', '.join(given)}")
    run_dir = Path(args.resume)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--resume '{run_dir}': no config.yaml there; pass the folder of a run started by `layerwise train`")
    raw = load_yaml(run_dir / "config.yaml")
    raw["output"] = str(run_dir)  # the folder may have moved since
    if isinstance(raw.get("data"), dict) and raw["data"].get("task", "") is None:
        del raw["data"]["task"]  # written (always null, never read) by layerwise before data.task was removed
    return raw


def cmd_cache(args) -> int:
    hub_id, snapshot = add_to_hub_cache(args.name)
    print(f"{hub_id} -> {snapshot} (loads by id with HF_HUB_OFFLINE=1: layerwise, transformers, TRL, lm-eval)")
    return 0


def cmd_train(args) -> int:
    cfg, mcfg = resolve(_resume_config(args) if args.resume else build_raw_config(args))
    try:
        train(cfg, mcfg, resume=bool(args.resume), stop_at=args.stop_at)
    except TrainingStopped as stop:
        # A signal: 128 + its number (130 SIGINT, 143 SIGTERM), as a shell reports it: the run did not finish.
        print(f"layerwise: {stop}", file=sys.stderr)
        return 128 + stop.signum if stop.signum is not None else 0
    return 0


def cmd_bench(args) -> int:
    suite_only = [f for f, v in (("--quick", args.quick), ("--models", args.models), ("--precisions", args.precisions),
                                 ("--no-scaling", args.no_scaling), ("--device", args.device), ("--docs", args.docs)) if v]
    if args.suite:
        given = [f for f, v in (("config", args.config), ("--model", args.model), ("--data", args.data), ("--set", args.overrides)) if v]
        if given:
            raise ConfigError(f"--suite runs its own models, data and settings: drop {', '.join(given)} (use --models, --methods, --precisions, --quick)")
        run_suite(args)
        return 0
    if suite_only:
        raise ConfigError(f"{', '.join(suite_only)} only apply with --suite paper")
    args.methods = args.methods or "full,lift,lisa,freeze,lora"
    args.repeats = 1 if args.repeats is None else args.repeats
    if args.repeats < 1:
        raise ConfigError(f"--repeats {args.repeats}: use 1 or more")
    run_bench(args, build_raw_config(args))
    return 0


def cmd_probe(args) -> int:
    """``layerwise probe``: load model and data, run SALF's probe on a sample, write probe.json and probe.png."""
    if args.samples < 1:
        raise ConfigError(f"--samples {args.samples} probes nothing: use a positive count (e.g. 512)")
    check_budget(args.budget, "--budget")
    raw = build_raw_config(args)
    raw.pop("output", None)
    cfg, _ = resolve(raw)
    out = Path(args.output)
    check_output(out)
    torch.manual_seed(cfg.train.seed)
    task, splits, model, tokenizer, _info, anatomy = load_inputs(cfg)
    model.to(resolve_device(cfg.train.device))

    def loader(epoch: int):
        return make_loader(splits.train, tokenizer, cfg.data, batch_size=cfg.train.eval_batch_size, shuffle=True, seed=cfg.train.seed + epoch)

    result = run_probe(model, anatomy, sample_batches(loader, args.samples), task, budget=args.budget, seed=cfg.train.seed)
    result["model"] = cfg.model
    result["data"] = cfg.data.source
    print(format_table(result))
    paths = write_outputs(result, out)
    print(f"wrote {paths['json']} and {paths['png']}")
    return 0


def cmd_plan(args) -> int:
    per_method: dict = {}
    rest = []
    for text in args.overrides:
        path, value = parse_override(text)
        if path[0] in METHODS and len(path) > 1:
            set_path(per_method.setdefault(path[0], {}), path[1:], value)
        else:
            rest.append(text)
    args.overrides = rest
    plan_command(build_raw_config(args), memory=args.memory, seq_len=args.seq_len, methods=args.methods, batch_size=args.batch_size,
                 output=args.output, speed=not args.no_speed, method_overrides=per_method)
    return 0


def cmd_measure(args) -> int:
    if args.what in ("worker", "scaling"):
        spec = _read_json(args.spec)
        (run_worker if args.what == "worker" else run_scaling)(spec)
    elif args.what == "profile":
        profile_methods(args.config, [m for m in args.methods.split(",") if m], args.steps, args.output)
    elif args.what == "peer":
        run_peer(args.config, args.peer, args.output)
    elif args.what == "bench-report":
        bench_report(args.folder, [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None)
    elif args.what == "gpu-check-report":
        print(f"summary: {write_gpu_check_report(args.out_dir)}")
    elif args.what == "quality-report":
        out = write_quality_report(args.folders, [m.strip() for m in args.metrics.split(",") if m.strip()], args.output)
        print(out.with_suffix(".md").read_text(), end="")
    else:
        meft_reports.print_report(args)
    return 0


def cmd_generate(args) -> int:
    print(generate_text(args.run_dir, model=args.model, prompt=args.prompt, chat_template=not args.no_chat_template,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                        device=args.device))
    return 0


def cmd_eval(args) -> int:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    run_eval(args.run_dir, model=args.model, tasks=tasks, limit=args.limit, batch_size=args.batch_size,
             output=args.output, chat_template=args.chat_template, dtype=args.dtype, device=args.device)
    return 0


def _read_json(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"'{path}' is not a readable JSON spec ({exc}): pass a DIR/specs/NAME.json written by the suite") from None


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other bad input (``--help`` still prints the full usage)."""

    def error(self, message: str):
        self.exit(2, f"layerwise: error: {' '.join(message.split())} (see: {self.prog} --help)\n")


def _crash_log(exc: BaseException) -> str:
    """Write the traceback of an unexpected error to a log file; return its path."""
    path = os.path.join(tempfile.gettempdir(), f"layerwise-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
    try:
        with open(path, "w") as f:
            f.write(f"layerwise {' '.join(sys.argv[1:])}\n")
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=f)
    except OSError:
        return "(could not write a log)"
    return path


def main(argv: list[str] | None = None) -> int:
    try:
        load_plugins()  # before the parser lists the methods
    except LayerwiseError as exc:
        print(f"layerwise: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    parser = _Parser(prog="layerwise", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _train_parser(sub)
    _cache_parser(sub)
    _bench_parser(sub)
    _probe_parser(sub)
    _plan_parser(sub)
    _measure_parser(sub)
    _generate_parser(sub)
    _eval_parser(sub)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, one line on stderr): a status, not an exception
        return exc.code if isinstance(exc.code, int) else 2

    hf_logging.set_verbosity_error()
    commands = {"train": cmd_train, "cache": cmd_cache, "bench": cmd_bench, "probe": cmd_probe, "plan": cmd_plan, "measure": cmd_measure,
                "generate": cmd_generate, "eval": cmd_eval}
    try:
        return commands[args.command](args)
    except LayerwiseError as exc:
        # One line even when the message quotes user input with line breaks in it.
        print(f"layerwise: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("layerwise: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an input no check caught: one line, the traceback in a log
        msg = " ".join(str(exc).split()) or "(no message)"
        if len(msg) > 300:
            msg = msg[:300] + "..."
        print(f"layerwise: error: unexpected {type(exc).__name__}: {msg} (traceback in {_crash_log(exc)})", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
