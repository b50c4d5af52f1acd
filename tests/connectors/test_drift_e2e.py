"""The drift connector in a running agent: SDK spans over OTLP/HTTP -> drift -> file.

Windows are a day long here, so the only window closes deterministically: at
shutdown, when the connector flushes what it holds into the file exporter. Three
runs on one state directory: learn the baseline; same distribution (no drift, no log
record); shifted distribution (drift, with a log record naming the new spans).
"""

from __future__ import annotations

import numpy as np
import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from agent.component import Signal
from agent.otlpjson import decode_json
from agent.pdata import attributes_to_dict
from tests.conftest import free_port

pytestmark = pytest.mark.integration

CONFIG = """
[receivers.otlp]
grpc.endpoint = "127.0.0.1:{grpc}"
http.endpoint = "127.0.0.1:{http}"
[connectors.drift]
window = "24h"
baseline_size = 300
min_window_count = 100
[exporters.file]
path = "{out}/{{signal}}.jsonl"
[service]
state_dir = "{state}"
health.endpoint = "127.0.0.1:{health}"
[service.pipelines.traces]
receivers = ["otlp"]
exporters = ["drift"]
[service.pipelines.metrics]
receivers = ["drift"]
exporters = ["file"]
[service.pipelines.logs]
receivers = ["drift"]
exporters = ["file"]
"""


def send(http: int, rng: np.random.Generator, n: int, shift: float) -> set[bytes]:
    """``n`` prediction spans from a real SDK app; returns their trace ids."""
    exporter = OTLPSpanExporter(endpoint=f"http://127.0.0.1:{http}/v1/traces")
    tp = TracerProvider(resource=Resource.create({"service.name": "pricing",
                                                  "ml.model.name": "gbm",
                                                  "ml.model.version": "12"}))
    tp.add_span_processor(BatchSpanProcessor(exporter))
    tracer = tp.get_tracer("app")
    ids = set()
    for x in rng.normal(shift, 1.0, n):
        with tracer.start_as_current_span("predict", attributes={
                "ml.prediction.label": "high" if x > 0.5 else "low",
                "ml.prediction.score": float(rng.beta(8, 2)), "ml.feature.x": float(x)}) as sp:
            ids.add(sp.get_span_context().trace_id.to_bytes(16, "big"))
    assert tp.force_flush(30_000)  # acknowledged: the connector has counted them
    tp.shutdown()
    return ids


def detected(out) -> dict[str, float]:
    """The last window's verdicts, from the metrics file."""
    verdicts: dict[str, float] = {}
    path = out / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        req = decode_json(Signal.METRICS, line.encode())
        for rm in req.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name == "mlagent.drift.detected":
                        for dp in m.gauge.data_points:
                            verdicts[attributes_to_dict(dp.attributes)["kind"]] = dp.as_double
    return verdicts


def drift_records(out) -> list:
    path = out / "logs.jsonl"
    return [r for line in (path.read_text().splitlines() if path.exists() else [])
            for rl in decode_json(Signal.LOGS, line.encode()).resource_logs
            for sl in rl.scope_logs for r in sl.log_records]


def test_drift_in_a_running_agent(tmp_path, start_agent) -> None:
    rng = np.random.default_rng(3)
    grpc, http, health = free_port(), free_port(), free_port()
    text = CONFIG.format(grpc=grpc, http=http, health=health, out=tmp_path / "out",
                         state=tmp_path / "state")

    def run(n: int, shift: float, name: str) -> set[bytes]:
        agent = start_agent(text, name=name)
        agent.wait_ready(f"127.0.0.1:{health}")
        ids = send(http, rng, n, shift)
        assert agent.stop() == 0, agent.log()
        return ids

    run(300, 0.0, "learn")
    assert list((tmp_path / "state" / "references").glob("gbm-12-*.json"))
    run(300, 0.0, "same")  # restarted: the learned baseline is reused, not re-learned
    assert detected(tmp_path / "out") == {"prediction": 0.0, "data": 0.0, "confidence": 0.0}
    assert drift_records(tmp_path / "out") == []
    shifted = run(300, 1.0, "shifted")
    verdicts = detected(tmp_path / "out")
    assert verdicts["data"] == 1.0 and verdicts["prediction"] == 1.0
    records = drift_records(tmp_path / "out")
    kinds = {attributes_to_dict(r.attributes)["mlagent.drift.kind"] for r in records}
    assert kinds == {"data", "prediction"}
    for r in records:
        assert r.trace_id in shifted
        assert attributes_to_dict(r.attributes)["event.name"] == "mlagent.drift"
