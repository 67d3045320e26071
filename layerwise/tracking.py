"""Experiment trackers (``train.report_to``) through accelerate's tracker classes: TensorBoard, Trackio,
Weights & Biases, MLflow. Each gets the resolved config as hyperparameters, the metrics row of every
logged step, and the held-out results."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from accelerate.tracking import LOGGER_TYPE_TO_CLASS

from layerwise.errors import ConfigError

#: Tracker name -> the package it needs (what ``pip install`` takes).
TRACKERS = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb", "mlflow": "mlflow"}


def check_trackers(names: list[str]) -> None:
    """Refuse an unknown tracker, or one whose package is not installed, before anything runs."""
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"train.report_to: '{name}' is not a tracker: choose from {', '.join(TRACKERS)}")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ConfigError(f"train.report_to: {name} needs the {TRACKERS[name]} package: pip install {TRACKERS[name]}, "
                              f"or drop it from train.report_to")


def flat(tree: dict, prefix: str = "") -> dict:
    """A nested config as ``{"train.lr": 3e-4, ...}`` of the scalar types trackers accept (lists as text)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat(value, name + "."))
        else:
            out[name] = value if isinstance(value, (bool, int, float, str)) or value is None else str(value)
    return out


class Trackers:
    """The run's trackers: started with the config, fed metric rows, finished at the end."""

    def __init__(self, names: list[str], run_dir: Path, run_name: str, config: dict):
        check_trackers(names)
        self.trackers = []
        for name in names:
            cls = LOGGER_TYPE_TO_CLASS[name]
            if name == "tensorboard":
                tracker = cls(run_name, logging_dir=run_dir / "tensorboard")
            elif name == "mlflow":
                tracker = cls(experiment_name="layerwise", logging_dir=str(run_dir / "mlruns"), run_name=run_name)
            else:
                tracker = cls(run_name)
            tracker.start()
            tracker.store_init_configuration(flat(config))
            self.trackers.append(tracker)

    def log(self, values: dict, step: int) -> None:
        scalars = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for tracker in self.trackers:
            tracker.log(scalars, step=step)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
