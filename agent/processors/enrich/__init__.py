"""The ``enrich`` processor: host identity, model version, hardware snapshot, log–trace correlation."""

from agent.component import ComponentFactory, Kind, Signal
from agent.processors.enrich.config import EnrichConfig
from agent.processors.enrich.processor import EnrichProcessor

# One instance per pipeline.
factory = ComponentFactory("enrich", Kind.PROCESSOR, EnrichConfig, frozenset(Signal),
                           EnrichProcessor, output_signals=frozenset(Signal))

__all__ = ["EnrichConfig", "EnrichProcessor", "factory"]
