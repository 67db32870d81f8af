"""The benchmark registry: entries register with ``@benchmark(name, help=...)``.

An entry is a function ``fn(quick: bool) -> dict`` returning::

    {"config": {...}, "figures": {"name": {"value": float, "unit": str}}, "notes": str}

``quick=True`` asks for a short run (smaller sizes, fewer repeats) that still exercises the same code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

EntryFn = Callable[[bool], dict[str, Any]]


@dataclass(frozen=True)
class Benchmark:
    """One registered entry."""

    name: str
    fn: EntryFn
    help: str


REGISTRY: dict[str, Benchmark] = {}


def benchmark(name: str, *, help: str) -> Callable[[EntryFn], EntryFn]:
    """Registers ``fn(quick: bool) -> result dict`` under ``name``; returns ``fn`` unchanged.

    Re-registering a name is an error unless it is the same function (a module imported twice), so two
    files cannot silently shadow each other's entries.
    """

    def register(fn: EntryFn) -> EntryFn:
        existing = REGISTRY.get(name)
        same_fn = existing is not None and (existing.fn.__module__, existing.fn.__qualname__) == (
            fn.__module__,
            fn.__qualname__,
        )
        if existing is not None and not same_fn:
            raise ValueError(f"benchmark {name!r} is already registered by {existing.fn.__module__}")
        REGISTRY[name] = Benchmark(name=name, fn=fn, help=help)
        return fn

    return register


def unregister(name: str) -> None:
    """Removes an entry (tests register temporary entries and clean up after themselves)."""
    REGISTRY.pop(name, None)


def figure(value: float, unit: str) -> dict[str, Any]:
    """Builds one figure, ``{"value": float, "unit": str}``."""
    return {"value": float(value), "unit": unit}


def validate_result(result: Any) -> dict[str, Any]:
    """Checks an entry's return value and normalises it; raises ``ValueError`` when malformed.

    Catching a malformed result here turns an entry's bug into a reported failure instead of a crash while
    writing the tables.
    """
    if not isinstance(result, dict):
        raise ValueError(f"an entry must return a dict, got {type(result).__name__}")
    unknown = set(result) - {"config", "figures", "notes"}
    if unknown:
        raise ValueError(f"unknown result keys {sorted(unknown)}; expected config, figures, notes")
    config = result.get("config", {})
    figures = result.get("figures")
    notes = result.get("notes", "")
    if not isinstance(config, dict):
        raise ValueError("'config' must be a dict")
    if not isinstance(figures, dict) or not figures:
        raise ValueError("'figures' must be a non-empty dict of name -> {'value': float, 'unit': str}")
    clean: dict[str, dict[str, Any]] = {}
    for fig_name, fig in figures.items():
        if not isinstance(fig, dict) or set(fig) != {"value", "unit"}:
            raise ValueError(f"figure {fig_name!r} must be {{'value': float, 'unit': str}}, got {fig!r}")
        value = float(fig["value"])
        if not math.isfinite(value):
            raise ValueError(f"figure {fig_name!r} is not finite: {value}")
        clean[str(fig_name)] = figure(value, str(fig["unit"]))
    return {"config": dict(config), "figures": clean, "notes": str(notes)}
