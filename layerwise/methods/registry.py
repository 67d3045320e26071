"""Method registry: name -> Method class with a typed config, and :func:`setup`, the one way a method meets a model."""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable

from torch import nn

from layerwise.anatomy import find_anatomy
from layerwise.errors import ConfigError
from layerwise.methods.base import Method, RunContext
from layerwise.schema import build

METHODS: dict[str, type[Method]] = {}
#: Comma-separated modules imported when the registry loads, each registering its methods (like PYTEST_PLUGINS).
PLUGINS_ENV = "LAYERWISE_PLUGINS"


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def load_plugins() -> None:
    """Import the modules named in ``LAYERWISE_PLUGINS`` (methods defined outside this package). The command
    line calls it once everything is imported, so a plugin may import any part of layerwise."""
    for name in filter(None, (n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"{PLUGINS_ENV}: cannot import '{name}' ({exc}): fix the module name or PYTHONPATH") from None


def names_where(has: Callable[[type[Method]], bool]) -> list[str]:
    """The registered methods that ``has`` a declared ability, the ``full`` baseline first."""
    return sorted((name for name, cls in METHODS.items() if has(cls)), key=lambda n: (n != "full", n))


def method_config(raw: dict) -> Any:
    """Typed config for ``raw['name']``; unknown names and keys raise ConfigError."""
    name = raw.get("name")
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}': choose one of {', '.join(sorted(METHODS))} (--method NAME)")
    return build(METHODS[name].Config, raw, "method")


def create_method(config: Any, anatomy, *, task: str, seed: int = 0, max_steps: int = 0) -> Method:
    return METHODS[config.name](config, anatomy, task=task, seed=seed, max_steps=max_steps)


def setup(config: Any, model: nn.Module, *, task: str, blocks: str | None = None, seed: int = 0, max_steps: int = 0,
          context: RunContext | None = None, anatomy=None) -> tuple[Method, nn.Module]:
    """Create the method for ``config``, give it ``context``, let it prepare ``model``, and return both.

    ``anatomy`` is found from ``model`` unless given. A method that wraps the model (adapters) gets
    its anatomy found again on the wrapped model, so the new modules are in its groups.
    """
    method = create_method(config, anatomy or find_anatomy(model, blocks), task=task, seed=seed, max_steps=max_steps)
    method.context = context
    prepared = method.prepare(model)
    if prepared is not model:
        method.anatomy = find_anatomy(prepared, blocks)
    return method, prepared
