"""Registered methods: each module (or package) in this folder registers its own method when imported.

A new method is one file here; the command line also imports the modules named in ``LAYERWISE_PLUGINS``
(:func:`layerwise.methods.registry.load_plugins`), for methods kept in other packages.
"""

import importlib
import pkgutil

from layerwise.methods.base import Method, Plan, RunContext, default_lr
from layerwise.methods.registry import METHODS, create_method, load_plugins, method_config, names_where, register, setup

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "Method", "Plan", "RunContext", "create_method", "default_lr", "load_plugins", "method_config", "names_where", "register",
           "setup"]
