"""Config of the ``prometheus_remote_write`` exporter (Prometheus remote write 1.0)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from agent.promnames import TranslationConfig
from agent.queue import QueueConfig, RetryConfig

_URL_RE = re.compile(r"^https?://[^/\s]+(/\S*)?$")


@dataclass
class RemoteWriteConfig(TranslationConfig):
    """``[exporters.prometheus_remote_write]``; translation keys come from ``TranslationConfig``."""

    # The receiver's write URL (Prometheus: /api/v1/write with --web.enable-remote-write-receiver).
    endpoint: str = "http://127.0.0.1:9090/api/v1/write"
    # Extra HTTP headers, e.g. Authorization or X-Scope-OrgID.
    headers: dict[str, str] = field(default_factory=dict)
    # Series are spread over this many ordered queues by a hash of their labels:
    # requests of different shards run concurrently, those of one shard in order.
    shards: int = 4
    # Most samples in one request.
    max_samples_per_send: int = 2000
    # Send exemplars (trace_id, span_id) with counter and histogram bucket samples.
    exemplars: bool = True
    # Each shard gets max_items / shards and max_bytes / shards; ``consumers`` is
    # ignored (one in-order worker per shard); ``timeout`` is per request.
    sending_queue: QueueConfig = field(default_factory=lambda: QueueConfig(persistent=True))
    # Retry for as long as the backend is away: the (persistent) queue bounds what is
    # held, and a full queue turns into backpressure to the senders instead of a drop.
    retry_on_failure: RetryConfig = field(default_factory=lambda: RetryConfig(max_elapsed_time=0))

    def validate(self) -> list[str]:
        errs = TranslationConfig.validate(self)
        if not _URL_RE.match(self.endpoint):
            errs.append(f"endpoint: {self.endpoint!r} is not an http(s) URL")
        if not 1 <= self.shards <= 256:
            errs.append("shards: must be within 1..256")
        if self.max_samples_per_send < 1:
            errs.append("max_samples_per_send: must be >= 1")
        return errs
