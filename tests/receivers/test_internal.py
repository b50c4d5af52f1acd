"""The internal receiver turns the agent's self-metrics into OTLP metrics."""

from __future__ import annotations

from agent.component import Host
from agent.pdata import get_attribute
from agent.receivers.internal import InternalConfig, InternalReceiver
from agent.telemetry import Telemetry
from agent.testing import Sink, settings_for


async def test_self_metrics_become_otlp(tmp_path) -> None:
    tel = Telemetry()
    tel.component("exporters.otlp").dropped("traces", 7, "permanent_error")
    tel.component("receivers.otlp").accepted("traces", 512)
    tel.component("exporters.otlp").queue("traces", size=3, nbytes=100, capacity=10, oldest_age=1.5)
    sink = Sink()
    r = InternalReceiver(settings_for("internal"), InternalConfig(interval=3600), sink)
    await r.start(Host(state_dir=tmp_path, telemetry=tel))
    await r.emit()
    await r.shutdown()
    metrics = {m.name: m for m in sink.metrics()}
    dropped = metrics["mlagent.agent.dropped_items"]
    assert dropped.sum.is_monotonic
    (dp,) = dropped.sum.data_points
    assert dp.as_double == 7
    assert get_attribute(dp.attributes, "reason") == "permanent_error"
    assert get_attribute(dp.attributes, "component") == "exporters.otlp"
    assert metrics["mlagent.agent.accepted_items"].sum.data_points[0].as_double == 512
    assert metrics["mlagent.agent.queue_size"].gauge.data_points[0].as_double == 3


async def test_prometheus_names_match_the_health_endpoint(tmp_path) -> None:
    """Through the prometheus exporter the self-metrics keep the names /metrics serves."""
    from agent.component import Kind
    from agent.config import decode_dataclass
    from agent.exporters.prometheus import factory as prom_factory

    tel = Telemetry()
    tel.component("exporters.otlp").queue("traces", size=3, nbytes=100, capacity=10, oldest_age=1.5)
    tel.component("receivers.otlp").accepted("traces", 5)
    sink = Sink()
    r = InternalReceiver(settings_for("internal"), InternalConfig(interval=3600), sink)
    await r.start(Host(state_dir=tmp_path, telemetry=tel))
    await r.emit()
    await r.shutdown()
    errors: list[str] = []
    cfg = decode_dataclass(prom_factory.config_class, {"endpoint": "127.0.0.1:0"}, "p", errors)
    exp = prom_factory.create(settings_for("prometheus", Kind.EXPORTER), cfg, {})
    for b in sink.batches:
        await exp.consume(b)
    text = exp.store.render(openmetrics=False).decode()
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
             if line and not line.startswith("#")}
    assert {"mlagent_agent_queue_size", "mlagent_agent_queue_oldest_age_seconds",
            "mlagent_agent_accepted_items_total"} <= names
