"""The ``data:`` section of a run config: where the data comes from and how it becomes batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from layerwise.errors import ConfigError


@dataclass
class DataConfig:
    """Where the data comes from and how it becomes batches (the ``data:`` section of a run config)."""

    source: str = "rotten_tomatoes"
    """Packaged short name ('rotten_tomatoes', 'boolq', 'boolq_chat', 'chatterbot'), a local .jsonl/.json/.csv/.parquet file,
    a save_to_disk folder, or a hub dataset id (org/name, through the Hugging Face cache)."""
    text_column: str = "text"
    text_pair_column: str | None = None
    """Second text of a pair (classification); None: use 'text_pair' when the data has it."""
    label_column: str = "label"
    prompt_column: str = "prompt"
    response_column: str = "response"
    """causal_lm: the response to the prompt (loss on it only); TRL's name ``completion`` is read when there is no ``response``."""
    messages_column: str = "messages"
    """causal_lm chat data: a list of ``{"role", "content"}`` turns per row, rendered with the tokenizer's chat template;
    the loss covers the assistant turns only."""
    chat_template: Literal["auto", "on", "off"] = "auto"
    """auto: chat data (messages) through the tokenizer's chat template, prompt/response as plain text; on: prompt/response
    too, as one user and one assistant turn; off: no template (the messages column is not read)."""
    memory_map: Literal["auto", "on", "off"] = "auto"
    """on: read local files through ``datasets.load_dataset`` (converted once to Arrow in the datasets cache and
    memory-mapped, so a multi-GB file trains in bounded memory) and tokenize each batch as it is read; off: read the file
    into memory and tokenize it up front; auto: memory-map files over 256 MiB. Hub dataset ids are always memory-mapped."""
    labels: list[str] | None = None
    """The label set in id order; None: the sorted unique values (int labels must then be 0..K-1)."""
    eval_size: float | int = 0.1
    """Held-out examples when the source has no eval split: a fraction (< 1) or a count."""
    seed: int = 0
    """Seed of the held-out split (the same split every run with the same seed)."""
    max_length: int = 128
    """Tokens per example after truncation."""
    padding: Literal["longest", "max_length"] = "longest"
    """'longest': pad each batch to its longest example; 'max_length': pad every batch to max_length (fixed shapes)."""
    max_train_samples: int | None = None
    """Keep the first N training examples (after the split)."""
    max_eval_samples: int | None = None
    """Keep the first N held-out examples (after the split)."""

    def validate(self) -> None:
        """Reject values no run can use (called by the config builder)."""
        if self.max_length < 2:
            raise ConfigError(f"config key 'data.max_length': {self.max_length} is too small; use at least 2 tokens")
        for key in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"config key 'data.{key}': {value} keeps no examples; use a positive count or null for all")
        if not (0 < self.eval_size < float("inf")):
            raise ConfigError(f"config key 'data.eval_size': {self.eval_size} makes an empty eval split; use a fraction in (0, 1) or a count >= 1")
