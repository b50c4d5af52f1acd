"""Both Prometheus exporters inside the real agent process (``python -m agent run``):
an OTel SDK app pushes OTLP/HTTP metrics to the agent, which serves them on /metrics
and remote-writes them into a real Prometheus 2.42."""

from __future__ import annotations

import urllib.request

import pytest
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from tests.conftest import free_port
from tests.prom_server import PromServer

pytestmark = pytest.mark.integration

CONFIG = """
[receivers.otlp]
grpc.endpoint = "127.0.0.1:{grpc}"
http.endpoint = "127.0.0.1:{http}"
[exporters.prometheus]
endpoint = "127.0.0.1:{metrics}"
[exporters.prometheus_remote_write]
endpoint = "{write_url}"
retry_on_failure.initial_interval = "100ms"
[service]
state_dir = "{state}"
health.endpoint = "127.0.0.1:{health}"
[service.pipelines.metrics]
receivers = ["otlp"]
exporters = ["prometheus", "prometheus_remote_write"]
"""


async def test_sdk_metrics_reach_scrape_endpoint_and_remote_write(tmp_path, start_agent):
    grpc, http, metrics, health = free_port(), free_port(), free_port(), free_port()
    async with PromServer(tmp_path / "prom") as prom:
        agent = start_agent(CONFIG.format(grpc=grpc, http=http, metrics=metrics, health=health,
                                          write_url=prom.remote_write_url,
                                          state=tmp_path / "state"))
        agent.wait_ready(f"127.0.0.1:{health}")

        reader = PeriodicExportingMetricReader(
            OTLPMetricExporter(endpoint=f"http://127.0.0.1:{http}/v1/metrics"),
            export_interval_millis=3_600_000)
        provider = MeterProvider(resource=Resource.create(
            {"service.name": "e2e", "service.instance.id": "i-1"}), metric_readers=[reader])
        counter = provider.get_meter("e2e").create_counter("predictions", unit="{prediction}")
        counter.add(41, {"model": "m1"})
        counter.add(1, {"model": "m1"})
        assert provider.force_flush(10_000)
        provider.shutdown()

        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as r:
            text = r.read().decode()
        assert 'predictions_total{instance="i-1",job="e2e",model="m1"} 42.0' in text.splitlines()

        got = await prom.wait_for('predictions_total{job="e2e",instance="i-1"}', lambda v: v)
        assert list(got.values()) == [42.0]
        assert agent.stop() == 0
