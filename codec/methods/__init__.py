"""Codec methods: one small class per method, registered by name (like numcodecs).

The registry lives here, above the method modules: each module builds on
``base`` alone and none imports this package back.  ``get_method(name, ...)``
builds a method from the common arguments and its own options.
"""

from __future__ import annotations

import inspect

from ..errors import UsageError
from .base import BudgetedMethod, Lossless, Method, Selection, parse_ratio, str_list
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
    if options is not None and not isinstance(options, dict):
        raise UsageError(f"options must be a dict of the method's own options, got {type(options).__name__}")
    for option in options or {}:
        if option not in accepted_options(cls):
            raise UsageError(option_error(option, name))
    try:
        return cls(**kwargs, **(options or {}))
    except (TypeError, ValueError) as e:  # an option of the wrong type, e.g. widths=None
        raise UsageError(f"method {name!r}: {e}") from e


def accepted_options(cls: type[Method]) -> set[str]:
    """The keyword arguments a method class takes."""
    return {p.name for p in inspect.signature(cls).parameters.values()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def option_error(option: str, method: str) -> str:
    """'--recipe applies to delta-come and impart-qt, not lossless' (the CLI's words)."""
    flag = "--" + option.replace("_", "-")
    takers = [n for n, c in METHODS.items() if option in accepted_options(c)]
    if not takers:
        return f"{flag} is not an option of any method"
    listed = takers[0] if len(takers) == 1 else ", ".join(takers[:-1]) + " and " + takers[-1]
    return f"{flag} applies to {listed}, not {method}"


__all__ = ["METHODS", "Method", "BudgetedMethod", "Lossless", "Selection", "accepted_options", "get_method",
           "option_error", "parse_ratio", "register", "str_list"]
