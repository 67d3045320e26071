"""Measurement, apart from the training path: ``bench``, the suite and its report, the cost model,
memory prediction (``plan``) and profiling. Only the command line (``cli.py``) imports it: the training path never does."""
