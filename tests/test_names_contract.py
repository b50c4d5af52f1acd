"""What the shipped Prometheus rules and Grafana dashboard query is what the agent serves.

The agent runs its embedded default config (windows shortened) through the CLI, a real
SDK application sends predictions, and every metric name that
config/prometheus-rules.yml and config/grafana-dashboard.json use must appear on the
prometheus exporter's /metrics -- except GPU metrics (no GPU here) and recording-rule
outputs.
"""

from __future__ import annotations

import json
import random
import re
import time
import urllib.request
from pathlib import Path

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from agent.service import default_config_text
from tests.conftest import free_port

ROOT = Path(__file__).parent.parent


def referenced_names() -> set[str]:
    exprs = [(ROOT / "config" / "prometheus-rules.yml").read_text()]
    dash = json.loads((ROOT / "config" / "grafana-dashboard.json").read_text())
    exprs += [t["expr"] for p in dash["panels"] for t in p["targets"]]
    names = set()
    for e in exprs:
        # Not recording-rule outputs ("service:mlagent_...:5m").
        for m in re.finditer(r"(?<![:\w])(mlagent_[a-z0-9_]+|hw_[a-z0-9_]+|system_[a-z0-9_]+)"
                             r"(?![:\w])", e):
            names.add(m.group(1))
    return names


def test_rules_and_dashboard_query_metrics_the_agent_serves(tmp_path, start_agent) -> None:
    grpc, http, prom, health = free_port(), free_port(), free_port(), free_port()
    text = (default_config_text()
            .replace("127.0.0.1:4317", f"127.0.0.1:{grpc}").replace("127.0.0.1:4318", f"127.0.0.1:{http}")
            .replace("127.0.0.1:9464", f"127.0.0.1:{prom}").replace("127.0.0.1:13133", f"127.0.0.1:{health}")
            .replace('window = "60s"', 'window = "2s"\ndecision_wait = "300ms"')
            .replace('window = "5m"', 'window = "2s"\nbaseline_size = 100\nmin_window_count = 20')
            .replace('interval = "10s"', 'interval = "1s"').replace('interval = "15s"', 'interval = "1s"')
            .replace("[service]\n", f'[service]\nstate_dir = "{tmp_path / "state"}"\n'))
    agent = start_agent(text)
    agent.wait_ready(f"127.0.0.1:{health}")
    tp = TracerProvider(resource=Resource.create({"service.name": "ranker",
                                                 "ml.model.name": "ranker",
                                                 "ml.model.version": "v1"}))
    tp.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"127.0.0.1:{grpc}",
                                                              insecure=True),
                                             schedule_delay_millis=100))
    tracer = tp.get_tracer("app")
    rnd = random.Random(7)

    def send(n: int, shift: float) -> None:
        for _ in range(n):
            with (tracer.start_as_current_span("POST /predict", kind=trace.SpanKind.SERVER),
                  tracer.start_as_current_span("inference") as s):
                s.set_attributes({"ml.prediction.label": rnd.choice(["a", "b"]),
                                  "ml.prediction.score": rnd.random(),
                                  "ml.feature.x": rnd.gauss(shift, 1)})
        tp.force_flush()

    def served() -> set[str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{prom}/metrics", timeout=5) as r:
            body = r.read().decode()
        return {line.split("{")[0].split(" ")[0] for line in body.splitlines()
                if line and not line.startswith("#")}

    # No GPU here; refusals and drops exist once they happen (a healthy run has none).
    wanted = {n for n in referenced_names() if not n.startswith("hw_gpu")} - {
        "mlagent_agent_refused_items_total", "mlagent_agent_dropped_items_total"}
    deadline = time.time() + 60
    shift = 0.0
    while time.time() < deadline and not wanted <= served():
        send(150, shift)
        shift += 0.5
        time.sleep(0.5)
    tp.shutdown()
    missing = wanted - served()
    assert not missing, f"queried but not served: {sorted(missing)}"
    assert agent.stop() == 0


def test_the_reference_extractor_sees_the_names() -> None:
    names = referenced_names()
    assert {"mlagent_latency_duration_seconds_bucket", "mlagent_drift_detected",
            "mlagent_agent_queue_size"} <= names
