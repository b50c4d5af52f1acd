"""The ``prometheus_remote_write`` exporter: pushes metrics with Prometheus remote write 1.0."""

from agent.component import ComponentFactory, Kind, Signal
from agent.exporters.prometheus_remote_write.config import RemoteWriteConfig
from agent.exporters.prometheus_remote_write.exporter import RemoteWriteExporter

factory = ComponentFactory("prometheus_remote_write", Kind.EXPORTER, RemoteWriteConfig,
                           frozenset({Signal.METRICS}),
                           lambda settings, config, _next: RemoteWriteExporter(settings, config))

__all__ = ["RemoteWriteConfig", "RemoteWriteExporter", "factory"]
