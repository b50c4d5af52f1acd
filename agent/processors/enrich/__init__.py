"""The ``enrich`` processor: host identity, model version, hardware snapshot, log–trace correlation."""

from __future__ import annotations

import builtins
from collections.abc import Mapping
from typing import ClassVar

from agent.component import Consumer, Kind, Settings, Signal
from agent.processors.enrich.config import EnrichConfig
from agent.processors.enrich.processor import EnrichProcessor


class EnrichFactory:
    """Creates one ``EnrichProcessor`` per pipeline."""

    type: ClassVar[str] = "enrich"
    kind: ClassVar[Kind] = Kind.PROCESSOR
    config_class: ClassVar[builtins.type] = EnrichConfig
    signals: ClassVar[frozenset[Signal]] = frozenset(Signal)
    output_signals: ClassVar[frozenset[Signal]] = frozenset(Signal)

    def create(self, settings: Settings, config: EnrichConfig,
               next: Mapping[Signal, Consumer]) -> EnrichProcessor:
        return EnrichProcessor(settings, config, next)


factory = EnrichFactory()

__all__ = ["EnrichConfig", "EnrichFactory", "EnrichProcessor", "factory"]
