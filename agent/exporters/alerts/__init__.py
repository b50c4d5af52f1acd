"""The ``alerts`` exporter: alerting rules over metrics, notifications with trace links."""

from __future__ import annotations

import builtins
from collections.abc import Mapping
from typing import Any, ClassVar

from agent.component import Consumer, Kind, Settings, Signal
from agent.exporters.alerts.config import AlertsConfig
from agent.exporters.alerts.exporter import AlertsExporter


class AlertsFactory:
    """Creates ``alerts`` exporters (metrics in, notifications out)."""

    type: ClassVar[str] = "alerts"
    kind: ClassVar[Kind] = Kind.EXPORTER
    config_class: ClassVar[builtins.type] = AlertsConfig
    signals: ClassVar[frozenset[Signal]] = frozenset({Signal.METRICS})
    output_signals: ClassVar[frozenset[Signal]] = frozenset()

    def create(self, settings: Settings, config: Any,
               next: Mapping[Signal, Consumer]) -> AlertsExporter:
        return AlertsExporter(settings, config)


factory = AlertsFactory()

__all__ = ["AlertsConfig", "AlertsExporter", "factory"]
