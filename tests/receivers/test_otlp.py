"""The ``otlp`` receiver against the real OpenTelemetry SDK exporters and raw clients.

Each test starts the receiver in-process on ephemeral 127.0.0.1 ports with
``agent.testing.Sink`` consumers. The SDK exporters are synchronous, so they run in a
thread (``asyncio.to_thread``) while the receiver serves on the test's event loop.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import random
import resource
import socket
import struct
import tomllib
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link

from agent.component import Kind, PermanentError, RetryableError, Signal
from agent.config import decode_dataclass
from agent.otlpjson import encode_json
from agent.receivers.otlp import factory
from agent.receivers.otlp.config import GrpcConfig, HttpConfig, OtlpReceiverConfig
from agent.receivers.otlp.http_server import Body, BodyTooLarge
from agent.telemetry import Telemetry
from agent.testing import Sink, make_host, settings_for, span, trace_batch

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
TRACE_SERVICE = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
LOGS_SERVICE = "/opentelemetry.proto.collector.logs.v1.LogsService/Export"
MIB = 1 << 20


# --------------------------------------------------------------------------- fixtures


@dataclass
class Running:
    """A started receiver, its sinks and its telemetry."""

    receiver: object
    sinks: dict[Signal, Sink]
    telemetry: Telemetry

    @property
    def grpc(self) -> str:
        return self.receiver.grpc.endpoint

    def url(self, path: str = "/v1/traces") -> str:
        return f"http://{self.receiver.http.endpoint}{path}"

    def refused(self, reason: str, transport: str = "http") -> float:
        """Refused requests counted for ``reason`` (any signal)."""
        snap = self.telemetry.snapshot("otlp")
        return sum(v for k, v in snap.items() if k.startswith(
            "mlagent_agent_receiver_refused_requests_total{")
            and f"reason={reason}," in k and f"transport={transport}" in k)

    def counted(self, name: str, reason: str | None = None) -> float:
        snap = self.telemetry.snapshot("otlp")
        return sum(v for k, v in snap.items() if k.startswith(f"mlagent_agent_{name}_total{{")
                   and (reason is None or f"reason={reason}" in k))


async def start_receiver(tmp_path, signals=tuple(Signal), **http_overrides) -> Running:
    telemetry = Telemetry()
    sinks = {s: Sink() for s in signals}
    config = OtlpReceiverConfig(grpc=GrpcConfig(endpoint="127.0.0.1:0"),
                                http=HttpConfig(endpoint="127.0.0.1:0", **http_overrides),
                                shutdown_grace=5.0)
    receiver = factory.create(settings_for("otlp", Kind.RECEIVER, telemetry), config, sinks)
    await receiver.start(make_host(tmp_path))
    return Running(receiver, sinks, telemetry)


async def stop(receiver) -> None:
    """Shut a receiver down and wait until it has closed."""
    await receiver.shutdown()
    await receiver.wait_closed()


@pytest.fixture
async def rx(tmp_path) -> AsyncIterator[Running]:
    running = await start_receiver(tmp_path)
    yield running
    await stop(running.receiver)


async def post(url: str, body: bytes, content_type: str = PROTOBUF,
               **headers: str) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession(auto_decompress=False) as session, session.post(
            url, data=body, headers={"Content-Type": content_type, **headers}) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def status_body(data: bytes, content_type: str) -> status_pb2.Status:
    """A ``google.rpc.Status`` error body, in the content type it was sent in."""
    status = status_pb2.Status()
    if content_type == JSON:
        obj = json.loads(data)
        status.code, status.message = obj.get("code", 0), obj.get("message", "")
    else:
        status.ParseFromString(data)
    return status


def valid_traces(name: str = "ok") -> bytes:
    return trace_batch([span(name)], resource={"service.name": "svc"}).to_bytes()


async def assert_still_serves(rx: Running) -> None:
    """A valid request after bad ones still succeeds and arrives."""
    sink = rx.receiver.next[Signal.TRACES]
    before = len(sink.spans())
    status, _, _ = await post(rx.url(), valid_traces("after"))
    assert status == 200
    assert len(sink.spans()) == before + 1


# --------------------------------------------------------------------------- SDK data


@dataclass
class SdkData:
    spans: list
    logs: list
    metrics: object


def sdk_data() -> SdkData:
    """Spans (with a parent, a link, attributes), a log in a span, and a histogram."""
    res = Resource.create({"service.name": "classifier", "ml.model.name": "resnet"})
    span_out = InMemorySpanExporter()
    tracers = TracerProvider(resource=res)
    tracers.add_span_processor(SimpleSpanProcessor(span_out))
    log_out = InMemoryLogRecordExporter()
    loggers = LoggerProvider(resource=res)
    loggers.add_log_record_processor(SimpleLogRecordProcessor(log_out))
    reader = InMemoryMetricReader()
    meters = MeterProvider(resource=res, metric_readers=[reader])

    tracer = tracers.get_tracer("test")
    histogram = meters.get_meter("test").create_histogram("latency", unit="s")
    with tracer.start_as_current_span("predict") as parent:
        for i in range(3):
            with tracer.start_as_current_span(
                    f"step{i}", links=[Link(parent.get_span_context())],
                    attributes={"ml.prediction.score": 0.5 + i / 10, "ml.prediction.label": "cat",
                                "tokens": [1, 2, i]}):
                loggers.get_logger("test").emit(body=f"step {i}", attributes={"i": i})
                histogram.record(0.1 * (i + 1), {"route": "/predict"})
    data = SdkData(list(span_out.get_finished_spans()), [r for r in log_out.get_finished_logs()],
                   reader.get_metrics_data())
    for provider in (tracers, loggers, meters):
        provider.shutdown()
    return data


def grpc_exporters(endpoint: str, compression: grpc.Compression):
    from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    kw = {"endpoint": endpoint, "insecure": True, "compression": compression, "timeout": 10}
    return OTLPSpanExporter(**kw), OTLPLogExporter(**kw), OTLPMetricExporter(**kw)


def http_exporters(rx: Running, gzipped: bool):
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    c = Compression.Gzip if gzipped else Compression.NoCompression
    return (OTLPSpanExporter(endpoint=rx.url("/v1/traces"), compression=c, timeout=10),
            OTLPLogExporter(endpoint=rx.url("/v1/logs"), compression=c, timeout=10),
            OTLPMetricExporter(endpoint=rx.url("/v1/metrics"), compression=c, timeout=10))


async def export_all(exporters, data: SdkData) -> list:
    span_exp, log_exp, metric_exp = exporters
    try:
        return [await asyncio.to_thread(span_exp.export, data.spans),
                await asyncio.to_thread(log_exp.export, data.logs),
                await asyncio.to_thread(metric_exp.export, data.metrics)]
    finally:
        for exporter in exporters:
            await asyncio.to_thread(exporter.shutdown)


def assert_arrived_intact(rx: Running, data: SdkData) -> None:
    """What the sinks hold is exactly the protobuf the SDK encoded."""
    (traces,) = rx.sinks[Signal.TRACES].batches
    (logs,) = rx.sinks[Signal.LOGS].batches
    (metrics,) = rx.sinks[Signal.METRICS].batches
    assert traces.request == encode_spans(data.spans)
    assert logs.request == encode_logs(data.logs)
    assert metrics.request == encode_metrics(data.metrics)
    # Spot checks that the comparison is about real content.
    spans = rx.sinks[Signal.TRACES].spans()
    assert len(spans) == 4 and all(len(s.trace_id) == 16 for s in spans)
    assert {s.trace_id for s in spans} == {data.spans[0].context.trace_id.to_bytes(16, "big")}
    records = rx.sinks[Signal.LOGS].log_records()
    assert [r.body.string_value for r in records] == ["step 0", "step 1", "step 2"]
    assert records[0].trace_id == spans[0].trace_id
    assert rx.counted("accepted_items") == 4 + 3 + 1


# --------------------------------------------------------------------------- happy paths


@pytest.mark.parametrize("compression", [grpc.Compression.NoCompression, grpc.Compression.Gzip])
async def test_sdk_grpc_exporters_deliver_everything_intact(rx, compression):
    data = sdk_data()
    results = await export_all(grpc_exporters(rx.grpc, compression), data)
    assert all(r.name == "SUCCESS" for r in results)
    assert_arrived_intact(rx, data)


@pytest.mark.parametrize("gzipped", [False, True])
async def test_sdk_http_exporters_deliver_everything_intact(rx, gzipped):
    data = sdk_data()
    results = await export_all(http_exporters(rx, gzipped), data)
    assert all(r.name == "SUCCESS" for r in results)
    assert_arrived_intact(rx, data)


@pytest.mark.parametrize("gzipped", [False, True])
async def test_otlp_json_with_hex_ids_round_trips_over_http(rx, gzipped):
    data = sdk_data()
    expected = encode_spans(data.spans)
    body = encode_json(expected)
    assert data.spans[0].context.trace_id.to_bytes(16, "big").hex().encode() in body
    headers = {"Content-Encoding": "gzip"} if gzipped else {}
    status, resp_headers, resp = await post(rx.url(), gzip.compress(body) if gzipped else body,
                                            JSON, **headers)
    assert (status, resp_headers["Content-Type"], resp) == (200, JSON, b"{}")
    assert rx.sinks[Signal.TRACES].batches[0].request == expected


async def test_protobuf_requests_get_protobuf_responses(rx):
    status, headers, body = await post(rx.url(), valid_traces())
    assert (status, headers["Content-Type"]) == (200, PROTOBUF)
    assert ExportTraceServiceResponse.FromString(body) == ExportTraceServiceResponse()


async def test_start_logs_both_endpoints(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mlagent")
    running = await start_receiver(tmp_path)
    try:
        assert any(running.grpc in r.getMessage() and running.receiver.http.endpoint
                   in r.getMessage() for r in caplog.records)
    finally:
        await stop(running.receiver)


# --------------------------------------------------------------------------- bad input, HTTP


def gzip_bomb(mib: int) -> bytes:
    """A valid gzip stream of ``mib`` MiB of zeros, about 1/1000 of that long, built
    without compressing it all: after a full flush the compressor turns the same input
    chunk into the same block, so one block is made and repeated."""
    chunk = bytes(MIB)
    c = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    first = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    end = c.flush()[:-8]  # the final block, without the trailer (which is for 2 chunks)
    crc = 0
    for _ in range(mib):
        crc = zlib.crc32(chunk, crc)
    return first + block * (mib - 1) + end + struct.pack("<II", crc, (mib * MIB) & 0xFFFFFFFF)


def test_gzip_bomb_helper_builds_a_valid_stream():
    assert gzip.decompress(gzip_bomb(5)) == bytes(5 * MIB)


@settings(max_examples=100, deadline=None)
@given(data=st.lists(st.binary(max_size=3000) | st.integers(0, 20_000).map(bytes),  # zeros: a bomb
                     min_size=1, max_size=3),
       limit=st.integers(1, 8000), cuts=st.lists(st.integers(1, 500), max_size=20))
def test_body_gunzips_any_chunking_exactly_up_to_the_limit(data, limit, cuts):
    """Several gzip members back to back (RFC 1952), cut anywhere, decode to their
    concatenation; over the limit is ``BodyTooLarge``, never a bigger buffer."""
    stream = b"".join(gzip.compress(part) for part in data)
    expected = b"".join(data)
    body = Body(limit=max(limit, len(stream)), gzip=True)
    pieces, pos = [], 0
    for cut in cuts:
        pieces.append(stream[pos:pos + cut])
        pos += cut
    pieces.append(stream[pos:])
    try:
        for piece in pieces:
            body.feed(piece)
            assert len(body.data) <= body.limit + 1
        assert body.finish() == expected
        assert len(expected) <= body.limit
    except BodyTooLarge:
        assert len(expected) > body.limit
        assert len(body.data) <= body.limit + 1  # stopped at the limit, not after inflating


TRUNCATED = valid_traces("x" * 50)[:-7]
RANDOM = random.Random(7).randbytes(2000)
BAD_ID_JSON = json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [
    {"traceId": "abcdef", "spanId": "0102030405060708", "name": "x"}]}]}]}).encode()


@pytest.mark.parametrize("case, path, body, content_type, headers, status, reason, needle", [
    ("random bytes", "/v1/traces", RANDOM, PROTOBUF, {}, 400, "decode_error", "decode"),
    ("truncated protobuf", "/v1/traces", TRUNCATED, PROTOBUF, {}, 400, "decode_error", "decode"),
    ("malformed JSON", "/v1/traces", b'{"resourceSpans": [', JSON, {}, 400, "decode_error",
     "invalid JSON"),
    ("JSON id of the wrong length", "/v1/traces", BAD_ID_JSON, JSON, {}, 400, "decode_error",
     "traceId"),
    ("invalid gzip", "/v1/traces", b"\x1f\x8b\x08\x00garbage-garbage", PROTOBUF,
     {"Content-Encoding": "gzip"}, 400, "decode_error", "gzip"),
    ("truncated gzip", "/v1/traces", gzip.compress(valid_traces())[:-10], PROTOBUF,
     {"Content-Encoding": "gzip"}, 400, "decode_error", "truncated"),
    ("wrong content type", "/v1/traces", valid_traces(), "text/plain", {}, 415,
     "unsupported_media_type", "Content-Type"),
    ("unsupported encoding", "/v1/traces", valid_traces(), PROTOBUF, {"Content-Encoding": "br"},
     415, "unsupported_media_type", "Content-Encoding"),
    ("unknown path", "/v1/trace", valid_traces(), PROTOBUF, {}, 404, "unknown_path", "/v1/traces"),
])
async def test_bad_http_input_is_refused_with_the_right_code(
        rx, case, path, body, content_type, headers, status, reason, needle):
    got, resp_headers, resp = await post(rx.url(path), body, content_type, **headers)
    assert got == status, case
    reply_type = content_type if content_type in (PROTOBUF, JSON) else JSON
    assert resp_headers["Content-Type"] == reply_type
    error = status_body(resp, reply_type)
    assert needle in error.message
    assert rx.sinks[Signal.TRACES].batches == []
    assert rx.refused(reason) == 1
    await assert_still_serves(rx)


@pytest.mark.parametrize("framing", [b"Content-Length: 1000\r\n\r\n0123456789",
                                     b"Transfer-Encoding: chunked\r\n\r\n5\r\nab"])
async def test_client_leaving_mid_body_is_counted_and_harmless(rx, framing):
    host, port = rx.receiver.http.endpoint.rsplit(":", 1)
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
                 + framing)
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    await rx.sinks[Signal.TRACES].wait_for(lambda _: rx.refused("incomplete_body") == 1)
    assert rx.sinks[Signal.TRACES].batches == []
    await assert_still_serves(rx)


async def test_wrong_method_is_405_with_allow(rx):
    async with aiohttp.ClientSession() as session, session.get(rx.url()) as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "POST"
    assert rx.refused("method_not_allowed") == 1
    await assert_still_serves(rx)


async def test_gzip_bomb_is_413_without_expanding_it(rx):
    bomb = gzip_bomb(1024)  # 1 GiB
    assert len(bomb) < 2 * MIB
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    status, _, body = await post(rx.url(), bomb, PROTOBUF, **{"Content-Encoding": "gzip"})
    rss_growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert status == 413
    assert "max_request_size" in status_body(body, PROTOBUF).message
    assert rss_growth_mib < 256  # the GiB was never materialised
    assert rx.refused("too_large") == 1
    await assert_still_serves(rx)


async def test_body_over_the_limit_is_413_with_or_without_content_length(tmp_path):
    rx = await start_receiver(tmp_path, max_request_size=64 * 1024)
    try:
        big = trace_batch([span("x" * 70_000)]).to_bytes()
        status, _, _ = await post(rx.url(), big)
        assert status == 413

        async def chunked():  # no Content-Length: the limit is found while reading
            for i in range(0, len(big), 8192):
                yield big[i:i + 8192]

        async with aiohttp.ClientSession() as session, session.post(
                rx.url(), data=chunked(), headers={"Content-Type": PROTOBUF}) as resp:
            assert resp.status == 413
        # Just under the limit is fine.
        ok = trace_batch([span("x" * 60_000)]).to_bytes()
        assert (await post(rx.url(), ok))[0] == 200
        assert rx.refused("too_large") == 2
    finally:
        await stop(rx.receiver)


async def test_signal_without_pipeline_is_404_and_unimplemented(tmp_path):
    rx = await start_receiver(tmp_path, signals=(Signal.TRACES,))
    try:
        status, _, body = await post(rx.url("/v1/logs"), b"")
        assert status == 404
        assert "no logs pipeline" in status_body(body, PROTOBUF).message
        async with grpc.aio.insecure_channel(rx.grpc) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await channel.unary_unary(LOGS_SERVICE)(b"")
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "no logs pipeline" in err.value.details()
        assert rx.refused("no_pipeline", "grpc") == 1
        await assert_still_serves(rx)
    finally:
        await stop(rx.receiver)


# --------------------------------------------------------------------------- bad input, gRPC


async def grpc_export(endpoint: str, body: bytes, **kw):
    async with grpc.aio.insecure_channel(endpoint) as channel:
        call = channel.unary_unary(TRACE_SERVICE,
                                   response_deserializer=ExportTraceServiceResponse.FromString)
        return await call(body, **kw)


@pytest.mark.parametrize("body", [RANDOM, TRUNCATED])
async def test_grpc_undecodable_request_is_invalid_argument(rx, body):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await grpc_export(rx.grpc, body)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cannot decode" in err.value.details()
    assert rx.refused("decode_error", "grpc") == 1
    assert await grpc_export(rx.grpc, valid_traces()) == ExportTraceServiceResponse()
    assert len(rx.sinks[Signal.TRACES].spans()) == 1


async def test_grpc_size_limit_applies_after_decompression(rx):
    # 5 MiB of zeros compresses to a few KiB; gRPC's limit (4 MiB) is on what it inflates to.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await grpc_export(rx.grpc, bytes(5 * MIB), compression=grpc.Compression.Gzip)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rx.sinks[Signal.TRACES].batches == []
    assert await grpc_export(rx.grpc, valid_traces(),
                             compression=grpc.Compression.Gzip) == ExportTraceServiceResponse()


# --------------------------------------------------------------------------- consumer verdicts


class Flaky(Sink):
    """Raises ``errors`` in turn, then accepts."""

    def __init__(self, *errors: BaseException) -> None:
        super().__init__()
        self.errors = list(errors)
        self.calls = 0

    async def consume(self, batch) -> None:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        await super().consume(batch)


async def test_retryable_error_is_503_with_retry_after(rx):
    rx.receiver.next[Signal.TRACES] = Flaky(RetryableError("queue full", retry_after=2.5))
    status, headers, body = await post(rx.url(), valid_traces())
    assert status == 503
    assert headers["Retry-After"] == "3"
    assert status_body(body, PROTOBUF).message == "queue full"
    assert rx.counted("refused_items", "retryable") == 1


async def test_retryable_error_marked_429_is_429(rx):
    error = RetryableError("memory limit reached")
    error.http_status = 429
    rx.receiver.next[Signal.TRACES] = Flaky(error)
    status, headers, _ = await post(rx.url(), valid_traces())
    assert (status, headers["Retry-After"]) == (429, "1")


async def test_grpc_retryable_error_is_unavailable_with_retry_info(rx):
    rx.receiver.next[Signal.TRACES] = Flaky(RetryableError("backend down", retry_after=7))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await grpc_export(rx.grpc, valid_traces())
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    trailers = dict(err.value.trailing_metadata())
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    assert status.code == code_pb2.UNAVAILABLE and status.message == "backend down"
    info = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info)
    assert info.retry_delay.seconds == 7


async def test_sdk_grpc_exporter_retries_on_unavailable_and_gets_through(rx):
    flaky = Flaky(RetryableError("busy", retry_after=0.01))
    rx.receiver.next[Signal.TRACES] = flaky
    data = sdk_data()
    span_exporter = grpc_exporters(rx.grpc, grpc.Compression.NoCompression)[0]
    try:
        result = await asyncio.to_thread(span_exporter.export, data.spans)
    finally:
        span_exporter.shutdown()
    assert result.name == "SUCCESS"
    assert flaky.calls == 2
    assert len(flaky.spans()) == 4
    assert rx.counted("refused_items", "retryable") == 4
    assert rx.counted("accepted_items") == 4


async def test_permanent_error_is_a_partial_success_on_both_transports(rx):
    rx.receiver.next[Signal.TRACES] = Flaky(PermanentError("bad spans", rejected=1),
                                            PermanentError("all bad"))
    two_spans = trace_batch([span("a"), span("b")]).to_bytes()
    status, _, body = await post(rx.url(), two_spans)
    assert status == 200
    partial = ExportTraceServiceResponse.FromString(body).partial_success
    assert (partial.rejected_spans, partial.error_message) == (1, "bad spans")

    response = await grpc_export(rx.grpc, two_spans)
    assert response.partial_success.rejected_spans == 2
    assert response.partial_success.error_message == "all bad"
    assert rx.counted("refused_items", "permanent") == 3
    assert rx.counted("accepted_items") == 1


async def test_a_partial_rejection_by_one_of_two_exporters_is_not_reported_to_the_sender(rx):
    """Exporter A took all 10 spans, exporter B's peer rejected 1: the agent has the data,
    so the sender is not told (nor counted) that 10 spans were rejected."""
    from agent.graph import Fanout

    took_all, part = Sink(), Flaky(PermanentError("peer rejected 1 item", rejected=1))
    rx.receiver.next[Signal.TRACES] = Fanout([took_all, part])
    ten = trace_batch([span(f"s{i}") for i in range(10)]).to_bytes()
    response = await grpc_export(rx.grpc, ten)
    assert response.partial_success.rejected_spans == 0
    assert took_all.item_count == 10
    assert rx.counted("accepted_items") == 10 and rx.counted("refused_items") == 0


async def test_permanent_error_partial_success_in_json(rx):
    rx.receiver.next[Signal.METRICS] = Flaky(PermanentError("no"))
    metrics = encode_metrics(sdk_data().metrics)
    status, _, body = await post(rx.url("/v1/metrics"), encode_json(metrics), JSON)
    assert status == 200
    assert json.loads(body) == {"partialSuccess": {"rejectedDataPoints": "1", "errorMessage": "no"}}


async def test_unexpected_consumer_failure_is_500_and_internal(rx):
    rx.receiver.next[Signal.TRACES] = Flaky(RuntimeError("bug"), RuntimeError("bug"))
    status, _, body = await post(rx.url(), valid_traces())
    assert status == 500
    assert "not accepted" in status_body(body, PROTOBUF).message
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await grpc_export(rx.grpc, valid_traces())
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert rx.counted("refused_items", "internal") == 2
    await assert_still_serves(rx)


# --------------------------------------------------------------------------- lifecycle


def busy_port() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock, sock.getsockname()[1]


@pytest.mark.parametrize("transport", ["grpc", "http"])
async def test_bind_failure_is_a_clear_error_and_leaves_nothing_open(tmp_path, transport):
    holder, port = busy_port()
    free, free_port = busy_port()
    free.close()
    endpoints = {"grpc": f"127.0.0.1:{free_port}", "http": "127.0.0.1:0"}
    endpoints[transport] = f"127.0.0.1:{port}"
    config = OtlpReceiverConfig(grpc=GrpcConfig(endpoint=endpoints["grpc"]),
                                http=HttpConfig(endpoint=endpoints["http"]))
    receiver = factory.create(settings_for("otlp", Kind.RECEIVER), config,
                              {Signal.TRACES: Sink()})
    try:
        with pytest.raises(OSError) as err:
            await receiver.start(make_host(tmp_path))
        assert str(err.value) == f"cannot listen on 127.0.0.1:{port}: address in use"
        # The gRPC listener that did start was closed again.
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", free_port))
    finally:
        holder.close()
        await stop(receiver)


class Held(Sink):
    """Holds every batch until ``release`` is set; ``arrived`` is set once ``n`` wait."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.waiting = 0
        self.arrived, self.release = asyncio.Event(), asyncio.Event()

    async def consume(self, batch) -> None:
        self.waiting += 1
        if self.waiting == self.n:
            self.arrived.set()
        await self.release.wait()
        await super().consume(batch)


async def test_shutdown_stops_intake_at_once_and_lets_requests_in_flight_finish(tmp_path):
    # The requests in flight wait on the pipeline (as on a batch processor that has not
    # flushed yet), which is stopped only after the receiver: shutdown must not wait.
    rx = await start_receiver(tmp_path)
    held = rx.receiver.next[Signal.TRACES] = Held(2)
    http_request = asyncio.create_task(post(rx.url(), valid_traces("http")))
    grpc_request = asyncio.create_task(grpc_export(rx.grpc, valid_traces("grpc")))
    await asyncio.wait_for(held.arrived.wait(), 10)

    await asyncio.wait_for(rx.receiver.shutdown(), 10)
    with pytest.raises(aiohttp.ClientConnectionError):
        await post(rx.url(), valid_traces("late"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await grpc_export(rx.grpc, valid_traces("late"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    held.release.set()  # the pipeline drains
    assert (await http_request)[0] == 200
    assert await grpc_request == ExportTraceServiceResponse()
    await asyncio.wait_for(rx.receiver.wait_closed(), 10)
    assert sorted(s.name for s in held.spans()) == ["grpc", "http"]


async def test_requests_in_a_flush_cut_by_the_drain_deadline_are_told_to_retry(tmp_path):
    """SIGTERM with a backend too slow to drain: each sender hears 503 / UNAVAILABLE."""
    from agent.processors.batch import BatchProcessor
    from agent.processors.batch.config import BatchConfig

    rx = await start_receiver(tmp_path)
    held = Held(1)  # the exporter's put never returns within the deadline
    batcher = BatchProcessor(settings_for("batch"), BatchConfig(max_in_flight=1), held)
    rx.receiver.next[Signal.TRACES] = batcher
    first = asyncio.create_task(post(rx.url(), valid_traces("http")))
    await asyncio.wait_for(held.arrived.wait(), 10)
    second = asyncio.create_task(grpc_export(rx.grpc, valid_traces("grpc")))
    while batcher._pending is None:  # the gRPC request waits for the next flush
        await asyncio.sleep(0.01)
    await rx.receiver.shutdown()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(batcher.shutdown(), 0.1)  # the graph's drain deadline
    status, headers, body = await asyncio.wait_for(first, 10)
    assert (status, status_body(body, PROTOBUF).message) == (503, "agent is shutting down")
    assert "Retry-After" in headers
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await asyncio.wait_for(second, 10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert rx.counted("refused_items", "retryable") == 2
    await asyncio.wait_for(rx.receiver.wait_closed(), 10)


async def test_a_cancellation_from_downstream_is_refused_but_our_own_propagates(tmp_path):
    """A stray CancelledError from the pipeline is a retryable refusal; cancelling the
    request's own handler (client gone, grace over) still cancels it, uncounted."""

    class CancelledBelow(Sink):
        async def consume(self, batch) -> None:
            raise asyncio.CancelledError

    rx = await start_receiver(tmp_path)
    try:
        rx.receiver.next[Signal.TRACES] = CancelledBelow()
        status, _, _ = await post(rx.url(), valid_traces())
        assert status == 503
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await grpc_export(rx.grpc, valid_traces())
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert rx.counted("refused_items", "retryable") == 2

        held = rx.receiver.next[Signal.TRACES] = Held(1)
        request = asyncio.create_task(rx.receiver.export("grpc", trace_batch([span("a")])))
        await asyncio.wait_for(held.arrived.wait(), 10)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        assert rx.counted("refused_items") == 2
    finally:
        await stop(rx.receiver)


async def test_requests_still_in_flight_after_the_grace_period_are_cancelled(tmp_path):
    rx = await start_receiver(tmp_path)
    rx.receiver.config.shutdown_grace = 0.1
    held = rx.receiver.next[Signal.TRACES] = Held(2)
    http_request = asyncio.create_task(post(rx.url(), valid_traces()))
    grpc_request = asyncio.create_task(grpc_export(rx.grpc, valid_traces()))
    await asyncio.wait_for(held.arrived.wait(), 10)

    await stop(rx.receiver)  # returns although the pipeline never drains
    with pytest.raises(aiohttp.ClientError):
        await http_request
    with pytest.raises(grpc.aio.AioRpcError):
        await grpc_request
    assert held.batches == []


async def test_a_second_receiver_cannot_share_the_first_ones_grpc_port(tmp_path):
    # gRPC would allow it (SO_REUSEPORT) and split the traffic between the two.
    first = await start_receiver(tmp_path)
    config = OtlpReceiverConfig(grpc=GrpcConfig(endpoint=first.grpc), http=HttpConfig(enabled=False))
    second = factory.create(settings_for("otlp", Kind.RECEIVER), config, {Signal.TRACES: Sink()})
    try:
        with pytest.raises(OSError, match="address in use"):
            await second.start(make_host(tmp_path))
    finally:
        await stop(second)
        await stop(first.receiver)


async def test_requests_over_the_concurrency_limit_are_told_to_retry(tmp_path):
    telemetry = Telemetry()
    config = OtlpReceiverConfig(
        grpc=GrpcConfig(endpoint="127.0.0.1:0", max_concurrent_requests=1),
        http=HttpConfig(endpoint="127.0.0.1:0", max_concurrent_requests=1))
    held = Held(1)
    receiver = factory.create(settings_for("otlp", Kind.RECEIVER, telemetry), config,
                              {Signal.TRACES: held})
    await receiver.start(make_host(tmp_path))
    rx = Running(receiver, {Signal.TRACES: held}, telemetry)
    try:
        first_http = asyncio.create_task(post(rx.url(), valid_traces()))
        await asyncio.wait_for(held.arrived.wait(), 10)
        status, headers, _ = await post(rx.url(), valid_traces())
        assert (status, headers["Retry-After"]) == (503, "1")

        held.arrived.clear()
        held.n = 2
        first_grpc = asyncio.create_task(grpc_export(rx.grpc, valid_traces()))
        await asyncio.wait_for(held.arrived.wait(), 10)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await grpc_export(rx.grpc, valid_traces())
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "google.rpc.retryinfo-bin" in dict(err.value.trailing_metadata())

        held.release.set()
        assert (await first_http)[0] == 200
        assert await first_grpc == ExportTraceServiceResponse()
        assert rx.refused("too_many_requests") == rx.refused("too_many_requests", "grpc") == 1
        await assert_still_serves(rx)
    finally:
        await stop(receiver)


async def test_a_new_receiver_binds_the_same_ports_after_shutdown(tmp_path):
    """What a config reload does: stop the old receiver, start a new one on its ports."""
    first = await start_receiver(tmp_path)
    endpoints = {"grpc": first.grpc, "http": first.receiver.http.endpoint}
    assert (await post(first.url(), valid_traces()))[0] == 200
    assert await grpc_export(first.grpc, valid_traces()) == ExportTraceServiceResponse()
    await stop(first.receiver)

    config = OtlpReceiverConfig(grpc=GrpcConfig(endpoint=endpoints["grpc"]),
                                http=HttpConfig(endpoint=endpoints["http"]))
    sink = Sink()
    second = factory.create(settings_for("otlp", Kind.RECEIVER), config, {Signal.TRACES: sink})
    await second.start(make_host(tmp_path))
    try:
        assert (await post(f"http://{endpoints['http']}/v1/traces", valid_traces()))[0] == 200
        assert await grpc_export(endpoints["grpc"], valid_traces()) == ExportTraceServiceResponse()
        assert len(sink.spans()) == 2
    finally:
        await stop(second)


async def test_shutdown_is_idempotent_and_safe_without_start(tmp_path):
    receiver = factory.create(settings_for("otlp", Kind.RECEIVER), OtlpReceiverConfig(),
                              {Signal.TRACES: Sink()})
    await stop(receiver)
    rx = await start_receiver(tmp_path)
    await stop(rx.receiver)
    await stop(rx.receiver)  # again: nothing happens
    with pytest.raises(aiohttp.ClientConnectionError):
        await post(rx.url(), valid_traces())


# --------------------------------------------------------------------------- config


def load(text: str) -> tuple[OtlpReceiverConfig, list[str]]:
    errors: list[str] = []
    config = decode_dataclass(OtlpReceiverConfig, tomllib.loads(text), "receivers.otlp", errors)
    return config, errors


def test_default_config():
    config, errors = load("")
    assert errors == []
    assert (config.grpc.endpoint, config.http.endpoint) == ("127.0.0.1:4317", "127.0.0.1:4318")
    assert (config.grpc.max_request_size, config.http.max_request_size) == (4 * MIB, 20 * MIB)
    assert (config.http.traces_url_path, config.http.metrics_url_path,
            config.http.logs_url_path) == ("/v1/traces", "/v1/metrics", "/v1/logs")


def test_config_values_are_parsed():
    config, errors = load('grpc.enabled = false\nhttp.endpoint = "0.0.0.0:14318"\n'
                          'http.max_request_size = "1MiB"\nhttp.logs_url_path = "/otlp/logs"\n'
                          'shutdown_grace = "250ms"\n')
    assert errors == []
    assert not config.grpc.enabled
    assert (config.http.endpoint, config.http.max_request_size) == ("0.0.0.0:14318", MIB)
    assert (config.http.logs_url_path, config.shutdown_grace) == ("/otlp/logs", 0.25)


@pytest.mark.parametrize("text, error", [
    ("grpc.enabled = false\nhttp.enabled = false",
     "receivers.otlp.grpc.enabled: at least one of grpc and http must be enabled"),
    ('http.traces_url_path = "v1/traces"',
     "receivers.otlp.http.traces_url_path: 'v1/traces' must start with '/'"),
    ('http.logs_url_path = "/v1/traces"',
     "receivers.otlp.http.traces_url_path: the three URL paths must differ"),
    ('http.endpoint = "127.0.0.1:4317"',
     "receivers.otlp.http.endpoint: '127.0.0.1:4317' is also the grpc endpoint"),
    ('grpc.endpoint = "localhost"', "receivers.otlp.grpc.endpoint: 'localhost' is not host:port"),
    ("grpc.max_request_size = 0", "receivers.otlp.grpc.max_request_size: must be positive"),
    ('grpc.max_request_size = "2GiB"',
     "receivers.otlp.grpc.max_request_size: must be under 2GiB (a gRPC limit)"),
    ("http.max_concurrent_requests = 0",
     "receivers.otlp.http.max_concurrent_requests: must be positive"),
    ('http.max_requst_size = "1MiB"',
     "receivers.otlp.http.max_requst_size: unknown key (did you mean 'max_request_size'?)"),
])
def test_config_errors_name_their_key(text, error):
    assert error in load(text)[1]


def test_factory_is_registered():
    from agent.registry import factories

    assert factories()[Kind.RECEIVER]["otlp"] is factory
