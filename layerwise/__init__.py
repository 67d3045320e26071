"""layerwise: layer-selective fine-tuning that saves real time and memory."""

__version__ = "0.1.0"
