"""Configuration of the ``otlp`` receiver: ``[receivers.otlp]``."""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.config import ByteSize, Duration, Endpoint, split_endpoint

MIB = 1024 * 1024


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

    def validate(self) -> list[str]:
        errors = []
        if self.max_request_size <= 0:
            errors.append("max_request_size: must be positive")
        elif self.max_request_size >= 2**31:
            errors.append("max_request_size: must be under 2GiB (a gRPC limit)")
        if self.max_concurrent_requests <= 0:
            errors.append("max_concurrent_requests: must be positive")
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
