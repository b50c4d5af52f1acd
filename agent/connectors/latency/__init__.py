"""``latency`` connector: traces in, per-service and per-stage latency metrics out."""

from __future__ import annotations

import builtins
from collections.abc import Mapping
from typing import ClassVar

from agent.component import Consumer, Kind, Settings, Signal
from agent.connectors.latency.config import LatencyConfig, StageConfig
from agent.connectors.latency.connector import LatencyConnector


class LatencyFactory:
    """Creates the ``latency`` connector (traces pipeline exporter, metrics pipeline receiver)."""

    type: ClassVar[str] = "latency"
    kind: ClassVar[Kind] = Kind.CONNECTOR
    config_class: ClassVar[builtins.type] = LatencyConfig
    signals: ClassVar[frozenset[Signal]] = frozenset({Signal.TRACES})
    output_signals: ClassVar[frozenset[Signal]] = frozenset({Signal.METRICS})

    def default_config(self) -> LatencyConfig:
        return LatencyConfig()

    def create(self, settings: Settings, config: LatencyConfig,
               next: Mapping[Signal, Consumer]) -> LatencyConnector:
        return LatencyConnector(settings, config, next[Signal.METRICS])


factory = LatencyFactory()

__all__ = ["LatencyConfig", "LatencyConnector", "StageConfig", "factory"]
