"""What both transports of the ``otlp`` receiver share: refusals, responses, bind errors."""

from __future__ import annotations

import errno
import math
import socket

from google.protobuf.message import Message
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from agent.component import Signal
from agent.config import split_endpoint

# Response message and the partial-success field that counts rejected items, per signal.
_RESPONSES: dict[Signal, tuple[type[Message], str]] = {
    Signal.TRACES: (trace_service_pb2.ExportTraceServiceResponse, "rejected_spans"),
    Signal.METRICS: (metrics_service_pb2.ExportMetricsServiceResponse, "rejected_data_points"),
    Signal.LOGS: (logs_service_pb2.ExportLogsServiceResponse, "rejected_log_records"),
}

DEFAULT_RETRY_AFTER = 1.0


class Refusal(Exception):
    """A request answered with an error rather than passed on.

    ``code`` is a ``google.rpc.Code``; each transport maps it to its own status (the
    table is in ``agent.receivers.otlp.receiver``). ``retry_after`` (seconds) is set
    when the client should retry.
    """

    def __init__(self, code: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after


def response_for(signal: Signal, rejected: int = 0, message: str = "") -> Message:
    """The ``Export*ServiceResponse`` of ``signal``: empty, or a partial success."""
    cls, field = _RESPONSES[signal]
    response = cls()
    if rejected or message:
        setattr(response.partial_success, field, rejected)
        response.partial_success.error_message = message
    return response


def retry_after_seconds(retry_after: float | None) -> int:
    """A retry hint as whole seconds for ``Retry-After`` (at least 1)."""
    return max(1, math.ceil(retry_after if retry_after is not None else DEFAULT_RETRY_AFTER))


# ----------------------------------------------------------------------------- binding


def bind_error(endpoint: str, reason: str) -> OSError:
    """The error ``start`` raises when a listener cannot bind.

    The graph prefixes it with the component ("receivers.otlp: failed to start: ...").
    """
    return OSError(f"cannot listen on {endpoint}: {reason}")


def why_bind_fails(endpoint: str) -> str:
    """Find out why binding ``endpoint`` fails, for a library that does not say.

    gRPC only reports "Failed to bind"; binding a plain socket the same way recovers
    the operating system's reason ("address in use", ...).
    """
    host, port = split_endpoint(endpoint)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(infos[0][4])
    except OSError as e:
        return os_reason(e)
    return "bind failed"


def os_reason(e: OSError) -> str:
    """``[Errno 98] Address already in use`` -> ``address in use``; plain text otherwise."""
    if e.errno == errno.EADDRINUSE:
        return "address in use"
    if e.errno == errno.EADDRNOTAVAIL:
        return "address not available on this host"
    if e.errno == errno.EACCES:
        return "permission denied (ports below 1024 need privileges)"
    if isinstance(e, socket.gaierror):
        return f"cannot resolve host: {e.strerror}"
    return (e.strerror or str(e)).lower()
