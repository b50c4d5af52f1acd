"""The ``redact`` processor: blocked keys and secret-looking values out of telemetry."""

from agent.component import ComponentFactory, Kind, Signal
from agent.processors.redact.config import DEFAULT_BLOCKED_KEYS, RedactConfig
from agent.processors.redact.processor import Redactor, RedactProcessor

# One instance per pipeline.
factory = ComponentFactory("redact", Kind.PROCESSOR, RedactConfig, frozenset(Signal),
                           RedactProcessor, output_signals=frozenset(Signal))

__all__ = ["DEFAULT_BLOCKED_KEYS", "RedactConfig", "RedactProcessor", "Redactor", "factory"]
