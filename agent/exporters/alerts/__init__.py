"""The ``alerts`` exporter: alerting rules over metrics, notifications with trace links."""

from agent.component import ComponentFactory, Kind, Signal
from agent.exporters.alerts.config import AlertsConfig
from agent.exporters.alerts.exporter import AlertsExporter

factory = ComponentFactory("alerts", Kind.EXPORTER, AlertsConfig, frozenset({Signal.METRICS}),
                           lambda settings, config, _next: AlertsExporter(settings, config))

__all__ = ["AlertsConfig", "AlertsExporter", "factory"]
