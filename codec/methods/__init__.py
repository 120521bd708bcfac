"""Codec methods: one small class per method, registered by name (like numcodecs).

The registry lives here, above the method modules: each module builds on
``base`` alone and none imports this package back.  ``get_method(name, ...)``
builds a method from the common arguments and its own options.
"""

from __future__ import annotations

from ..errors import UsageError
from .base import BudgetedMethod, Lossless, Method, Selection, parse_ratio
from .baselines import BitDelta, Dare, LowRank
from .deltacome import DeltaCoMe
from .impart import ImPart, ImPartQt

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Add a method class under its ``name`` (also for methods defined outside dcm)."""
    METHODS[cls.name] = cls
    return cls


for _cls in (Lossless, DeltaCoMe, ImPart, ImPartQt, LowRank, Dare, BitDelta):
    register(_cls)


def get_method(name: str, options: dict | None = None, **kwargs) -> Method:
    """The method ``name`` built with the common arguments and its own ``options``."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise UsageError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}") from None
    try:
        return cls(**kwargs, **(options or {}))
    except TypeError as e:  # an option the method does not take
        raise UsageError(f"method {name!r}: {e}") from None


__all__ = ["METHODS", "Method", "BudgetedMethod", "Lossless", "Selection", "get_method", "parse_ratio",
           "register"]
