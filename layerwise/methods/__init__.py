"""Registered methods. A new method is one file here plus one import line."""

from .base import Method, Plan
from .registry import METHODS, create_method, method_config, register
from . import full, freeze, ist, lift, lisa, lora, meft, salf  # noqa: F401  (registration)

__all__ = ["METHODS", "Method", "Plan", "create_method", "method_config", "register"]
