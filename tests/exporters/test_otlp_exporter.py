"""The ``otlp`` exporter against in-test OTLP servers (gRPC from the generated OTel
service stubs, HTTP with aiohttp): data arrives intact, failures follow the OTLP spec."""

from __future__ import annotations

import ipaddress
import ssl
from datetime import UTC, datetime, timedelta
from email.utils import formatdate
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp import web
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from agent.component import Kind, Signal
from agent.config import decode_dataclass
from agent.exporters.otlp import OTLPExporterConfig, TLSConfig, factory
from agent.httputil import parse_retry_after
from agent.otlpjson import decode_json, encode_json
from agent.pdata import BATCH_TYPES, Batch
from agent.queue import QueueConfig, RetryConfig
from agent.telemetry import Telemetry
from agent.testing import (
    gauge,
    log_batch,
    log_record,
    make_host,
    metric_batch,
    settings_for,
    span,
    trace_batch,
)

# Without the peer's hint the first retry would wait a minute and the test time out:
# passing proves RetryInfo / Retry-After were honoured.
SLOW_BACKOFF = RetryConfig(initial_interval=60.0, max_interval=60.0)
NO_RETRY = RetryConfig(enabled=False)


def sample_batches() -> list[Batch]:
    return [
        trace_batch([span("predict", trace_id=bytes(range(16)), span_id=b"\xab" * 8,
                          attributes={"ml.prediction.score": 0.9})],
                    resource={"service.name": "svc"}),
        metric_batch([gauge("gpu.util", [({"gpu": "0"}, 0.5), ({"gpu": "1"}, 0.25)])]),
        log_batch([log_record("hello", trace_id=b"\x01" * 16, span_id=b"\x02" * 8)]),
    ]


# --------------------------------------------------------------------------- servers


class GrpcSink:
    """An OTLP/gRPC server from the generated service stubs; ``faults`` are consumed
    one per call, before the call is accepted."""

    def __init__(self) -> None:
        self.received: list[tuple[Signal, Any, dict[str, str]]] = []
        self.calls = 0
        self.faults: list[tuple[grpc.StatusCode, float | None]] = []
        self.partial_success: dict[Signal, Any] = {}
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self, credentials: grpc.ServerCredentials | None = None) -> None:
        self.server = grpc.aio.server()
        sink = self

        def servicer(signal: Signal, response_type: Any, base: Any) -> Any:
            class Servicer(base):
                async def Export(self, request: Any, context: Any) -> Any:
                    return await sink.export(signal, request, context, response_type)
            return Servicer()

        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(
            servicer(Signal.TRACES, trace_service_pb2.ExportTraceServiceResponse,
                     trace_service_pb2_grpc.TraceServiceServicer), self.server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(
            servicer(Signal.METRICS, metrics_service_pb2.ExportMetricsServiceResponse,
                     metrics_service_pb2_grpc.MetricsServiceServicer), self.server)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(
            servicer(Signal.LOGS, logs_service_pb2.ExportLogsServiceResponse,
                     logs_service_pb2_grpc.LogsServiceServicer), self.server)
        self.port = (self.server.add_secure_port("127.0.0.1:0", credentials) if credentials
                     else self.server.add_insecure_port("127.0.0.1:0"))
        await self.server.start()

    async def export(self, signal: Signal, request: Any, context: Any, response_type: Any) -> Any:
        self.calls += 1
        if self.faults:
            code, retry_delay = self.faults.pop(0)
            status = status_pb2.Status(code=code.value[0], message="injected")
            if retry_delay is not None:
                info = error_details_pb2.RetryInfo()
                info.retry_delay.FromTimedelta(timedelta(seconds=retry_delay))
                status.details.add().Pack(info)
            await context.abort(code, "injected", trailing_metadata=(
                ("grpc-status-details-bin", status.SerializeToString()),))
        self.received.append((signal, request, dict(context.invocation_metadata())))
        response = response_type()
        if signal in self.partial_success:
            response.partial_success.CopyFrom(self.partial_success[signal])
        return response

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(None)


class HttpSink:
    """OTLP/HTTP on ``/v1/<signal>``; ``responses`` are consumed one per request
    (status, headers, body); once empty every request gets 200 with an empty body."""

    def __init__(self) -> None:
        self.requests: list[tuple[Signal, bytes, Any]] = []
        self.responses: list[tuple[int, dict[str, str], bytes]] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> None:
        app = web.Application()
        app.router.add_post("/v1/{signal}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=ssl_context).start()
        self.port = self.runner.addresses[0][1]

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()  # aiohttp undoes Content-Encoding: gzip
        self.requests.append((Signal(request.match_info["signal"]), body, request.headers))
        if self.responses:
            status, headers, payload = self.responses.pop(0)
            return web.Response(status=status, headers=headers, body=payload)
        return web.Response(status=200, body=b"",
                            content_type=request.content_type)

    def decoded(self) -> list[tuple[Signal, Any]]:
        out = []
        for signal, body, headers in self.requests:
            if headers["Content-Type"] == "application/json":
                out.append((signal, decode_json(signal, body)))
            else:
                out.append((signal, BATCH_TYPES[signal].from_bytes(body).request))
        return out

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def grpc_sink():
    sink = GrpcSink()
    await sink.start()
    yield sink
    await sink.stop()


@pytest.fixture
async def http_sink():
    sink = HttpSink()
    await sink.start()
    yield sink
    await sink.stop()


async def run_exporter(tmp_path, config: OTLPExporterConfig, batches: list[Batch],
                       telemetry: Telemetry | None = None) -> None:
    """Start an exporter, hand it ``batches``, and shut it down (which drains a memory
    queue; the persistent default would keep what is left for the next start)."""
    if config.sending_queue.persistent:
        config.sending_queue = QueueConfig(consumers=1)
    exp = factory.create(settings_for("otlp", Kind.EXPORTER, telemetry), config, {})
    await exp.start(make_host(tmp_path))
    for b in batches:
        await exp.consume(b)
    await exp.shutdown()


# --------------------------------------------------------------------------- arrival


@pytest.mark.parametrize("compression", ["gzip", "none"])
async def test_grpc_delivers_every_signal_intact(tmp_path, grpc_sink, compression):
    batches = sample_batches()
    expected = [(b.signal, b.request.__class__.FromString(b.to_bytes())) for b in batches]
    cfg = OTLPExporterConfig(endpoint=f"127.0.0.1:{grpc_sink.port}", compression=compression,
                             headers={"X-Tenant": "ml"},
                             sending_queue=QueueConfig(consumers=1))
    await run_exporter(tmp_path, cfg, batches)
    assert [(s, r) for s, r, _ in grpc_sink.received] == expected
    assert all(md.get("x-tenant") == "ml" for _, _, md in grpc_sink.received)


@pytest.mark.parametrize(("protocol", "compression"), [
    ("http/protobuf", "gzip"), ("http/protobuf", "none"), ("http/json", "gzip"),
    ("http/json", "none")])
async def test_http_delivers_every_signal_intact(tmp_path, http_sink, protocol, compression):
    batches = sample_batches()
    expected = [(b.signal, b.request.__class__.FromString(b.to_bytes())) for b in batches]
    cfg = OTLPExporterConfig(endpoint=f"http://127.0.0.1:{http_sink.port}/", protocol=protocol,
                             compression=compression, headers={"X-Tenant": "ml"},
                             sending_queue=QueueConfig(consumers=1))
    await run_exporter(tmp_path, cfg, batches)
    assert http_sink.decoded() == expected
    for _, _, headers in http_sink.requests:
        assert headers["X-Tenant"] == "ml"
        assert headers.get("Content-Encoding") == (None if compression == "none" else "gzip")
    if protocol == "http/json":  # OTLP/JSON ids are hex
        assert bytes(range(16)).hex().encode() in http_sink.requests[0][1]


# --------------------------------------------------------------------------- gRPC failures


async def test_grpc_unavailable_with_retry_info_is_retried_and_arrives_once(tmp_path, grpc_sink):
    grpc_sink.faults = [(grpc.StatusCode.UNAVAILABLE, 0.01)]
    tel = Telemetry()
    cfg = OTLPExporterConfig(endpoint=f"127.0.0.1:{grpc_sink.port}",
                             retry_on_failure=SLOW_BACKOFF)
    await run_exporter(tmp_path, cfg, [trace_batch([span()])], tel)
    assert grpc_sink.calls == 2
    assert len(grpc_sink.received) == 1
    snap = tel.snapshot("otlp")
    assert snap["mlagent_agent_sent_items_total{signal=traces}"] == 1
    assert snap["mlagent_agent_retries_total{signal=traces}"] == 1


async def test_grpc_resource_exhausted_is_retried_only_with_retry_info(tmp_path, grpc_sink):
    grpc_sink.faults = [(grpc.StatusCode.RESOURCE_EXHAUSTED, 0.01),
                        (grpc.StatusCode.RESOURCE_EXHAUSTED, None)]
    tel = Telemetry()
    cfg = OTLPExporterConfig(endpoint=f"127.0.0.1:{grpc_sink.port}",
                             retry_on_failure=SLOW_BACKOFF)
    await run_exporter(tmp_path, cfg, [trace_batch([span(), span()])], tel)
    assert grpc_sink.calls == 2  # retried once (with RetryInfo), then dropped
    assert grpc_sink.received == []
    snap = tel.snapshot("otlp")
    assert snap["mlagent_agent_dropped_items_total{reason=permanent_error,signal=traces}"] == 2


async def test_grpc_invalid_argument_is_dropped_not_retried(tmp_path, grpc_sink):
    grpc_sink.faults = [(grpc.StatusCode.INVALID_ARGUMENT, None)]
    tel = Telemetry()
    cfg = OTLPExporterConfig(endpoint=f"127.0.0.1:{grpc_sink.port}")
    await run_exporter(tmp_path, cfg, [log_batch([log_record()])], tel)
    assert grpc_sink.calls == 1
    snap = tel.snapshot("otlp")
    assert snap["mlagent_agent_dropped_items_total{reason=permanent_error,signal=logs}"] == 1


async def test_grpc_partial_success_counts_rejected_items_and_is_not_retried(tmp_path, grpc_sink):
    grpc_sink.partial_success[Signal.TRACES] = trace_service_pb2.ExportTracePartialSuccess(
        rejected_spans=2, error_message="spans too old")
    tel = Telemetry()
    cfg = OTLPExporterConfig(endpoint=f"127.0.0.1:{grpc_sink.port}")
    await run_exporter(tmp_path, cfg, [trace_batch([span(), span(), span()])], tel)
    assert grpc_sink.calls == 1
    snap = tel.snapshot("otlp")
    assert snap["mlagent_agent_dropped_items_total{reason=permanent_error,signal=traces}"] == 2
    assert snap["mlagent_agent_sent_items_total{signal=traces}"] == 1


async def test_grpc_unreachable_peer_is_retried_then_dropped_without_raising(tmp_path):
    tel = Telemetry()
    sink = GrpcSink()
    await sink.start()
    port = sink.port
    await sink.stop()  # nothing listens there any more
    cfg = OTLPExporterConfig(endpoint=f"127.0.0.1:{port}", timeout=1.0,
                             retry_on_failure=NO_RETRY)
    await run_exporter(tmp_path, cfg, [trace_batch([span()])], tel)
    snap = tel.snapshot("otlp")
    assert snap["mlagent_agent_dropped_items_total{reason=retries_exhausted,signal=traces}"] == 1


# --------------------------------------------------------------------------- HTTP failures


async def test_http_400_is_dropped_counted_and_not_retried(tmp_path, http_sink):
    status = status_pb2.Status(code=3, message="bad span")
    http_sink.responses = [(400, {"Content-Type": "application/x-protobuf"},
                            status.SerializeToString())]
    tel = Telemetry()
    cfg = OTLPExporterConfig(endpoint=f"http://127.0.0.1:{http_sink.port}",
                             protocol="http/protobuf")
    await run_exporter(tmp_path, cfg, [trace_batch([span(), span()])], tel)
    assert len(http_sink.requests) == 1
    snap = tel.snapshot("otlp")
    assert snap["mlagent_agent_dropped_items_total{reason=permanent_error,signal=traces}"] == 2
    assert "mlagent_agent_sent_items_total{signal=traces}" not in snap


@pytest.mark.parametrize("status", [429, 502, 503, 504])
async def test_http_retryable_status_honours_retry_after(tmp_path, http_sink, status):
    # A positive hint: "Retry-After: 0" counts as no hint (the 60 s backoff would apply).
    http_sink.responses = [(status, {"Retry-After": "1"}, b"busy")]
    tel = Telemetry()
    cfg = OTLPExporterConfig(endpoint=f"http://127.0.0.1:{http_sink.port}",
                             protocol="http/protobuf", retry_on_failure=SLOW_BACKOFF)
    await run_exporter(tmp_path, cfg, [metric_batch([gauge("g", [({}, 1.0)])])], tel)
    assert len(http_sink.requests) == 2
    assert len(http_sink.decoded()) == 2
    snap = tel.snapshot("otlp")
    assert snap["mlagent_agent_sent_items_total{signal=metrics}"] == 1
    assert snap["mlagent_agent_retries_total{signal=metrics}"] == 1


async def test_http_json_partial_success_is_counted(tmp_path, http_sink):
    response = logs_service_pb2.ExportLogsServiceResponse()
    response.partial_success.rejected_log_records = 1
    response.partial_success.error_message = "too big"
    http_sink.responses = [(200, {"Content-Type": "application/json"}, encode_json(response))]
    tel = Telemetry()
    cfg = OTLPExporterConfig(endpoint=f"http://127.0.0.1:{http_sink.port}", protocol="http/json")
    await run_exporter(tmp_path, cfg, [log_batch([log_record("a"), log_record("b")])], tel)
    assert len(http_sink.requests) == 1
    snap = tel.snapshot("otlp")
    assert snap["mlagent_agent_dropped_items_total{reason=permanent_error,signal=logs}"] == 1
    assert snap["mlagent_agent_sent_items_total{signal=logs}"] == 1


def test_retry_after_accepts_seconds_and_http_dates():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(formatdate(1_000_030, usegmt=True), now=1_000_000) == 30.0
    assert parse_retry_after(formatdate(999_000, usegmt=True), now=1_000_000) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


# --------------------------------------------------------------------------- TLS


def self_signed_certificate(tmp_path: Path) -> tuple[bytes, bytes, Path]:
    """A certificate for 127.0.0.1 that is its own CA: (cert PEM, key PEM, cert file)."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mlagent test")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    path = tmp_path / "ca.pem"
    path.write_bytes(cert_pem)
    return cert_pem, key_pem, path


async def test_grpc_over_tls_with_ca_file(tmp_path):
    cert_pem, key_pem, ca_file = self_signed_certificate(tmp_path)
    sink = GrpcSink()
    await sink.start(grpc.ssl_server_credentials([(key_pem, cert_pem)]))
    try:
        cfg = OTLPExporterConfig(endpoint=f"https://127.0.0.1:{sink.port}",
                                 tls=TLSConfig(ca_file=ca_file))
        await run_exporter(tmp_path, cfg, [trace_batch([span("secure")])])
    finally:
        await sink.stop()
    assert [r.resource_spans[0].scope_spans[0].spans[0].name for _, r, _ in sink.received] == [
        "secure"]


async def test_https_with_ca_file_and_refused_without_it(tmp_path):
    _, key_pem, ca_file = self_signed_certificate(tmp_path)
    (tmp_path / "key.pem").write_bytes(key_pem)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(ca_file, tmp_path / "key.pem")
    sink = HttpSink()
    await sink.start(server_ctx)
    tel = Telemetry()
    try:
        url = f"https://127.0.0.1:{sink.port}"
        await run_exporter(tmp_path, OTLPExporterConfig(
            endpoint=url, protocol="http/protobuf", tls=TLSConfig(ca_file=ca_file)),
            [log_batch([log_record("trusted")])])
        await run_exporter(tmp_path, OTLPExporterConfig(
            endpoint=url, protocol="http/protobuf", retry_on_failure=NO_RETRY),
            [log_batch([log_record("untrusted")])], tel)
    finally:
        await sink.stop()
    assert [r.resource_logs[0].scope_logs[0].log_records[0].body.string_value
            for _, r in sink.decoded()] == ["trusted"]
    snap = tel.snapshot("otlp")
    assert snap["mlagent_agent_dropped_items_total{reason=retries_exhausted,signal=logs}"] == 1


# --------------------------------------------------------------------------- config


def decode(raw: dict[str, Any]) -> tuple[OTLPExporterConfig, list[str]]:
    errors: list[str] = []
    cfg = decode_dataclass(OTLPExporterConfig, raw, "exporters.otlp", errors)
    return cfg, errors


def test_config_validation_and_tls_defaults():
    cfg, errors = decode({})
    assert errors == []
    assert (cfg.endpoint, cfg.protocol, cfg.compression) == ("127.0.0.1:4317", "grpc", "gzip")
    assert not cfg.use_tls  # loopback: plaintext by default

    cfg, errors = decode({"endpoint": "collector.example:4317", "timeout": "2s"})
    assert errors == [] and cfg.use_tls and cfg.timeout == 2.0
    cfg, _ = decode({"endpoint": "collector.example:4317", "tls": {"insecure": True}})
    assert not cfg.use_tls
    cfg, _ = decode({"endpoint": "https://localhost:4317"})
    assert cfg.use_tls

    _, errors = decode({"protocol": "http/protobuf"})
    assert errors == ["exporters.otlp.endpoint: '127.0.0.1:4317' is not an http(s) URL "
                      "(http/protobuf needs e.g. \"http://127.0.0.1:4318\")"]
    _, errors = decode({"endpoint": "localhost", "headers": {"bad name": "x"}})
    assert errors[0].startswith("exporters.otlp.endpoint: 'localhost' is not host:port")
    assert "exporters.otlp.headers.bad name: not a valid header name" in errors
    _, errors = decode({"protocol": "http", "compresion": "gzip"})
    assert any("protocol: 'http' is not one of" in e for e in errors)
    assert "exporters.otlp.compresion: unknown key (did you mean 'compression'?)" in errors


async def test_shutdown_is_safe_without_start_and_twice(tmp_path):
    exp = factory.create(settings_for("otlp", Kind.EXPORTER), OTLPExporterConfig(), {})
    await exp.shutdown()
    await exp.start(make_host(tmp_path))
    await exp.shutdown()
    await exp.shutdown()

