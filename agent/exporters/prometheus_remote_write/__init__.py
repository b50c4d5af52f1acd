"""The ``prometheus_remote_write`` exporter: pushes metrics with Prometheus remote write 1.0."""

from __future__ import annotations

import builtins
from collections.abc import Mapping
from typing import Any, ClassVar

from agent.component import Consumer, Kind, Settings, Signal
from agent.exporters.prometheus_remote_write.config import RemoteWriteConfig
from agent.exporters.prometheus_remote_write.exporter import RemoteWriteExporter


class RemoteWriteFactory:
    type: ClassVar[str] = "prometheus_remote_write"
    kind: ClassVar[Kind] = Kind.EXPORTER
    config_class: ClassVar[builtins.type] = RemoteWriteConfig
    signals: ClassVar[frozenset[Signal]] = frozenset({Signal.METRICS})
    output_signals: ClassVar[frozenset[Signal]] = frozenset()

    def create(self, settings: Settings, config: Any,
               next: Mapping[Signal, Consumer]) -> RemoteWriteExporter:
        return RemoteWriteExporter(settings, config)


factory = RemoteWriteFactory()

__all__ = ["RemoteWriteConfig", "RemoteWriteExporter", "factory"]
