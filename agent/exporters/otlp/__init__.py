"""The ``otlp`` exporter: OTLP over gRPC, HTTP/protobuf or HTTP/JSON, all three signals."""

from __future__ import annotations

from collections.abc import Mapping

from agent.component import Consumer, Kind, Settings, Signal
from agent.exporters.otlp.config import OTLPExporterConfig, TLSConfig
from agent.exporters.otlp.exporter import OTLPExporter


class OTLPExporterFactory:
    """Creates ``otlp`` exporters; accepts all three signals."""

    type = "otlp"
    kind = Kind.EXPORTER
    config_class = OTLPExporterConfig
    signals = frozenset(Signal)
    output_signals: frozenset[Signal] = frozenset()

    def create(self, settings: Settings, config: OTLPExporterConfig,
               next: Mapping[Signal, Consumer]) -> OTLPExporter:
        return OTLPExporter(settings, config)


factory = OTLPExporterFactory()

__all__ = ["OTLPExporter", "OTLPExporterConfig", "TLSConfig", "factory"]
