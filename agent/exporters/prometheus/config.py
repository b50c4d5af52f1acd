"""Config of the ``prometheus`` exporter (a ``/metrics`` endpoint that Prometheus scrapes)."""

from __future__ import annotations

from dataclasses import dataclass

from agent.config import Endpoint
from agent.promnames import TranslationConfig


@dataclass
class PrometheusConfig(TranslationConfig):
    """``[exporters.prometheus]``; the translation keys come from ``TranslationConfig``."""

    # Where /metrics is served. Keep it on loopback unless the scraper is remote.
    endpoint: Endpoint = "127.0.0.1:9464"
    # Add exemplars (trace_id, span_id) to counters and histogram buckets in OpenMetrics.
    exemplars: bool = True
