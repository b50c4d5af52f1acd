"""Configuration of the ``otlp`` receiver: ``[receivers.otlp]``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from agent.config import ByteSize, Duration, Endpoint, split_endpoint

MIB = 1024 * 1024


@dataclass
class TlsServerConfig:
    """``tls`` of one listener: TLS when ``cert_file`` and ``key_file`` are set, plaintext
    when neither is (the default).

    With ``client_ca_file`` the listener also requires a client certificate signed by
    one of its CAs (mutual TLS). The files are read when the listener starts, so that
    ``mlagent validate`` stays free of I/O and a reload picks up rotated certificates.
    """

    cert_file: Path | None = None
    key_file: Path | None = None
    client_ca_file: Path | None = None
    min_version: Literal["1.2", "1.3"] = "1.2"

    @property
    def enabled(self) -> bool:
        """Whether the listener serves TLS."""
        return self.cert_file is not None and self.key_file is not None

    def validate(self) -> list[str]:
        errors = []
        if self.cert_file is not None and self.key_file is None:
            errors.append("key_file: required with cert_file (the certificate's private key)")
        elif self.key_file is not None and self.cert_file is None:
            errors.append("cert_file: required with key_file (the key's certificate chain)")
        elif self.client_ca_file is not None and not self.enabled:
            errors.append("client_ca_file: needs cert_file and key_file (client certificates "
                          "are checked only over TLS)")
        return errors


@dataclass
class GrpcConfig:
    """``receivers.otlp.grpc``: OTLP/gRPC on ``endpoint``."""

    enabled: bool = True
    endpoint: Endpoint = "127.0.0.1:4317"
    # Largest request accepted, after decompression (gRPC's own default).
    max_request_size: ByteSize = 4 * MIB
    # Requests handled at once; more are answered UNAVAILABLE (retry later). With
    # max_request_size this bounds the memory held by requests in flight.
    max_concurrent_requests: int = 64
    tls: TlsServerConfig = field(default_factory=TlsServerConfig)

    def validate(self) -> list[str]:
        errors = []
        if self.max_request_size <= 0:
            errors.append("max_request_size: must be positive")
        elif self.max_request_size >= 2**31:
            errors.append("max_request_size: must be under 2GiB (a gRPC limit)")
        if self.max_concurrent_requests <= 0:
            errors.append("max_concurrent_requests: must be positive")
        if self.tls.min_version == "1.3":
            # grpcio's server credentials take no version bounds: gRPC core always
            # negotiates TLS 1.2 or 1.3. Refusing beats serving 1.2 to a config that said no.
            errors.append('tls.min_version: gRPC serves TLS 1.2 and 1.3 and cannot be limited '
                          'to 1.3; only "1.2" is possible here')
        return errors


@dataclass
class HttpConfig:
    """``receivers.otlp.http``: OTLP/HTTP (protobuf or JSON) on ``endpoint``."""

    enabled: bool = True
    endpoint: Endpoint = "127.0.0.1:4318"
    # Largest request body accepted, after decompression (the collector's default).
    max_request_size: ByteSize = 20 * MIB
    # Requests handled at once; more are answered 503 (retry later). With
    # max_request_size this bounds the memory held by requests in flight.
    max_concurrent_requests: int = 64
    traces_url_path: str = "/v1/traces"
    metrics_url_path: str = "/v1/metrics"
    logs_url_path: str = "/v1/logs"
    tls: TlsServerConfig = field(default_factory=TlsServerConfig)

    def validate(self) -> list[str]:
        errors = []
        paths = {"traces_url_path": self.traces_url_path,
                 "metrics_url_path": self.metrics_url_path,
                 "logs_url_path": self.logs_url_path}
        for key, path in paths.items():
            if not path.startswith("/"):
                errors.append(f"{key}: {path!r} must start with '/'")
        if len(set(paths.values())) != len(paths):
            errors.append("traces_url_path: the three URL paths must differ")
        if self.max_request_size <= 0:
            errors.append("max_request_size: must be positive")
        if self.max_concurrent_requests <= 0:
            errors.append("max_concurrent_requests: must be positive")
        return errors


@dataclass
class OtlpReceiverConfig:
    """``[receivers.otlp]``: OTLP over gRPC and HTTP."""

    grpc: GrpcConfig = field(default_factory=GrpcConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    # At shutdown, requests already being handled get this long to finish.
    shutdown_grace: Duration = 5.0

    def validate(self) -> list[str]:
        errors = []
        if not (self.grpc.enabled or self.http.enabled):
            errors.append("grpc.enabled: at least one of grpc and http must be enabled")
        if (self.grpc.enabled and self.http.enabled
                and split_endpoint(self.grpc.endpoint) == split_endpoint(self.http.endpoint)
                and split_endpoint(self.grpc.endpoint)[1] != 0):
            errors.append(f"http.endpoint: {self.http.endpoint!r} is also the grpc endpoint")
        return errors
