"""The ``otlp`` exporter: OTLP over gRPC, HTTP/protobuf or HTTP/JSON, all three signals."""

from agent.component import ComponentFactory, Kind, Signal
from agent.exporters.otlp.config import OTLPExporterConfig, TLSConfig
from agent.exporters.otlp.exporter import OTLPExporter

factory = ComponentFactory("otlp", Kind.EXPORTER, OTLPExporterConfig, frozenset(Signal),
                           lambda settings, config, _next: OTLPExporter(settings, config))

__all__ = ["OTLPExporter", "OTLPExporterConfig", "TLSConfig", "factory"]
