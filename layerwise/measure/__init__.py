"""Measurement, apart from the training path: ``bench``, the suite and its report, the cost model,
memory prediction (``plan``) and profiling. Nothing under ``layerwise/`` outside this folder imports it."""
