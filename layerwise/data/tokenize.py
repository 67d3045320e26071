"""Normalised text -> ``input_ids``/``attention_mask``/``labels``, truncated to ``max_length``, not padded."""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import replace
from typing import Callable, Iterator

from layerwise.data.mapped_pages import cache_files, release_files
from layerwise.data.settings import DataConfig
from layerwise.data.splits import Splits
from layerwise.errors import ConfigError, DataError
from layerwise.models import TASKS

#: How a chat template marks the assistant text it can report as a mask (transformers' own test).
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No 'Map: 100%' bars for in-memory maps that take a second."""
    from datasets.utils import logging as dlog

    was_enabled = dlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            dlog.enable_progress_bar()


@contextlib.contextmanager
def _truncation_side(tokenizer, side: str) -> Iterator[None]:
    before = getattr(tokenizer, "truncation_side", None)
    if before is None:
        yield
        return
    tokenizer.truncation_side = side
    try:
        yield
    finally:
        tokenizer.truncation_side = before


def _has_label(labels: list[int]) -> bool:
    # Position 0 is never predicted (the loss shifts by one), so a label must sit at index >= 1.
    return any(t != -100 for t in labels[1:])


def _fit_prompt(prompt: list[int], response: list[int], max_length: int, special: set[int]) -> tuple[list[int], list[int]]:
    """Trim prompt (from the left) and response (from the right) to max_length tokens together.

    The end of the prompt sits next to the response (the question, 'Answer:'), so the prompt loses
    its beginning; a leading special token (BOS/CLS) is kept. The prompt keeps at least half the
    budget when it needs it, so a long response is cut rather than left without context.
    """
    if len(prompt) + len(response) <= max_length:
        return prompt, response
    keep = max(max_length - len(response), min(len(prompt), max_length // 2))
    head = prompt[:1] if prompt and prompt[0] in special and keep >= 1 else []
    body = prompt[len(head):]
    tail = max(keep - len(head), 0)
    prompt = head + (body[len(body) - tail :] if tail else [])
    return prompt, response[: max_length - len(prompt)]


def _template(tokenizer, chat: list[dict], **kw) -> list[int]:
    return list(tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True, **kw)["input_ids"])


def chat_tokens(tokenizer, chat: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of ``chat`` rendered with the tokenizer's chat template, and labels that are the ids on the
    assistant turns and -100 elsewhere. A template that marks its assistant text (``{% generation %}``)
    gives the mask itself; otherwise each assistant turn is the span between the chat up to it (with the
    generation prompt) and the chat through it."""
    if GENERATION_TAG.search(tokenizer.chat_template or ""):
        enc = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids = list(enc["input_ids"])
        return ids, [t if m else -100 for t, m in zip(ids, enc["assistant_masks"])]
    ids = _template(tokenizer, chat)
    labels = [-100] * len(ids)
    for i, turn in enumerate(chat):
        if turn["role"] != "assistant":
            continue
        start = len(_template(tokenizer, chat[:i], add_generation_prompt=True)) if i else 0
        end = len(_template(tokenizer, chat[: i + 1]))
        if ids[:end] != _template(tokenizer, chat[: i + 1]):
            raise DataError("this chat template renders a conversation differently from its beginning, so the assistant "
                            "turns cannot be found: use a template with {% generation %} marks")
        labels[start:end] = ids[start:end]
    return ids, labels


def encoder(columns: tuple[str, ...], tokenizer, cfg: DataConfig, task: str, *, keep_empty: bool = False) -> Callable[[dict], dict]:
    """The function from a batch of normalised columns to model inputs (``input_ids``, ``attention_mask``, ``labels``).

    ``keep_empty``: an example with no token left to predict stays (its labels all -100) instead of being dropped, so
    a batch read lazily keeps its size.
    """
    L = cfg.max_length
    eos = tokenizer.eos_token_id
    special = set(getattr(tokenizer, "all_special_ids", []) or [])

    if task == "classification":

        def fn(batch: dict) -> dict:
            pair = batch["text_pair"] if "text_pair" in batch else None
            enc = tokenizer(batch["text"], pair, truncation=True, max_length=L)
            out = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
            out["labels"] = batch["label"]
            keep = [i for i, ids in enumerate(out["input_ids"]) if len(ids) > 0 or keep_empty]
            if len(keep) < len(out["input_ids"]):
                out = {k: [v[i] for i in keep] for k, v in out.items()}
            return out

    elif "messages" in columns or ("prompt" in columns and cfg.chat_template == "on"):
        if not getattr(tokenizer, "chat_template", None):
            what = "the data are chats (messages)" if "messages" in columns else "data.chat_template=on"
            raise DataError(f"{what}, but this model's tokenizer has no chat template: use a chat model"
                            + (", or prompt/response columns" if "messages" in columns else ", or data.chat_template=auto"))

        def fn(batch: dict) -> dict:
            chats = ([json.loads(m) for m in batch["messages"]] if "messages" in batch else
                     [[{"role": "user", "content": p}, {"role": "assistant", "content": r}]
                      for p, r in zip(batch["prompt"], batch["response"])])
            out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
            for chat in chats:
                ids, labels = chat_tokens(tokenizer, chat)
                ids, labels = ids[:L], labels[:L]
                if not _has_label(labels) and not keep_empty:
                    continue
                out["input_ids"].append(ids)
                out["attention_mask"].append([1] * len(ids))
                out["labels"].append(labels)
            return out

    elif "prompt" in columns:

        def fn(batch: dict) -> dict:
            tail = [eos] if eos is not None else []
            # Prompt with special tokens (BOS), response without, so the boundary is exact. The
            # tokenizer already cuts long prompts from the left (see _fit_prompt for why).
            with _truncation_side(tokenizer, "left"):
                prompts = tokenizer(batch["prompt"], add_special_tokens=True, truncation=True, max_length=L)["input_ids"]
            responses = tokenizer(batch["response"], add_special_tokens=False)["input_ids"]
            out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
            for p, r in zip(prompts, responses):
                p, r = _fit_prompt(p, r + tail, L, special)
                labels = [-100] * len(p) + r
                if not _has_label(labels) and not keep_empty:
                    continue
                out["input_ids"].append(p + r)
                out["attention_mask"].append([1] * (len(p) + len(r)))
                out["labels"].append(labels)
            return out

    else:

        def fn(batch: dict) -> dict:
            # One token more than fits shows whether the text was cut: only an uncut text gets EOS.
            enc = tokenizer(batch["text"], add_special_tokens=True, truncation=True, max_length=L + 1)["input_ids"]
            out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
            for ids in enc:
                ids = ids + [eos] if eos is not None and len(ids) < L and (not ids or ids[-1] != eos) else ids[:L]
                if len(ids) < 2 and not keep_empty:
                    continue
                out["input_ids"].append(ids)
                out["attention_mask"].append([1] * len(ids))
                out["labels"].append(list(ids) if len(ids) >= 2 else [-100] * len(ids))
            return out

    return fn


def tokenize_splits(splits: Splits, tokenizer, cfg: DataConfig, task: str) -> Splits:
    """Tokenize both splits: ``input_ids``, ``attention_mask`` (+ ``token_type_ids``), ``labels``.

    Truncated to ``cfg.max_length`` tokens, not padded. Classification: ``labels`` is the class id.
    causal_lm: ``labels`` equals ``input_ids`` with -100 on prompt tokens (the loss is on the
    response only), and EOS is appended to each text/response when the tokenizer has one and it
    fits. Examples left with no token to predict are dropped (counted in ``Splits.dropped``).
    Memory-mapped splits (``splits.layout``) are tokenized as their rows are read instead, and keep such examples
    (they add nothing to the loss).
    """
    if splits.tokenized:
        return splits
    if task not in TASKS:
        raise ConfigError(f"task '{task}' is not one of {', '.join(TASKS)}: set task to one of them")
    if task == "classification" and "label" not in (splits.layout.sources if splits.layout else splits.train.column_names):
        raise DataError("classification data has no 'label' column: load it with task classification")
    L = cfg.max_length
    layout = splits.layout
    if layout is not None:
        encode = encoder(splits.columns, tokenizer, cfg, task, keep_empty=True)
        source = str(cfg.source)
        files = cache_files(splits.train, splits.eval)

        def read(batch) -> dict:
            encoded = encode(layout.convert(batch.__getitem__, source))
            release_files(files)  # the rows are copied out: their pages need not stay resident
            return encoded

        train, eval_ = splits.train.with_transform(read), splits.eval.with_transform(read)
        return replace(splits, train=train, eval=eval_, columns=tuple(train[0]), tokenized=True, dropped={"train": 0, "eval": 0})
    fn = encoder(splits.columns, tokenizer, cfg, task)

    def run(ds):
        with _quiet_datasets():
            mapped = ds.map(fn, batched=True, batch_size=1000, remove_columns=ds.column_names, keep_in_memory=True, load_from_cache_file=False)
        return mapped, ds.num_rows - mapped.num_rows

    train, dropped_train = run(splits.train)
    eval_, dropped_eval = run(splits.eval)
    for ds, name in ((train, "training"), (eval_, "eval")):
        if ds.num_rows == 0:
            raise DataError(
                f"no {name} example has a token left to predict after truncation to data.max_length={L}: "
                f"raise data.max_length or shorten the prompts"
            )
    return replace(
        splits,
        train=train,
        eval=eval_,
        columns=tuple(train.column_names),
        tokenized=True,
        dropped={"train": dropped_train, "eval": dropped_eval},
    )
