"""The model card written beside a trained model (``RUN/model/README.md``), in the Hugging Face format."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import yaml
from huggingface_hub import ModelCard, ModelCardData

from layerwise.generate import one_line
from layerwise.models import PACKAGED_MODELS


def base_model_id(spec: str) -> str | None:
    """The hub id a run started from: a packaged model's, or the hub id given (None for local folders and files)."""
    if spec in PACKAGED_MODELS and not Path(spec).exists():
        return PACKAGED_MODELS[spec].hub_id
    return spec if "/" in spec and not Path(spec).expanduser().exists() else None


def _command() -> str:
    """The command line that ran, when it was layerwise's (``layerwise ...`` or ``python -m layerwise ...``)."""
    program = Path(sys.argv[0])
    if program.name == "layerwise" or (program.name == "__main__.py" and program.parent.name == "layerwise"):
        return "layerwise " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    return "(trained from Python: layerwise.run.train)"


def _samples_section(samples: list[dict]) -> list[str]:
    """Greedy completions of the first held-out prompts, before and after training (train.sample_generations)."""
    if not samples:
        return []
    lines = ["## Sample completions", "", "Greedy, on the first held-out prompts (a long prompt is shown by its end):",
             ""]
    for i, sample in enumerate(samples, 1):
        lines += [f"{i}. prompt: {one_line(sample['prompt'], keep_end=True)}",
                  *(f"   - {key}: {one_line(sample[key], limit=300)}" for key in ("reference", "before", "after")), ""]
    return lines


def write_model_card(folder: Path, summary: dict, config: dict) -> None:
    """``folder/README.md``: YAML metadata (base_model, library_name, tags) and what the run did and measured."""
    data = summary["data"]
    card_data = ModelCardData(
        base_model=base_model_id(summary["model"]),
        library_name="transformers",
        tags=["layerwise", summary["method"], summary["task"]],
    )
    memory = summary["memory"]
    evaluation = summary.get("eval") or {}
    lines = [
        f"# {summary['model']} fine-tuned with layerwise ({summary['method']})",
        "",
        f"Trained with layerwise {summary['layerwise_version']}: method "
        f"`{summary['method']}` on `{data}` ({summary['task']}), {summary['steps']} optimizer steps of batch "
        f"{summary['batch_size']} x {summary['grad_accum']} accumulation, on {summary['device']}.",
        "",
        "## Measured during training",
        "",
        f"- tokens/s: {summary['tokens_per_s']:.1f} (the first step left out)",
        f"- measured peak memory above the loaded model: {memory['measured_peak'] / 2**20:.1f} MiB ({summary['peak_memory_kind']})",
        f"- accounted peak (weights + grads + optimizer + saved activations): {memory['total'] / 2**20:.1f} MiB",
        f"- trainable parameters (largest set in a step): {summary['trainable_parameters_max']:,} of {summary['total_parameters']:,}",
        *([f"- held-out {k}: {v:.4f}" for k, v in evaluation.items() if isinstance(v, float)]),
        "",
        *_samples_section(summary.get("samples") or []),
        "## Method and training configuration",
        "",
        "```yaml",
        yaml.safe_dump(config, sort_keys=False).rstrip(),
        "```",
        "",
        "## Command",
        "",
        "```bash",
        _command(),
        "```",
        "",
    ]
    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines)
    ModelCard(content).save(folder / "README.md")
