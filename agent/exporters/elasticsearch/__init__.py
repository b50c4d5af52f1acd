"""The ``elasticsearch`` exporter: logs and spans as ECS documents into data streams."""

from __future__ import annotations

from collections.abc import Mapping

from agent.component import Consumer, Kind, Settings, Signal
from agent.exporters.elasticsearch.config import ElasticsearchConfig, TLSConfig
from agent.exporters.elasticsearch.exporter import ElasticsearchExporter


class ElasticsearchExporterFactory:
    """Creates ``elasticsearch`` exporters; accepts logs and traces."""

    type = "elasticsearch"
    kind = Kind.EXPORTER
    config_class = ElasticsearchConfig
    signals = frozenset({Signal.LOGS, Signal.TRACES})
    output_signals: frozenset[Signal] = frozenset()

    def create(self, settings: Settings, config: ElasticsearchConfig,
               next: Mapping[Signal, Consumer]) -> ElasticsearchExporter:
        return ElasticsearchExporter(settings, config)


factory = ElasticsearchExporterFactory()

__all__ = ["ElasticsearchConfig", "ElasticsearchExporter", "TLSConfig", "factory"]
