"""The latency connector inside the real agent (``python -m agent run``): two OTel SDK
services send spans over OTLP/HTTP; the critical-path share and service-graph metrics
come out of the agent's Prometheus endpoint."""

from __future__ import annotations

import re
import urllib.request

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind

from tests.conftest import free_port
from tests.test_lifecycle import wait_for

pytestmark = pytest.mark.integration

CONFIG = """
[receivers.otlp]
grpc.endpoint = "127.0.0.1:{grpc}"
http.endpoint = "127.0.0.1:{http}"
[connectors.latency]
window = "200ms"
decision_wait = "100ms"
root_timeout = "1s"
trace_sample_rate = 1.0
[exporters.prometheus]
endpoint = "127.0.0.1:{metrics}"
[service]
state_dir = "{state}"
health.endpoint = "127.0.0.1:{health}"
[service.pipelines.traces]
receivers = ["otlp"]
exporters = ["latency"]
[service.pipelines.metrics]
receivers = ["latency"]
exporters = ["prometheus"]
"""

T0 = 1_700_000_000 * 10**9
MS = 10**6


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(\S+?(?:\{.*\})?) (\S+)$", line)
        if m and not line.startswith("#"):
            out[m.group(1)] = float(m.group(2))
    return out


def find(samples: dict[str, float], name: str, **labels: str) -> float | None:
    for key, value in samples.items():
        if key.split("{", 1)[0] == name and all(f'{k}="{v}"' in key for k, v in labels.items()):
            return value
    return None


def test_sdk_spans_become_latency_metrics(tmp_path, start_agent) -> None:
    grpc, http, metrics, health = free_port(), free_port(), free_port(), free_port()
    agent = start_agent(CONFIG.format(grpc=grpc, http=http, metrics=metrics, health=health,
                                      state=tmp_path / "state"))
    agent.wait_ready(f"127.0.0.1:{health}")

    providers = []
    for name in ("gateway", "model"):
        p = TracerProvider(resource=Resource.create({"service.name": name}))
        p.add_span_processor(SimpleSpanProcessor(
            OTLPSpanExporter(endpoint=f"http://127.0.0.1:{http}/v1/traces")))
        providers.append(p)
    gw, model = (p.get_tracer("e2e") for p in providers)
    # gateway [0,100] -> client [10,90] -> model server [20,80]: on the critical path
    # the gateway spends 20 + 20 ms, the model 60 ms.
    root = gw.start_span("POST /score", kind=SpanKind.SERVER, start_time=T0)
    client = gw.start_span("call model", context=trace.set_span_in_context(root),
                           kind=SpanKind.CLIENT, start_time=T0 + 10 * MS)
    server = model.start_span("POST /predict", context=trace.set_span_in_context(client),
                              kind=SpanKind.SERVER, start_time=T0 + 20 * MS)
    server.end(end_time=T0 + 80 * MS)
    client.end(end_time=T0 + 90 * MS)
    root.end(end_time=T0 + 100 * MS)
    for p in providers:
        p.shutdown()

    def ready() -> bool:
        s = scrape(metrics)
        return find(s, "mlagent_latency_critical_path_share_ratio", service_name="model") \
            is not None and find(s, "mlagent_service_graph_requests_total") is not None

    wait_for(ready, 20, "latency metrics on /metrics")
    s = scrape(metrics)
    assert find(s, "mlagent_latency_critical_path_share_ratio", service_name="model") == \
        pytest.approx(0.6)
    assert find(s, "mlagent_latency_critical_path_share_ratio", service_name="gateway") == \
        pytest.approx(0.4)
    assert find(s, "mlagent_service_graph_requests_total", client="gateway",
                server="model") == 1
    assert find(s, "mlagent_latency_calls_total", service_name="model",
                span_name="POST /predict") == 1
    assert agent.stop() == 0
