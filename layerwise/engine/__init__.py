from .meter import PeakMemory, SavedTensorMeter
from .optim import ActiveOptimizer
from .trainer import Trainer, evaluate, resolve_device

__all__ = ["ActiveOptimizer", "PeakMemory", "SavedTensorMeter", "Trainer", "evaluate", "resolve_device"]
