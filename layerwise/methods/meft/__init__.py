"""MEFT: reversible adapters (:mod:`.reversible`, the autograd function) wrapped as a method (:mod:`.method`)."""

from layerwise.methods.meft.method import load_meft

__all__ = ["load_meft"]
