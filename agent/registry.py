"""The explicit list of component factories. Adding a component is one line here."""

from __future__ import annotations

import importlib
from functools import cache

from agent.component import Factory, Kind

# "module:attribute" of each factory instance, one line per component.
FACTORIES: list[str] = [
    # receivers
    "agent.receivers.host:factory",
    "agent.receivers.internal:factory",
    "agent.receivers.otlp:factory",
    # processors
    "agent.processors.batch:factory",
    "agent.processors.enrich:factory",
    "agent.processors.memory_limiter:factory",
    "agent.processors.redact:factory",
    # exporters
    "agent.exporters.alerts:factory",
    "agent.exporters.debug:factory",
    "agent.exporters.elasticsearch:factory",
    "agent.exporters.file:factory",
    "agent.exporters.otlp:factory",
    "agent.exporters.prometheus:factory",
    "agent.exporters.prometheus_remote_write:factory",
    # connectors
    "agent.connectors.count:factory",
    "agent.connectors.drift:factory",
    "agent.connectors.latency:factory",
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
