"""Configuration of the ``elasticsearch`` exporter."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from agent.config import ByteSize, Duration
from agent.queue import QueueConfig, RetryConfig

# What Elasticsearch allows in the dataset and namespace parts of a data stream name
# (``<type>-<dataset>-<namespace>``): lowercase, no ``-`` (it separates the parts),
# none of ``\/*?"<>| ,#:``, at most MAX_PART_BYTES.
DATA_STREAM_PART_RE = re.compile(r'^[^A-Z\-\\/*?"<>| ,#:]+$')
# Elasticsearch limits index names to 255 bytes of UTF-8, and a data stream's backing
# indices are named ``.ds-<type>-<dataset>-<namespace>-yyyy.mm.dd-000001``: 22 bytes
# around the stream name. 100 bytes per part (the data stream naming scheme's limit)
# keeps the longest of those, ``.ds-traces-`` + 100 + ``-`` + 100 + 18, at 230 bytes.
MAX_PART_BYTES = 100


def is_data_stream_part(value: str) -> bool:
    """Whether ``value`` can be the dataset or namespace of a data stream name."""
    return bool(DATA_STREAM_PART_RE.match(value)) and len(value.encode()) <= MAX_PART_BYTES


@dataclass
class TLSConfig:
    """``tls``: ``ca_file`` is a PEM bundle that replaces the system roots."""

    ca_file: Path | None = None
    insecure_skip_verify: bool = False


@dataclass
class ElasticsearchConfig:
    """``[exporters.elasticsearch]``.

    Logs go to the data stream ``logs-<dataset>-<namespace>``, spans to
    ``traces-<dataset>-<namespace>``. With ``dynamic_routing`` a record's (or its
    scope's or resource's) ``data_stream.dataset`` / ``data_stream.namespace``
    attribute overrides the configured part for that document.
    """

    endpoint: str = "http://localhost:9200"
    dataset: str = "mlagent"
    namespace: str = "default"
    dynamic_routing: bool = True
    # Authentication: an API key (the base64 "id:key" Elasticsearch returns), or
    # user and password for basic auth. Use ${env:...} to keep secrets out of the file.
    api_key: str = ""
    user: str = ""
    password: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    tls: TLSConfig = field(default_factory=TLSConfig)
    compression: Literal["gzip", "none"] = "gzip"
    timeout: Duration = 30.0
    # A batch is sent as several bulk requests of at most this many (uncompressed) bytes.
    bulk_max_bytes: ByteSize = 5 * 2**20
    create_index_templates: bool = False
    # Documents Elasticsearch refuses for good (mapping errors and the like) are
    # appended here as JSON lines, until the file reaches dead_letter_max_size.
    dead_letter_file: Path | None = None
    dead_letter_max_size: ByteSize = 100 * 2**20
    # Persistent: what was acknowledged survives a restart during a backend outage.
    # One attempt may take several bulk requests (bulk_max_bytes, 413 splits), hence
    # a per-attempt limit well above the per-request ``timeout``.
    sending_queue: QueueConfig = field(
        default_factory=lambda: QueueConfig(persistent=True, timeout=120.0))
    # Retry for as long as the backend is away: the (persistent) queue bounds what is
    # held, and a full queue turns into backpressure to the senders instead of a drop.
    retry_on_failure: RetryConfig = field(default_factory=lambda: RetryConfig(max_elapsed_time=0))

    def validate(self) -> list[str]:
        errs = []
        url = urlsplit(self.endpoint)
        if url.scheme not in ("http", "https") or not url.hostname:
            errs.append(f"endpoint: {self.endpoint!r} is not an http(s) URL "
                        "(e.g. \"http://localhost:9200\")")
        for key in ("dataset", "namespace"):
            value = getattr(self, key)
            if not is_data_stream_part(value):
                errs.append(f"{key}: {value!r} is not a valid data stream part (lowercase, "
                            f"no '-' and none of \\/*?\"<>| ,#:, at most {MAX_PART_BYTES} "
                            "bytes in UTF-8)")
        if self.api_key and (self.user or self.password):
            errs.append("api_key: set either api_key or user/password, not both")
        if self.password and not self.user:
            errs.append("password: set user as well")
        if self.timeout <= 0:
            errs.append("timeout: must be positive")
        elif self.timeout > self.sending_queue.timeout:
            errs.append("timeout: must not exceed sending_queue.timeout (the limit of one "
                        "whole attempt)")
        if self.bulk_max_bytes < 1024:
            errs.append("bulk_max_bytes: must be at least 1KiB")
        return errs
