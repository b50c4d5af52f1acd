"""The ``file`` exporter: OTLP/JSON lines (or length-delimited protobuf) to a rotated file."""

from agent.component import ComponentFactory, Kind, Signal
from agent.exporters.file.config import FileConfig, RotationConfig
from agent.exporters.file.exporter import FileExporter

factory = ComponentFactory("file", Kind.EXPORTER, FileConfig, frozenset(Signal),
                           lambda settings, config, _next: FileExporter(settings, config))

__all__ = ["FileConfig", "FileExporter", "RotationConfig", "factory"]
