"""The ``redact`` processor: blocked keys and secret-looking values out of telemetry."""

from __future__ import annotations

import builtins
from collections.abc import Mapping
from typing import ClassVar

from agent.component import Consumer, Kind, Settings, Signal
from agent.processors.redact.config import DEFAULT_BLOCKED_KEYS, RedactConfig
from agent.processors.redact.processor import Redactor, RedactProcessor


class RedactFactory:
    """Creates one ``RedactProcessor`` per pipeline."""

    type: ClassVar[str] = "redact"
    kind: ClassVar[Kind] = Kind.PROCESSOR
    config_class: ClassVar[builtins.type] = RedactConfig
    signals: ClassVar[frozenset[Signal]] = frozenset(Signal)
    output_signals: ClassVar[frozenset[Signal]] = frozenset(Signal)

    def create(self, settings: Settings, config: RedactConfig,
               next: Mapping[Signal, Consumer]) -> RedactProcessor:
        return RedactProcessor(settings, config, next)


factory = RedactFactory()

__all__ = ["DEFAULT_BLOCKED_KEYS", "RedactConfig", "RedactFactory", "RedactProcessor", "Redactor",
           "factory"]
