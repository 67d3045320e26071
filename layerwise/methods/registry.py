"""Method registry: name -> Method class with a typed config."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError

METHODS: dict[str, type] = {}


def register(cls: type) -> type:
    METHODS[cls.name] = cls
    return cls


def method_config(raw: dict) -> Any:
    """Typed config for ``raw['name']``; unknown names and keys raise ConfigError."""
    from ..config import build

    name = raw.get("name")
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}': choose one of {', '.join(sorted(METHODS))} (--method NAME)")
    return build(METHODS[name].Config, raw, "method")


def create_method(config: Any, anatomy, *, task: str, seed: int = 0, max_steps: int = 0):
    method = METHODS[config.name](config, anatomy, seed=seed, max_steps=max_steps)
    method.task = task
    return method
