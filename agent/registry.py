"""The explicit list of component factories. Adding a component is one line here."""

from __future__ import annotations

import importlib
from functools import cache

from agent.component import Factory, Kind

# "module:attribute" of each factory instance, one line per component.
FACTORIES: list[str] = [
    # receivers
    "agent.receivers.internal:factory",
    # processors
    "agent.processors.batch:factory",
    # exporters
    "agent.exporters.debug:factory",
    # connectors
    "agent.connectors.count:factory",
]


@cache
def factories() -> dict[Kind, dict[str, Factory]]:
    """Factories by kind and type."""
    out: dict[Kind, dict[str, Factory]] = {k: {} for k in Kind}
    for ref in FACTORIES:
        module, attr = ref.split(":")
        f = getattr(importlib.import_module(module), attr)
        out[f.kind][f.type] = f
    return out
