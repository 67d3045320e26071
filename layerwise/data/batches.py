"""Tokenized examples -> padded batches with a reproducible shuffle (:func:`make_loader`)."""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from layerwise.data.settings import DataConfig
from layerwise.errors import ConfigError


class SeededSampler(torch.utils.data.Sampler[int]):
    """Indices 0..n-1, shuffled by a torch.Generator seeded with ``seed`` (the same order every time).

    Resumable: ``state_dict()`` records how many indices were handed out; ``load_state_dict()``
    makes the next iteration skip them (same seed, same order).
    """

    def __init__(self, n: int, shuffle: bool, seed: int):
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.position = 0
        self._start = 0

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.seed)
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[int]:
        start, self._start = self._start, 0
        self.position = start
        # A tensor, read a slice at a time: a list of millions of Python ints would cost ~36 bytes each.
        order = self._order()
        for lo in range(start, self.n, 4096):
            for i in order[lo : lo + 4096].tolist():
                self.position += 1
                yield i

    def __len__(self) -> int:
        return self.n

    def state_dict(self) -> dict:
        return {"seed": self.seed, "shuffle": self.shuffle, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.shuffle = state["seed"], state["shuffle"]
        self._start = self.position = int(state["position"])


def _pad_id(tokenizer) -> int:
    for tid in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if tid is not None:
            return int(tid)
    return 0


def make_collate(tokenizer, cfg: DataConfig) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """Pad a list of tokenized examples into tensors (right padding).

    ``input_ids`` with the tokenizer's pad id (EOS when it has none), ``attention_mask`` and
    ``token_type_ids`` with 0, token ``labels`` with -100; class ``labels`` become a 1-D tensor.
    Width: the longest example, or ``cfg.max_length`` when ``cfg.padding == 'max_length'``.
    """
    pad_id = _pad_id(tokenizer)
    fill = {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": 0, "labels": -100}

    def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(e["input_ids"]) for e in examples)
        width = max(longest, cfg.max_length) if cfg.padding == "max_length" else longest
        batch: dict[str, torch.Tensor] = {}
        for key in examples[0]:
            values = [e[key] for e in examples]
            if not isinstance(values[0], (list, tuple)):
                batch[key] = torch.tensor(values, dtype=torch.long)
                continue
            t = torch.full((len(values), width), fill.get(key, 0), dtype=torch.long)
            for row, v in enumerate(values):
                if v:
                    t[row, : len(v)] = torch.tensor(v, dtype=torch.long)
            batch[key] = t
        return batch

    return collate


class _Indexed(torch.utils.data.Dataset):
    """A tokenized dataset whose examples also carry their index (``example_index``), so a batch maps to its rows."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        return {**self.ds[i], "example_index": int(i)}

    def __getitems__(self, index: list[int]) -> list[dict]:
        rows = self.ds.__getitems__(index) if hasattr(self.ds, "__getitems__") else [self.ds[i] for i in index]
        return [{**row, "example_index": int(i)} for row, i in zip(rows, index)]


def make_loader(ds, tokenizer, cfg: DataConfig, batch_size: int, shuffle: bool, seed: int, with_index: bool = False) -> torch.utils.data.DataLoader:
    """Batches of ``batch_size`` examples from a tokenized dataset, padded by :func:`make_collate`.

    The shuffle order depends only on ``seed`` (a seeded torch.Generator), so a run is reproducible;
    the sampler (``loader.sampler``) is a :class:`SeededSampler` whose state can be saved and restored.
    ``with_index``: every batch also holds ``example_index`` (the rows' positions in ``ds``; the
    frozen-prefix cache reads by it).
    """
    if batch_size < 1:
        raise ConfigError(f"batch size {batch_size} must be at least 1")
    sampler = SeededSampler(len(ds), shuffle=shuffle, seed=seed)
    if with_index:
        ds = _Indexed(ds)
    # num_workers=0: the collate is cheap and worker processes would copy the dataset and tokenizer.
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=make_collate(tokenizer, cfg), num_workers=0)
