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

from layerwise.data.batches import make_collate, make_loader
from layerwise.data.settings import DataConfig
from layerwise.data.sources import PACKAGED_DATA
from layerwise.data.splits import Splits, load_splits
from layerwise.data.tokenize import tokenize_splits

__all__ = ["PACKAGED_DATA", "DataConfig", "Splits", "load_splits", "make_collate", "make_loader", "tokenize_splits"]
