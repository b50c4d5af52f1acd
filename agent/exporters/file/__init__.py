"""The ``file`` exporter: OTLP/JSON lines (or length-delimited protobuf) to a rotated file."""

from __future__ import annotations

from collections.abc import Mapping

from agent.component import Consumer, Kind, Settings, Signal
from agent.exporters.file.config import FileConfig, RotationConfig
from agent.exporters.file.exporter import FileExporter


class FileExporterFactory:
    """Creates ``file`` exporters; accepts all three signals."""

    type = "file"
    kind = Kind.EXPORTER
    config_class = FileConfig
    signals = frozenset(Signal)
    output_signals: frozenset[Signal] = frozenset()

    def create(self, settings: Settings, config: FileConfig,
               next: Mapping[Signal, Consumer]) -> FileExporter:
        return FileExporter(settings, config)


factory = FileExporterFactory()

__all__ = ["FileConfig", "FileExporter", "RotationConfig", "factory"]
