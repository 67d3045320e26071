"""Raw columns -> normalised columns and labels -> a seeded train/held-out split (:func:`load_splits`)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from layerwise.data.mapped_pages import release
from layerwise.data.settings import DataConfig
from layerwise.data.sources import PACKAGED_DATA, Part, boolq, chatterbot, read_source, rotten_tomatoes
from layerwise.errors import ConfigError, DataError
from layerwise.models import TASKS

# Split names that mark a held-out set in a saved DatasetDict, most preferred first. `validation`
# comes before `test` because public test splits are often unlabelled (label -1).
EVAL_SPLIT_NAMES = ("validation", "eval", "valid", "dev", "test")
# Packaged sets are used for reported accuracies: fewer held-out examples make them too noisy.
PACKAGED_MIN_EVAL = 1000


@dataclass
class Splits:
    """Train and held-out data in normalised columns (or, after :func:`tokenize_splits`, model inputs)."""

    train: Any  # datasets.Dataset
    eval: Any  # datasets.Dataset
    label_names: list[str] | None
    """Class names in id order (classification); None for causal_lm."""
    columns: tuple[str, ...]
    """Normalised text columns: ('text',), ('text', 'text_pair') or ('prompt', 'response')."""
    tokenized: bool = False
    dropped: dict[str, int] = field(default_factory=dict)
    """Examples dropped by tokenization per split (nothing left to train on after truncation)."""
    layout: Layout | None = None
    """Memory-mapped data (data.memory_map): train and eval hold the source's own columns, and ``layout`` normalises
    each batch as it is read (then :func:`tokenize_splits` tokenizes it); None: the columns are already normalised."""


def _texts(values: list) -> list[str]:
    # A missing text (None, an empty CSV cell) is an empty string; numbers in a text column are text.
    return ["" if v is None else v if isinstance(v, str) else str(v) for v in values]


def _label_key(value: Any, col: str, source: str) -> Any:
    """A raw label value as a hashable key: bool, int (also from integral floats) or str."""
    if value is None:
        raise DataError(f"'{source}' has an example without a value in label column '{col}': fill it or remove the example")
    if isinstance(value, bool) or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if math.isfinite(value) and value == int(value):
            return int(value)
        raise DataError(f"label {value!r} in column '{col}' of '{source}' is not a class (regression is not supported): use class names or ids 0..K-1")
    try:  # numpy scalars
        return _label_key(value.item(), col, source)
    except AttributeError:
        raise DataError(f"label {value!r} in column '{col}' of '{source}' is not a class name or id") from None


def _label_set(keys: set, cfg: DataConfig, source: str) -> tuple[dict[Any, int], list[str]]:
    """Map each distinct raw label key (see :func:`_label_key`) to an id 0..K-1; return (mapping, names in id order)."""
    col = cfg.label_column
    if cfg.labels is not None:
        names = [str(n) for n in cfg.labels]
        if len(set(names)) != len(names):
            raise DataError(f"data.labels {names} has duplicates: list each class once, in id order")
        if len(names) < 2:
            raise DataError(f"data.labels {names} has fewer than 2 classes: classification needs at least 2 labels")
        by_name = {n: i for i, n in enumerate(names)}
        mapping: dict[Any, int] = {}
        for k in keys:
            if str(k) in by_name:
                mapping[k] = by_name[str(k)]
            elif isinstance(k, int) and not isinstance(k, bool) and 0 <= k < len(names):
                mapping[k] = k  # an id into the given names
            else:
                raise DataError(
                    f"label '{k}' in column '{col}' of '{source}' is not in the label set data.labels {names}: "
                    f"add it to data.labels or fix the data"
                )
        return mapping, names
    kinds = {type(k) for k in keys}
    if len(kinds) > 1:
        raise DataError(f"labels in column '{col}' of '{source}' mix {' and '.join(sorted(t.__name__ for t in kinds))} values: use one kind, or set data.labels")
    values = sorted(keys)
    if len(values) < 2:
        raise DataError(
            f"column '{col}' of '{source}' has fewer than 2 classes ({', '.join(map(str, values)) or 'none'}): "
            f"classification needs at least 2 labels (is data.label_column the right column?)"
        )
    if int in kinds:
        bad = [v for v in values if not 0 <= v < len(values)]
        if bad:
            raise DataError(
                f"int label {bad[0]} in column '{col}' of '{source}' is outside 0..{len(values) - 1} ({len(values)} classes found): "
                f"relabel to ids 0..K-1 or name the classes with data.labels"
            )
    return {v: i for i, v in enumerate(values)}, [str(v) for v in values]


def _turns(value: Any, source: str) -> str:
    """One chat as JSON text (datasets keeps it as one string column): a list of {"role", "content"} turns."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = None
    ok = isinstance(value, list) and value and all(
        isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str) for t in value)
    if not ok or not any(t["role"] == "assistant" for t in value) or value[0]["role"] == "assistant":
        raise DataError(f"'{source}': a chat must be a list of {{\"role\": ..., \"content\": ...}} turns that starts with a "
                        f"user or system turn and has at least one assistant turn, got {str(value)[:80]!r}: fix that row "
                        f"or set data.messages_column")
    return json.dumps([{"role": t["role"], "content": t["content"]} for t in value])


@dataclass
class Layout:
    """Which source column feeds each normalised column, and in which form (``kind``)."""

    kind: str
    """classification, conversational (TRL's prompt/completion turns), messages, prompt_response or text."""
    sources: dict[str, str]
    """Normalised column -> source column."""
    labels: dict[Any, int] = field(default_factory=dict)
    """Raw label key -> class id (classification)."""

    @property
    def columns(self) -> tuple[str, ...]:
        return ("messages",) if self.kind == "conversational" else tuple(c for c in self.sources if c != "label")

    def convert(self, get: Callable[[str], list], source: str) -> dict[str, list]:
        """Normalised columns from ``get(source column)`` (whole columns, or one batch of rows)."""
        if self.kind == "conversational":
            pairs = zip(get(self.sources["prompt"]), get(self.sources["response"]))
            return {"messages": [_turns(list(p or []) + list(c or []), source) for p, c in pairs]}
        out = {}
        for name, col in self.sources.items():
            if name == "label":
                out[name] = [self.labels[_label_key(v, col, source)] for v in get(col)]
            elif name == "messages":
                out[name] = [_turns(v, source) for v in get(col)]
            else:
                out[name] = _texts(get(col))
        return out


def _layout(columns: list[str], first: Callable[[str], Any], cfg: DataConfig, task: str, source: str) -> Layout:
    """Pick the source columns for ``task`` from a part's ``columns`` (``first(col)``: that column's first value)."""
    def need(col: str, key: str, what: str) -> str:
        if col not in columns:
            raise DataError(
                f"column '{col}' not found in '{source}' (columns: {', '.join(columns) or 'none'}): "
                f"set data.{key} to the column that holds the {what}"
            )
        return col

    if task == "classification":
        sources = {"text": need(cfg.text_column, "text_column", "text")}
        pair_col = cfg.text_pair_column or ("text_pair" if "text_pair" in columns else None)
        if pair_col is not None:
            sources["text_pair"] = need(pair_col, "text_pair_column", "second text of each pair")
        sources["label"] = need(cfg.label_column, "label_column", "labels")
        return Layout("classification", sources)
    # causal_lm: prompt + response (loss on the response), or chat turns, or plain text.
    response_column = cfg.response_column
    if response_column == "response" and "response" not in columns and "completion" in columns:
        response_column = "completion"  # TRL's prompt/completion columns
    has_p, has_r = cfg.prompt_column in columns, response_column in columns
    pair = {"prompt": cfg.prompt_column, "response": response_column}
    if has_p and has_r and isinstance(first(cfg.prompt_column), list):
        return Layout("conversational", pair)  # TRL's conversational prompt/completion: lists of turns, one chat when joined
    if cfg.messages_column in columns and cfg.chat_template != "off" and not (has_p and has_r):
        return Layout("messages", {"messages": cfg.messages_column})
    if has_p and has_r:
        return Layout("prompt_response", pair)
    if cfg.text_column in columns:
        return Layout("text", {"text": cfg.text_column})
    if has_p or has_r:
        missing, key = (cfg.response_column, "response_column") if has_p else (cfg.prompt_column, "prompt_column")
        raise DataError(
            f"column '{missing}' not found in '{source}' (columns: {', '.join(columns)}): "
            f"causal_lm with prompts needs both; set data.{key}"
        )
    raise DataError(
        f"column '{cfg.text_column}' not found in '{source}' (columns: {', '.join(columns) or 'none'}): causal_lm needs a text "
        f"column (set data.text_column) or prompt and response columns (set data.prompt_column and data.response_column)"
    )


def _plan(parts: list[Part], cfg: DataConfig, task: str, source: str, first: Callable[[str], Any],
          distinct: Callable[[Part, str], Any]) -> tuple[Layout, list[str] | None]:
    """The layout of ``parts`` (``first(col)``: the first part's first value in ``col``) and, for classification,
    one label set for all parts (``distinct(part, col)``: the label values of a part), so an id means one class."""
    layout = _layout(parts[0].columns, first, cfg, task, source)
    for part in parts[1:]:
        missing = [c for c in layout.sources.values() if c not in part.columns]
        if missing:
            raise DataError(f"column '{missing[0]}' not found in the '{part.name}' split of '{source}': give every split the same columns")
    if task != "classification":
        return layout, None
    col = cfg.label_column
    class_names = parts[0].class_names.get(col)
    if cfg.labels is None and class_names:
        cfg = replace(cfg, labels=class_names)  # a ClassLabel column: its ints are ids into these names
    keys = {_label_key(v, col, source) for part in parts for v in distinct(part, col)}
    layout.labels, names = _label_set(keys, cfg, source)
    return layout, names


def _normalise(parts: list[Part], cfg: DataConfig, task: str, source: str) -> tuple[list[dict[str, list]], list[str] | None, Layout]:
    """Columns of every part mapped to the normalised names; labels mapped with one label set for all parts."""
    first = parts[0]
    layout, names = _plan(parts, cfg, task, source, lambda col: first.get(col)[0] if first.num_rows else None,
                          lambda part, col: part.get(col))
    return [layout.convert(part.get, source) for part in parts], names, layout


def _boolq_chat(question: str, passage: str, answer: int) -> str:
    return json.dumps([{"role": "user", "content": f"{passage}\n\nQuestion: {question}? Answer yes or no."},
                       {"role": "assistant", "content": "yes" if answer else "no"}])


def _packaged(cfg: DataConfig, task: str) -> tuple[Any, Any, list[str] | None, tuple[str, ...]]:
    import datasets

    name = cfg.source
    if name in ("boolq_chat", "chatterbot") and task != "causal_lm":
        raise DataError(f"packaged '{name}' is chat data for a causal LM, not {task}: use a decoder model, or 'boolq' / "
                        f"'rotten_tomatoes' for classification")
    if name == "chatterbot":
        full = datasets.Dataset.from_dict(chatterbot())
        train, eval_ = _split(full, cfg, name)
        return train, eval_, None, ("messages",)
    data, names = rotten_tomatoes() if name == "rotten_tomatoes" else boolq()
    if task == "classification" and cfg.labels is not None and [str(n) for n in cfg.labels] != names:
        raise DataError(f"packaged '{name}' has the label set {names}; remove data.labels (it applies to your own files)")
    full = datasets.Dataset.from_dict(data)
    # Split before the task mapping so classification, causal_lm and the chat form hold out the same examples.
    train, eval_ = _split(full, cfg, name, min_eval=PACKAGED_MIN_EVAL)

    def to_task(ds):
        if name == "rotten_tomatoes":
            if task == "classification":
                return ds, ("text",)
            return ds.remove_columns(["label"]), ("text",)
        if task == "classification":
            cols = {"text": ds["question"], "text_pair": ds["passage"], "label": ds["label"]}
            return datasets.Dataset.from_dict({k: list(v) for k, v in cols.items()}), ("text", "text_pair")
        if name == "boolq_chat":
            chats = [_boolq_chat(q, p, y) for q, p, y in zip(ds["question"], ds["passage"], ds["label"])]
            return datasets.Dataset.from_dict({"messages": chats}), ("messages",)
        prompts = [f"{p}\nQuestion: {q}?\nAnswer:" for q, p in zip(ds["question"], ds["passage"])]
        responses = [" yes" if y else " no" for y in ds["label"]]
        return datasets.Dataset.from_dict({"prompt": prompts, "response": responses}), ("prompt", "response")

    (train, columns), (eval_, _) = to_task(train), to_task(eval_)
    return train, eval_, (names if task == "classification" else None), columns


def _eval_count(eval_size: float | int, n: int, source: str) -> int:
    if isinstance(eval_size, bool) or not isinstance(eval_size, (int, float)) or eval_size <= 0:
        raise DataError(f"data.eval_size={eval_size!r} would make the eval split of '{source}' empty: use a fraction in (0, 1) or a count >= 1")
    count = int(round(eval_size * n)) if eval_size < 1 else int(eval_size)
    if count < 1:
        raise DataError(
            f"the eval split of '{source}' would be empty (data.eval_size={eval_size} of {n} examples): "
            f"raise data.eval_size or add examples"
        )
    return count


def _split(ds, cfg: DataConfig, source: str, min_eval: int = 0):
    n = ds.num_rows
    count = max(min_eval, _eval_count(cfg.eval_size, n, source))
    if count >= n:
        raise DataError(
            f"data.eval_size={cfg.eval_size} holds out {count} of the {n} examples of '{source}', leaving none to train on: "
            f"lower data.eval_size or add examples"
        )
    # train_test_split's own seeded permutation, with the indices in memory: a cached index file could outlive a change
    # to the data (and train_test_split writes one for a memory-mapped dataset even when told to keep them in memory).
    permutation = np.random.default_rng(cfg.seed).permutation(n)
    if ds.cache_files:
        return Rows(ds, permutation[count:]), Rows(ds, permutation[:count])
    return ds.select(permutation[count:], keep_in_memory=True), ds.select(permutation[:count], keep_in_memory=True)


class Rows:
    """The rows ``order`` of a memory-mapped dataset, in that order. ``Dataset.select`` would build its index table
    through a Python list (~40 bytes a row at its peak: 116 MiB for 2.9 M rows); this keeps one numpy array (8)."""

    def __init__(self, ds, order: np.ndarray):
        self.ds, self.order = ds, order

    def __len__(self) -> int:
        return len(self.order)

    @property
    def num_rows(self) -> int:
        return len(self.order)

    @property
    def column_names(self) -> list[str]:
        return self.ds.column_names

    @property
    def cache_files(self) -> list[dict]:
        return self.ds.cache_files

    def __getitem__(self, i: int) -> dict:
        return self.ds[int(self.order[i])]

    def __getitems__(self, index: list[int]) -> list[dict]:
        return self.ds.__getitems__(self.order[index].tolist())

    def __iter__(self) -> Iterator[dict]:
        return (self[i] for i in range(len(self)))

    def select(self, index) -> Rows:
        return Rows(self.ds, self.order[np.asarray(index, dtype=np.int64)])

    def with_transform(self, transform: Callable[[dict], dict]) -> Rows:
        return Rows(self.ds.with_transform(transform), self.order)


def _pick_parts(parts: list[Part], source: str) -> tuple[Part, Part | None]:
    if len(parts) == 1:
        return parts[0], None
    by_name = {p.name.lower(): p for p in parts}
    eval_part = next((by_name[n] for n in EVAL_SPLIT_NAMES if n in by_name), None)
    rest = [p for p in parts if p is not eval_part]
    train = by_name.get("train") or (rest[0] if len(rest) == 1 else None)
    if train is None or train is eval_part:
        raise DataError(
            f"'{source}' has splits {', '.join(p.name for p in parts)}: name the training split 'train' "
            f"(and the held-out one {' or '.join(EVAL_SPLIT_NAMES)})"
        )
    return train, eval_part


def _mapped(parts: list[Part], cfg: DataConfig, task: str, source: str) -> tuple[list, list[str] | None, Layout]:
    """Memory-mapped parts as they are, with the layout that normalises their rows when read; the first rows checked now."""
    first = parts[0].mapped
    # Distinct labels from Arrow (no Python list of every row).
    layout, names = _plan(parts, cfg, task, source, lambda col: first[0][col] if first.num_rows else None,
                          lambda part, col: part.mapped.unique(col))
    dss = [part.mapped.select_columns(list(dict.fromkeys(layout.sources.values()))) for part in parts]
    for ds in dss:
        layout.convert(ds[: min(ds.num_rows, 1000)].__getitem__, source)  # bad rows fail here, not mid-run
    release(*dss)
    return dss, names, layout


def load_splits(cfg: DataConfig, task: str) -> Splits:
    """Read ``cfg.source`` and return normalised train/eval datasets for ``task``.

    Classification gives columns ``text`` (+ ``text_pair``) and ``label`` (int id into
    ``label_names``); causal_lm gives ``text`` or ``prompt`` + ``response``. A source split named
    validation/eval/valid/dev/test is the eval set; otherwise ``cfg.eval_size`` examples are held
    out with a split seeded by ``cfg.seed`` (identical every run). ``max_*_samples`` keep the first
    N examples of each split afterwards. Raises DataError for any problem with the data.
    """
    import datasets

    if task not in TASKS:
        raise ConfigError(f"task '{task}' is not one of {', '.join(TASKS)}: set task to one of them")
    source = str(cfg.source)
    layout = None
    if source in PACKAGED_DATA and not Path(source).exists():
        train, eval_, label_names, columns = _packaged(cfg, task)
    else:
        parts = read_source(source, cfg.memory_map)
        train_part, eval_part = _pick_parts(parts, source)
        if train_part.num_rows == 0:
            raise DataError(f"the training split of '{source}' is empty (0 rows): add examples")
        chosen = [train_part] + ([eval_part] if eval_part is not None else [])
        if train_part.mapped is not None:
            dss, label_names, layout = _mapped(chosen, cfg, task, source)
            columns = layout.columns
        else:
            normalised, label_names, layout_ = _normalise(chosen, cfg, task, source)
            columns = layout_.columns
            features = {c: datasets.Value("string") for c in columns}
            if task == "classification":
                features["label"] = datasets.Value("int64")
            dss = [datasets.Dataset.from_dict(cols, features=datasets.Features(features)) for cols in normalised]
        if eval_part is None:
            train, eval_ = _split(dss[0], cfg, source)
        else:
            train, eval_ = dss
    if cfg.max_train_samples is not None:
        train = train.select(range(min(max(cfg.max_train_samples, 0), train.num_rows)))
    if cfg.max_eval_samples is not None:
        eval_ = eval_.select(range(min(max(cfg.max_eval_samples, 0), eval_.num_rows)))
    if eval_.num_rows == 0:
        raise DataError(f"the eval split of '{source}' is empty: add held-out examples, raise data.eval_size or data.max_eval_samples")
    if train.num_rows == 0:
        raise DataError(f"the training split of '{source}' is empty: raise data.max_train_samples or add examples")
    return Splits(train=train, eval=eval_, label_names=label_names, columns=columns, layout=layout)
