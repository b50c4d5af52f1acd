"""The ``elasticsearch`` exporter: logs and spans as ECS documents into data streams."""

from agent.component import ComponentFactory, Kind, Signal
from agent.exporters.elasticsearch.config import ElasticsearchConfig, TLSConfig
from agent.exporters.elasticsearch.exporter import ElasticsearchExporter

factory = ComponentFactory("elasticsearch", Kind.EXPORTER, ElasticsearchConfig,
                           frozenset({Signal.LOGS, Signal.TRACES}),
                           lambda settings, config, _next: ElasticsearchExporter(settings, config))

__all__ = ["ElasticsearchConfig", "ElasticsearchExporter", "TLSConfig", "factory"]
