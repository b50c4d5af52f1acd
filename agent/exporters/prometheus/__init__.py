"""The ``prometheus`` exporter: serves the metrics it receives on ``/metrics`` for scraping."""

from __future__ import annotations

import builtins
from collections.abc import Mapping
from typing import Any, ClassVar

from agent.component import Consumer, Kind, Settings, Signal
from agent.exporters.prometheus.config import PrometheusConfig
from agent.exporters.prometheus.exporter import PrometheusExporter


class PrometheusFactory:
    type: ClassVar[str] = "prometheus"
    kind: ClassVar[Kind] = Kind.EXPORTER
    config_class: ClassVar[builtins.type] = PrometheusConfig
    signals: ClassVar[frozenset[Signal]] = frozenset({Signal.METRICS})
    output_signals: ClassVar[frozenset[Signal]] = frozenset()

    def create(self, settings: Settings, config: Any,
               next: Mapping[Signal, Consumer]) -> PrometheusExporter:
        return PrometheusExporter(settings, config)


factory = PrometheusFactory()

__all__ = ["PrometheusConfig", "PrometheusExporter", "factory"]
