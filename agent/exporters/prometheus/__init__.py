"""The ``prometheus`` exporter: serves the metrics it receives on ``/metrics`` for scraping."""

from agent.component import ComponentFactory, Kind, Signal
from agent.exporters.prometheus.config import PrometheusConfig
from agent.exporters.prometheus.exporter import PrometheusExporter

factory = ComponentFactory("prometheus", Kind.EXPORTER, PrometheusConfig,
                           frozenset({Signal.METRICS}),
                           lambda settings, config, _next: PrometheusExporter(settings, config))

__all__ = ["PrometheusConfig", "PrometheusExporter", "factory"]
