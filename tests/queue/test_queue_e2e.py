"""End to end: what the agent acknowledged to an SDK survives SIGKILL during an outage.

An OpenTelemetry SDK exports spans to agent A (otlp receiver -> memory_limiter ->
otlp exporter with its default persistent queue) while A's upstream is down. A is
killed with SIGKILL, the upstream (agent B, writing to a file) comes up, A starts
again on the same state directory: every span the SDK was told was accepted must
arrive at B.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agent.component import Signal
from agent.otlpjson import decode_json
from tests.conftest import free_port

pytestmark = pytest.mark.integration

FORWARDER = """
[receivers.otlp]
grpc.endpoint = "127.0.0.1:{grpc}"
http.enabled = false
[processors.memory_limiter]
[exporters.otlp]
endpoint = "127.0.0.1:{up}"
retry_on_failure.initial_interval = "20ms"
retry_on_failure.max_interval = "100ms"
retry_on_failure.max_elapsed_time = "0s"
[service]
state_dir = "{state}"
health.endpoint = "127.0.0.1:{health}"
[service.pipelines.traces]
receivers = ["otlp"]
processors = ["memory_limiter"]
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
"""


def span_ids_at(out: Path) -> set[bytes]:
    path = out / "traces.jsonl"
    if not path.exists():
        return set()
    return {s.span_id for line in path.read_text().splitlines()
            for rs in decode_json(Signal.TRACES, line.encode()).resource_spans
            for ss in rs.scope_spans for s in ss.spans}


def test_spans_acknowledged_before_sigkill_arrive_after_restart(tmp_path, start_agent):
    grpc, up, h1, h2 = (free_port() for _ in range(4))
    fwd_cfg = FORWARDER.format(grpc=grpc, up=up, state=tmp_path / "a", health=h1)
    forwarder = start_agent(fwd_cfg, name="forwarder")
    forwarder.wait_ready(f"127.0.0.1:{h1}")

    finished = InMemorySpanExporter()
    tp = TracerProvider(resource=Resource.create({"service.name": "ranker"}))
    tp.add_span_processor(SimpleSpanProcessor(finished))
    tracer = tp.get_tracer("app")
    for i in range(200):
        with tracer.start_as_current_span("predict", attributes={"request.n": i}):
            pass
    spans = finished.get_finished_spans()
    exporter = OTLPSpanExporter(endpoint=f"127.0.0.1:{grpc}", insecure=True, timeout=10)
    acked: set[bytes] = set()
    for k in range(0, len(spans), 20):
        chunk = spans[k:k + 20]
        if exporter.export(chunk) is SpanExportResult.SUCCESS:
            acked |= {s.context.span_id.to_bytes(8, "big") for s in chunk}
    exporter.shutdown()
    assert len(acked) == 200  # a persistent queue with room accepts everything

    forwarder.proc.kill()  # SIGKILL: no shutdown, no flush
    forwarder.proc.wait()

    out = tmp_path / "out"
    backend = start_agent(BACKEND.format(up=up, out=out, state=tmp_path / "b", health=h2),
                          name="backend")
    backend.wait_ready(f"127.0.0.1:{h2}")
    again = start_agent(fwd_cfg, name="forwarder-again")
    again.wait_ready(f"127.0.0.1:{h1}")

    end = time.time() + 30
    while not acked <= span_ids_at(out) and time.time() < end:
        time.sleep(0.05)
    assert acked - span_ids_at(out) == set()
    assert again.stop() == 0
    assert backend.stop() == 0
    tp.shutdown()
