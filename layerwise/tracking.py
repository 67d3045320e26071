"""Experiment trackers (``train.report_to``) through accelerate's tracker classes: TensorBoard, Trackio,
Weights & Biases, MLflow. Each gets the resolved config as hyperparameters, the metrics row of every
logged step, and the held-out results."""

from __future__ import annotations

import importlib.util
import os
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


def _start(name: str, run_dir: Path, run_name: str, hparams: dict):
    cls = LOGGER_TYPE_TO_CLASS.get(name)
    if cls is None:
        raise ImportError(f"this accelerate has no {name} tracker: upgrade accelerate")
    if name == "tensorboard":
        tracker = cls(run_name, logging_dir=run_dir / "tensorboard")
    elif name == "mlflow":
        tracker = cls(experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", "layerwise"), run_name=run_name)
    else:  # wandb, trackio: one project for layerwise runs (or the user's), the run named after its folder
        project = os.environ.get("WANDB_PROJECT" if name == "wandb" else "TRACKIO_PROJECT", "layerwise")
        tracker = cls(project, name=run_name)
    tracker.start()
    tracker.store_init_configuration(hparams)
    return tracker


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
    """The run's trackers: started with the config, fed metric rows, finished at the end. A tracker that cannot
    start (not logged in, an accelerate without it) is a ConfigError, with the ones already started finished."""

    def __init__(self, names: list[str], run_dir: Path, run_name: str, config: dict):
        check_trackers(names)
        self.trackers = []
        for name in names:
            try:
                self.trackers.append(_start(name, run_dir, run_name, flat(config)))
            except Exception as exc:  # each tracker library raises its own kinds
                self.finish()
                raise ConfigError(f"train.report_to: {name} could not start ({type(exc).__name__}: "
                                  f"{' '.join(str(exc).split())[:200]}): fix its setup or drop it from train.report_to") from None

    def log(self, values: dict, step: int) -> None:
        scalars = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for tracker in self.trackers:
            tracker.log(scalars, step=step)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
