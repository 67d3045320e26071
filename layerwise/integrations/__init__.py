"""Glue for other training loops: :mod:`layerwise.integrations.hf` (transformers.Trainer, TRL)."""
