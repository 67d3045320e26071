from layerwise.engine.meter import PeakMemory, SavedTensorMeter
from layerwise.engine.optim import ActiveOptimizer
from layerwise.engine.trainer import Trainer, evaluate, resolve_device

__all__ = ["ActiveOptimizer", "PeakMemory", "SavedTensorMeter", "Trainer", "evaluate", "resolve_device"]
