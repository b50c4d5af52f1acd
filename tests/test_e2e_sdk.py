"""A real OpenTelemetry SDK application -> agent A -> otlp exporter -> agent B -> file.

Both agents run through the CLI as processes. Every span, log record and metric point
the application produced must arrive with its ids, attributes and resource intact,
over gRPC and over HTTP.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter as GrpcLogExporter
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
    OTLPMetricExporter as GrpcMetricExporter,
)
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as GrpcSpanExporter,
)
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter as HttpLogExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
    OTLPMetricExporter as HttpMetricExporter,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as HttpSpanExporter,
)
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from agent.component import Signal
from agent.otlpjson import decode_json
from tests.conftest import free_port
from tests.test_lifecycle import wait_for

FORWARDER = """
[receivers.otlp]
grpc.endpoint = "127.0.0.1:{grpc}"
http.endpoint = "127.0.0.1:{http}"
[processors.batch]
timeout = "50ms"
[exporters.otlp]
endpoint = "127.0.0.1:{up}"
sending_queue.persistent = false
[service]
state_dir = "{state}"
health.endpoint = "127.0.0.1:{health}"
[service.pipelines.traces]
receivers = ["otlp"]
processors = ["batch"]
exporters = ["otlp"]
[service.pipelines.metrics]
receivers = ["otlp"]
processors = ["batch"]
exporters = ["otlp"]
[service.pipelines.logs]
receivers = ["otlp"]
processors = ["batch"]
exporters = ["otlp"]
"""

BACKEND = """
[receivers.otlp]
grpc.endpoint = "127.0.0.1:{up}"
http.enabled = false
[exporters.file]
path = "{out}/{{signal}}.jsonl"
[service]
state_dir = "{state}"
health.endpoint = "127.0.0.1:{health}"
[service.pipelines.traces]
receivers = ["otlp"]
exporters = ["file"]
[service.pipelines.metrics]
receivers = ["otlp"]
exporters = ["file"]
[service.pipelines.logs]
receivers = ["otlp"]
exporters = ["file"]
"""


def read(out: Path, signal: Signal) -> list:
    path = out / f"{signal}.jsonl"
    if not path.exists():
        return []
    return [decode_json(signal, line.encode()) for line in path.read_text().splitlines()]


def spans(out: Path) -> dict[bytes, tuple]:
    found = {}
    for req in read(out, Signal.TRACES):
        for rs in req.resource_spans:
            res = {kv.key: kv.value for kv in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    found[s.span_id] = (s, res)
    return found


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_sdk_traces_logs_metrics_arrive_intact(tmp_path, start_agent, transport) -> None:
    grpc, http, up, h1, h2 = (free_port() for _ in range(5))
    out = tmp_path / "out"
    backend = start_agent(BACKEND.format(up=up, out=out, state=tmp_path / "b", health=h2),
                          name="backend")
    backend.wait_ready(f"127.0.0.1:{h2}")
    fwd = start_agent(FORWARDER.format(grpc=grpc, http=http, up=up, state=tmp_path / "a",
                                       health=h1), name="forwarder")
    fwd.wait_ready(f"127.0.0.1:{h1}")

    if transport == "grpc":
        span_exp = GrpcSpanExporter(endpoint=f"127.0.0.1:{grpc}", insecure=True)
        log_exp = GrpcLogExporter(endpoint=f"127.0.0.1:{grpc}", insecure=True)
        metric_exp = GrpcMetricExporter(endpoint=f"127.0.0.1:{grpc}", insecure=True)
    else:
        base = f"http://127.0.0.1:{http}"
        span_exp = HttpSpanExporter(endpoint=f"{base}/v1/traces")
        log_exp = HttpLogExporter(endpoint=f"{base}/v1/logs")
        metric_exp = HttpMetricExporter(endpoint=f"{base}/v1/metrics")
    resource = Resource.create({"service.name": "ranker", "ml.model.version": "v7",
                                "deployment.environment": "test"})
    tp = TracerProvider(resource=resource)
    tp.add_span_processor(BatchSpanProcessor(span_exp))
    lp = LoggerProvider(resource=resource)
    lp.add_log_record_processor(BatchLogRecordProcessor(log_exp))
    reader = PeriodicExportingMetricReader(metric_exp, export_interval_millis=3_600_000)
    mp = MeterProvider(resource=resource, metric_readers=[reader])

    tracer = tp.get_tracer("app")
    logger = logging.getLogger(f"app-{transport}")
    logger.propagate = False
    logger.addHandler(LoggingHandler(logger_provider=lp))
    logger.setLevel(logging.INFO)
    counter = mp.get_meter("app").create_counter("predictions", unit="1")
    made = {}
    for i in range(50):
        with tracer.start_as_current_span("predict", attributes={"ml.prediction.score": i / 50,
                                                                "request.n": i}) as sp:
            with tracer.start_as_current_span("inference"):
                pass
            logger.info("scored request %d", i)
            counter.add(1, {"label": "click" if i % 2 else "skip"})
            made[sp.get_span_context().span_id.to_bytes(8, "big")] = (
                sp.get_span_context().trace_id.to_bytes(16, "big"), i)
    tp.force_flush()
    lp.force_flush()
    reader.collect()
    mp.force_flush()

    wait_for(lambda: len(spans(out)) >= 100, timeout=30, what="100 spans at the backend")
    got = spans(out)
    assert len(got) == 100
    for span_id, (trace_id, i) in made.items():
        s, res = got[span_id]
        assert s.trace_id == trace_id and s.name == "predict"
        attrs = {kv.key: kv.value for kv in s.attributes}
        assert attrs["request.n"].int_value == i
        assert attrs["ml.prediction.score"].double_value == pytest.approx(i / 50)
        assert res["service.name"].string_value == "ranker"
        assert res["ml.model.version"].string_value == "v7"
    children = [s for s, _ in got.values() if s.name == "inference"]
    assert {c.parent_span_id for c in children} == set(made)

    def log_records():
        return [(r, {kv.key: kv.value for kv in rl.resource.attributes})
                for req in read(out, Signal.LOGS) for rl in req.resource_logs
                for sl in rl.scope_logs for r in sl.log_records]

    wait_for(lambda: len(log_records()) >= 50, timeout=30, what="50 log records")
    recs = log_records()
    assert len(recs) == 50
    by_span = {r.span_id: r for r, _ in recs}
    assert set(by_span) == set(made)  # trace context kept on every record
    for span_id, (trace_id, i) in made.items():
        assert by_span[span_id].trace_id == trace_id
        assert by_span[span_id].body.string_value == f"scored request {i}"
    assert all(res["service.name"].string_value == "ranker" for _, res in recs)

    def points():
        return {dp.attributes[0].value.string_value: dp.as_int
                for req in read(out, Signal.METRICS) for rm in req.resource_metrics
                for sm in rm.scope_metrics for m in sm.metrics if m.name == "predictions"
                for dp in m.sum.data_points}

    wait_for(lambda: points() == {"click": 25, "skip": 25}, timeout=30, what="metric points")
    tp.shutdown()
    lp.shutdown()
    mp.shutdown()
    assert fwd.stop() == 0 and backend.stop() == 0
