"""SALF: a latent probe picks the cut below which blocks freeze (:mod:`.probe`), then train above it (:mod:`.method`)."""

from layerwise.methods.salf import method  # noqa: F401  (registration)
