"""Configuration of the ``otlp`` exporter."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from agent.config import Duration, parse_endpoint
from agent.queue import QueueConfig, RetryConfig

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


@dataclass
class TLSConfig:
    """``tls``: ``insecure`` unset means plaintext to loopback hosts and ``http://`` URLs,
    TLS everywhere else; ``ca_file`` is a PEM bundle that replaces the system roots."""

    insecure: bool | None = None
    ca_file: Path | None = None


@dataclass
class OTLPExporterConfig:
    """``[exporters.otlp]``.

    ``endpoint`` is ``host:port`` for gRPC (an ``http://`` or ``https://`` prefix is
    accepted and picks plaintext or TLS) and a base URL for HTTP; the exporter posts
    to ``<endpoint>/v1/traces``, ``/v1/metrics`` and ``/v1/logs``.
    """

    endpoint: str = "127.0.0.1:4317"
    protocol: Literal["grpc", "http/protobuf", "http/json"] = "grpc"
    compression: Literal["gzip", "none"] = "gzip"
    headers: dict[str, str] = field(default_factory=dict)
    timeout: Duration = 5.0
    tls: TLSConfig = field(default_factory=TLSConfig)
    # Persistent: what was acknowledged survives a restart during a backend outage.
    sending_queue: QueueConfig = field(default_factory=lambda: QueueConfig(persistent=True))
    # Retry for as long as the backend is away: the (persistent) queue bounds what is
    # held, and a full queue turns into backpressure to the senders instead of a drop.
    retry_on_failure: RetryConfig = field(default_factory=lambda: RetryConfig(max_elapsed_time=0))

    def validate(self) -> list[str]:
        errs = []
        if self.protocol == "grpc":
            target = self.endpoint.split("://", 1)[1] if "://" in self.endpoint else self.endpoint
            if "://" in self.endpoint and not self.endpoint.startswith(("http://", "https://")):
                errs.append(f"endpoint: {self.endpoint!r}: the scheme must be http or https")
            else:
                try:
                    parse_endpoint(target.rstrip("/"))
                except ValueError as e:
                    errs.append(f"endpoint: {e} (gRPC needs host:port, e.g. \"127.0.0.1:4317\")")
        else:
            url = urlsplit(self.endpoint)
            if url.scheme not in ("http", "https") or not url.hostname:
                errs.append(f"endpoint: {self.endpoint!r} is not an http(s) URL "
                            f"({self.protocol} needs e.g. \"http://127.0.0.1:4318\")")
        if self.timeout <= 0:
            errs.append("timeout: must be positive")
        elif self.timeout > self.sending_queue.timeout:
            errs.append("timeout: must not exceed sending_queue.timeout (the limit of one "
                        "whole attempt)")
        for name in self.headers:
            if not name or any(c in name for c in " :\r\n"):
                errs.append(f"headers.{name}: not a valid header name")
        return errs

    @property
    def host(self) -> str:
        """The endpoint's host name, without scheme, port or brackets."""
        if "://" in self.endpoint:
            return urlsplit(self.endpoint).hostname or ""
        return self.endpoint.rsplit(":", 1)[0].strip("[]")

    @property
    def use_tls(self) -> bool:
        """Whether the connection is encrypted (see ``TLSConfig``)."""
        if self.endpoint.startswith("https://"):
            return True
        if self.endpoint.startswith("http://"):
            return False
        if self.tls.insecure is not None:
            return not self.tls.insecure
        return self.host not in LOOPBACK_HOSTS
