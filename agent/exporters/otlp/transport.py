"""The two OTLP transports: gRPC (``grpc.aio``, raw bytes) and HTTP (``aiohttp``).

Each turns one batch into one export call and maps the peer's answer onto the
pipeline's errors following the OTLP specification
(https://opentelemetry.io/docs/specs/otlp/#failures):

- gRPC: ``UNAVAILABLE``, ``CANCELLED``, ``DEADLINE_EXCEEDED``, ``ABORTED``,
  ``OUT_OF_RANGE``, ``DATA_LOSS`` and ``RESOURCE_EXHAUSTED`` *with* a
  ``google.rpc.RetryInfo`` are ``RetryableError`` (delay from RetryInfo); every other
  code is a ``PermanentError``.
- HTTP: 429, 502, 503, 504 and connection errors are ``RetryableError`` (delay from
  ``Retry-After``); every other non-2xx status is a ``PermanentError``.

A successful export returns the decoded ``Export*ServiceResponse`` so the caller can
account for ``partial_success``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from agent.component import PermanentError, RetryableError, Signal
from agent.exporters.otlp.config import OTLPExporterConfig
from agent.httputil import parse_retry_after, read_bounded
from agent.otlpjson import encode_json
from agent.pdata import Batch

GRPC_METHODS: dict[Signal, str] = {
    Signal.TRACES: "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
    Signal.METRICS: "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
    Signal.LOGS: "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
}
RESPONSE_TYPES: dict[Signal, type[Message]] = {
    Signal.TRACES: ExportTraceServiceResponse,
    Signal.METRICS: ExportMetricsServiceResponse,
    Signal.LOGS: ExportLogsServiceResponse,
}
RETRYABLE_GRPC_CODES = frozenset({
    grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
    grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
})
RETRYABLE_HTTP_STATUSES = frozenset({429, 502, 503, 504})
# A response body is only read for partial_success or an error message; a peer that
# sends more than this is not a well-behaved OTLP server and the rest is ignored.
STATUS_DETAILS_KEY = "grpc-status-details-bin"


def load_ca(path: Path | None) -> bytes | None:
    """The PEM bundle at ``path`` (None when unset)."""
    return path.read_bytes() if path is not None else None


# --------------------------------------------------------------------------- gRPC


def retry_info_delay(status_details: bytes | None) -> float | None:
    """Seconds from the ``google.rpc.RetryInfo`` in a serialised ``google.rpc.Status``."""
    if not status_details:
        return None
    status = status_pb2.Status()
    try:
        status.ParseFromString(status_details)
    except DecodeError:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return max(0.0, info.retry_delay.ToTimedelta().total_seconds())
    return None


def grpc_error(e: grpc.aio.AioRpcError) -> RetryableError | PermanentError:
    """Map a failed gRPC call onto the pipeline's two errors (see the module docstring)."""
    code = e.code()
    details = None
    for key, value in e.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY:
            details = value
    delay = retry_info_delay(details)
    msg = f"gRPC {code.name}: {e.details()}"
    if code in RETRYABLE_GRPC_CODES or (code == grpc.StatusCode.RESOURCE_EXHAUSTED
                                        and delay is not None):
        return RetryableError(msg, retry_after=delay)
    return PermanentError(msg)


class GrpcTransport:
    """Unary ``Export`` calls on one ``grpc.aio`` channel, bytes in and bytes out."""

    def __init__(self, config: OTLPExporterConfig) -> None:
        self.cfg = config
        self.target = config.endpoint.split("://", 1)[-1].rstrip("/")
        # gRPC metadata keys must be lowercase.
        self._metadata = tuple((k.lower(), v) for k, v in config.headers.items())
        self._compression = (grpc.Compression.Gzip if config.compression == "gzip"
                             else grpc.Compression.NoCompression)
        self._channel: grpc.aio.Channel | None = None
        self._calls: dict[Signal, Any] = {}

    async def start(self) -> None:
        if self.cfg.use_tls:
            ca = await asyncio.to_thread(load_ca, self.cfg.tls.ca_file)
            self._channel = grpc.aio.secure_channel(
                self.target, grpc.ssl_channel_credentials(root_certificates=ca))
        else:
            self._channel = grpc.aio.insecure_channel(self.target)
        # No (de)serializers: the batch is already protobuf bytes, and the response
        # is parsed only here.
        self._calls = {s: self._channel.unary_unary(m) for s, m in GRPC_METHODS.items()}

    async def export(self, batch: Batch) -> Message:
        call = self._calls.get(batch.signal)
        if call is None:
            raise RetryableError("otlp exporter is not started")
        try:
            data = await call(batch.to_bytes(), timeout=self.cfg.timeout,
                              metadata=self._metadata, compression=self._compression)
        except grpc.aio.AioRpcError as e:
            raise grpc_error(e) from None
        # Accepted either way: an unreadable response only loses partial_success detail.
        return decode_response(batch.signal, data, "application/x-protobuf")

    async def close(self) -> None:
        channel, self._channel, self._calls = self._channel, None, {}
        if channel is not None:
            await channel.close()


# --------------------------------------------------------------------------- HTTP


def status_message(body: bytes, content_type: str) -> str:
    """The message of a ``google.rpc.Status`` error body, or the start of the body."""
    if "json" in content_type:
        try:
            obj = json.loads(body)
            if isinstance(obj, dict) and isinstance(obj.get("message"), str):
                return obj["message"]
        except ValueError:
            pass
    elif "protobuf" in content_type:
        status = status_pb2.Status()
        try:
            status.ParseFromString(body)
            return status.message
        except DecodeError:
            pass
    return body[:200].decode("utf-8", "replace")


def decode_response(signal: Signal, body: bytes, content_type: str) -> Message:
    """An ``Export*ServiceResponse`` from a 2xx body (empty when unreadable)."""
    response = RESPONSE_TYPES[signal]()
    if not body:
        return response
    if "json" in content_type:
        with contextlib.suppress(json_format.ParseError, ValueError):
            json_format.Parse(body, response, ignore_unknown_fields=True)
    else:
        with contextlib.suppress(DecodeError):
            response.ParseFromString(body)
    return response


class HttpTransport:
    """``POST <endpoint>/v1/<signal>`` with an ``aiohttp`` session."""

    def __init__(self, config: OTLPExporterConfig) -> None:
        self.cfg = config
        base = config.endpoint.rstrip("/")
        self.urls = {s: f"{base}/v1/{s}" for s in Signal}
        self._json = config.protocol == "http/json"
        self._headers = {
            **config.headers,
            "Content-Type": "application/json" if self._json else "application/x-protobuf",
        }
        if config.compression == "gzip":
            self._headers["Content-Encoding"] = "gzip"
        self._session: aiohttp.ClientSession | None = None
        self._ssl: ssl.SSLContext | bool = True

    async def start(self) -> None:
        if self.cfg.tls.ca_file is not None:
            ca = await asyncio.to_thread(load_ca, self.cfg.tls.ca_file)
            self._ssl = ssl.create_default_context(cadata=ca.decode() if ca else None)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.cfg.timeout))

    def encode(self, batch: Batch) -> bytes:
        """The request body: protobuf or OTLP/JSON, gzipped when configured."""
        body = encode_json(batch.request) if self._json else batch.to_bytes()
        return gzip.compress(body, compresslevel=6) if self.cfg.compression == "gzip" else body

    async def export(self, batch: Batch) -> Message:
        if self._session is None:
            raise RetryableError("otlp exporter is not started")
        url = self.urls[batch.signal]
        # Off the loop: JSON encoding and gzip of a large batch would stall it.
        body = await asyncio.to_thread(self.encode, batch)
        try:
            async with self._session.post(url, data=body, headers=self._headers,
                                          ssl=self._ssl) as resp:
                payload = await read_bounded(resp)
                status, ctype = resp.status, resp.headers.get("Content-Type", "")
                retry_after = resp.headers.get("Retry-After")
        except (aiohttp.ClientError, TimeoutError) as e:
            raise RetryableError(f"POST {url}: {type(e).__name__}: {e}") from None
        if 200 <= status < 300:
            return decode_response(batch.signal, payload, ctype)
        msg = f"POST {url}: HTTP {status}: {status_message(payload, ctype)}"
        if status in RETRYABLE_HTTP_STATUSES:
            raise RetryableError(msg, retry_after=parse_retry_after(retry_after))
        raise PermanentError(msg)

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()
