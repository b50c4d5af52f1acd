"""The alerts exporter inside the real agent process: OTLP metrics in, a webhook out."""

from __future__ import annotations

import asyncio
import json

import aiohttp
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

from tests.conftest import free_port
from tests.notify_contract import WebhookServer


async def wait_until(pred, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_agent_evaluates_rules_and_calls_the_webhook(tmp_path, start_agent):
    http, health = free_port(), free_port()
    async with WebhookServer() as hook:
        agent = start_agent(f"""
[receivers.otlp]
http.endpoint = "127.0.0.1:{http}"
grpc.endpoint = "127.0.0.1:{free_port()}"
[exporters.alerts]
interval = "200ms"
trace_link_template = "http://jaeger:16686/trace/{{trace_id}}"
[[exporters.alerts.rules]]
name = "GpuHot"
metric = "gpu.utilization"
by = ["service.name"]
threshold = 0.9
severity = "warning"
[exporters.alerts.notifiers.webhook]
url = "{hook.url}"
[service]
state_dir = "{tmp_path / 'state'}"
health.endpoint = "127.0.0.1:{health}"
[service.pipelines.metrics]
receivers = ["otlp"]
exporters = ["alerts"]
""")
        await asyncio.to_thread(agent.wait_ready, f"127.0.0.1:{health}")

        # A process instrumented with the OTel SDK reports a hot GPU inside a traced request.
        reader = InMemoryMetricReader()
        meter = MeterProvider(metric_readers=[reader], resource=Resource.create(
            {"service.name": "ranker"})).get_meter("gpu")
        gauge = meter.create_gauge("gpu.utilization")
        with TracerProvider().get_tracer("ranker").start_as_current_span("predict") as span:
            gauge.set(0.97)  # recorded inside the span: the point's exemplar links it
            trace_id = format(span.get_span_context().trace_id, "032x")
        body = encode_metrics(reader.get_metrics_data()).SerializeToString()
        async with aiohttp.ClientSession() as s, s.post(
                f"http://127.0.0.1:{http}/v1/metrics", data=body,
                headers={"Content-Type": "application/x-protobuf"}) as r:
            assert r.status == 200

        await wait_until(lambda: hook.accepted)
        (msg,) = hook.accepted
        (alert,) = msg["alerts"]
        assert alert["status"] == "firing"
        assert alert["labels"] == {"alertname": "GpuHot", "severity": "warning",
                                   "service_name": "ranker"}
        assert alert["annotations"]["trace_url"] == f"http://jaeger:16686/trace/{trace_id}"
        assert await asyncio.to_thread(agent.stop) == 0

    state = json.loads((tmp_path / "state" / "alerts" / "alerts.json").read_text())
    assert [a["state"] for a in state["alerts"]] == ["firing"]
