"""Text from a causal LM through transformers' ``model.generate``: the sample completions a run records before and
after training (``train.sample_generations``) and ``layerwise generate``.

Samples are greedy: the same text on every run, and decoding draws nothing from torch's random stream, so a run
with samples trains to the same weights as one without.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from layerwise.engine import resolve_device
from layerwise.errors import ConfigError, ModelError
from layerwise.methods.meft import load_meft
from layerwise.models import default_task_for, load_model_and_tokenizer, load_tokenizer, resolve_model_path


@dataclass(frozen=True)
class HeldOutPrompt:
    """A held-out example cut where generation starts: the ``prompt`` token ids and the ``reference`` ids after them."""

    prompt: list[int]
    reference: list[int]


def held_out_prompts(eval_split, count: int) -> list[HeldOutPrompt]:
    """The first ``count`` examples of a tokenized held-out split, each cut before its last labelled span: a
    prompt/response pair before its response, a chat before its last assistant turn (after the template's
    generation prompt). Plain text, labelled throughout, is cut in half."""
    prompts = []
    for row in eval_split.select(range(min(count, eval_split.num_rows))):
        ids, labels = row["input_ids"], row["labels"]
        labelled = [i for i, label in enumerate(labels) if label != -100]
        if not labelled:
            continue  # memory-mapped data keep examples truncated to nothing to predict
        end = labelled[-1] + 1
        start = end - 1
        while start > 0 and labels[start - 1] != -100:
            start -= 1
        if start == 0:
            start = len(ids) // 2
        prompts.append(HeldOutPrompt(prompt=list(ids[:start]), reference=list(ids[start:end])))
    return prompts


def complete(model, tokenizer, prompt_ids: list[int], *, max_new_tokens: int, device: torch.device,
             temperature: float | None = None) -> str:
    """The text ``model`` continues ``prompt_ids`` with: greedy, or sampled at ``temperature``.

    Runs in eval mode without gradients and then puts each module's mode back as it was (during a run, frozen
    blocks sit in eval mode and active ones in train mode)."""
    config = model.config
    # Learned position embeddings (GPT-2's n_positions) end at the model's last position.
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is not None:
        if len(prompt_ids) >= limit:
            raise ConfigError(f"the prompt is {len(prompt_ids)} tokens; this model reads at most {limit}: shorten it")
        max_new_tokens = min(max_new_tokens, limit - len(prompt_ids))
    sampling = {"do_sample": True, "temperature": temperature} if temperature is not None else {"do_sample": False}
    input_ids = torch.tensor([prompt_ids], device=device)
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                # MEFT's reversible forward keeps no KV cache: every step reads the whole sequence.
                use_cache=getattr(config, "layerwise_meft", None) is None, **sampling,
            )
    finally:
        for module, training in modes:
            module.training = training
    return tokenizer.decode(out[0, len(prompt_ids):], skip_special_tokens=True)


def sample_completions(model, tokenizer, prompts: list[HeldOutPrompt], *, max_new_tokens: int,
                       device: torch.device) -> list[str]:
    """Greedy completions of ``prompts`` (a run's samples before or after training)."""
    return [complete(model, tokenizer, p.prompt, max_new_tokens=max_new_tokens, device=device) for p in prompts]


def sample_records(tokenizer, prompts: list[HeldOutPrompt], before: list[str] | None, after: list[str]) -> list[dict]:
    """summary.json's ``samples``: each prompt and reference as text, and the completions before and after training
    (``before`` None: a run resumed from a checkpoint that did not record them)."""
    before = before or [None] * len(prompts)
    return [
        {"prompt": tokenizer.decode(p.prompt, skip_special_tokens=True), "before": b, "after": a,
         "reference": tokenizer.decode(p.reference, skip_special_tokens=True)}
        for p, b, a in zip(prompts, before, after)
    ]


def one_line(text: str | None, limit: int = 160, keep_end: bool = False) -> str:
    """``text`` quoted on one line (line breaks escaped), cut to about ``limit`` characters; ``keep_end`` keeps
    its end (a prompt's end is what the completion follows)."""
    if text is not None and len(text) > limit:
        text = "..." + text[-limit:] if keep_end else text[:limit] + "..."
    return json.dumps(text, ensure_ascii=False)


def describe_samples(samples: list[dict]) -> list[str]:
    """Console lines for a run's samples."""
    lines = []
    for i, sample in enumerate(samples, 1):
        lines.append(f"sample {i}: prompt {one_line(sample['prompt'], keep_end=True)}")
        lines += [f"  {key:<9} {one_line(sample[key])}" for key in ("reference", "before", "after")]
    return lines


def load_for_generation(run_dir: str | None, spec: str | None):
    """(model, tokenizer) for ``layerwise generate``: the trained model of run folder ``run_dir``, or model ``spec``."""
    if run_dir is None and spec is None:
        raise ConfigError("generate needs a model: pass a run folder (layerwise generate RUN_DIR) or --model SPEC")
    if run_dir is not None and spec is not None:
        raise ConfigError(f"generate got two models, run folder '{run_dir}' and --model {spec}: pass one")
    if run_dir is not None:
        if not Path(run_dir).is_dir():
            raise ConfigError(f"run folder '{run_dir}' does not exist: pass the --output folder of `layerwise train`")
        folder = Path(run_dir) / "model"
        if not (folder / "config.json").is_file():
            raise ConfigError(f"run folder '{run_dir}' has no trained model (model/config.json): pass a finished run "
                              "that saved its model (train.save_model=true), or --model SPEC")
        spec = str(folder)
    path = resolve_model_path(spec)
    if default_task_for(path) != "causal_lm":
        raise ModelError(f"'{spec}' is a classification model: generate needs a causal LM (a decoder's run folder, "
                         "or --model smollm2)")
    if json.loads((Path(path) / "config.json").read_text()).get("layerwise_meft") is not None:
        return load_meft(path), load_tokenizer(path)
    model, tokenizer, _ = load_model_and_tokenizer(path, "causal_lm")
    return model, tokenizer


def encode_prompt(tokenizer, prompt: str, chat_template: bool = True) -> list[int]:
    """Token ids of ``prompt``: one user turn and the generation prompt, when ``chat_template`` is on and the tokenizer
    has a template; otherwise the text with the tokenizer's special tokens (as a run tokenizes a prompt)."""
    if not prompt.strip():
        raise ConfigError("--prompt is empty: pass the text to answer, e.g. --prompt 'What is the capital of France?'")
    if chat_template and getattr(tokenizer, "chat_template", None):
        chat = [{"role": "user", "content": prompt}]
        rendered = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(rendered["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def generate_text(run_dir: str | None, *, model: str | None, prompt: str, chat_template: bool = True,
                  max_new_tokens: int = 64, temperature: float | None = None, seed: int = 0,
                  device: str = "auto") -> str:
    """``layerwise generate``: the completion of ``prompt`` by the model of ``run_dir`` (or ``model``)."""
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {max_new_tokens} generates nothing: use 1 or more (default 64)")
    if temperature is not None and not temperature > 0:
        raise ConfigError(f"--temperature {temperature} must be above 0; leave it out for greedy decoding")
    loaded, tokenizer = load_for_generation(run_dir, model)
    ids = encode_prompt(tokenizer, prompt, chat_template)
    where = resolve_device(device)
    torch.manual_seed(seed)  # sampling (--temperature) repeats with the same seed
    return complete(loaded.to(where), tokenizer, ids, max_new_tokens=max_new_tokens, device=where,
                    temperature=temperature)
