"""The alerts exporter: rule semantics, config errors, state across restarts.

Time is a fake clock and evaluation is driven with ``evaluate_now()``, so ``for``
and ``keep_firing_for`` of minutes run in milliseconds. Notifications are observed
through the ``log`` notifier's structured lines (the default notifier).
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality, Metric

from agent.component import Kind, Signal
from agent.config import ConfigError, decode_dataclass, load_config
from agent.exporters.alerts import AlertsConfig, AlertsExporter, factory
from agent.exporters.alerts.config import load_rules_file
from agent.exporters.alerts.rules import fingerprint
from agent.exporters.alerts.series import bucket_quantile
from agent.registry import FACTORIES
from agent.telemetry import LOG, Telemetry
from agent.testing import make_host, metric_batch, settings_for

ROOT = Path(__file__).parents[2]
T0 = 1_800_000_000.0


class FakeClock:
    """Wall and monotonic time that move only when told; ``sleep`` records and advances."""

    def __init__(self, start: float = T0) -> None:
        self.now = start
        self.mono = 0.0
        self.sleeps: list[float] = []

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(seconds)
        await asyncio.sleep(0)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.mono += seconds


def decode(raw: dict[str, Any]) -> AlertsConfig:
    """Decode like the config loader does; fail the test on any error."""
    errors: list[str] = []
    cfg = decode_dataclass(AlertsConfig, raw, "exporters.alerts", errors)
    assert errors == []
    return cfg


def make_exporter(raw: dict[str, Any], clock: FakeClock, telemetry: Telemetry | None = None,
                  cid: str = "alerts") -> AlertsExporter:
    # A long interval: the periodic loop never runs; tests call evaluate_now().
    cfg = decode({"interval": "1h", **raw})
    return AlertsExporter(settings_for(cid, telemetry=telemetry or Telemetry()), cfg,
                          clock=clock)


def gauge_metric(name: str, points: list[tuple[dict[str, Any], float]], t: float,
                 exemplars: list[tuple[bytes, bytes]] = ()) -> Metric:
    """A gauge at clock time ``t``; every point carries ``exemplars`` (trace_id, span_id)."""
    m = Metric(name=name)
    for attrs, value in points:
        dp = m.gauge.data_points.add(time_unix_nano=int(t * 1e9), as_double=float(value))
        for k, v in attrs.items():
            dp.attributes.add(key=k).value.string_value = str(v)
        for trace_id, span_id in exemplars:
            dp.exemplars.add(time_unix_nano=int(t * 1e9), as_double=float(value),
                             trace_id=trace_id, span_id=span_id)
    return m


async def feed(exp: AlertsExporter, clock: FakeClock, name: str,
               points: list[tuple[dict[str, Any], float]], resource: dict[str, Any] | None = None,
               exemplars: list[tuple[bytes, bytes]] = ()) -> None:
    await exp.consume(metric_batch([gauge_metric(name, points, clock.now, exemplars)],
                                   resource=resource))


class Transitions(logging.Handler):
    """Collects the log notifier's structured lines: ``(state, labels, annotations)``."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.events: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", {})
        if fields.get("event") == "alert":
            self.events.append(fields)

    def states(self) -> list[tuple[str, str]]:
        return [(e["state"], e["alertname"]) for e in self.events]


@pytest.fixture
def transitions():
    handler = Transitions()
    old_level = LOG.level
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    yield handler
    LOG.removeHandler(handler)
    LOG.setLevel(old_level)


LATENCY_RULE = {
    "name": "LatencyHigh", "metric": "svc.latency.p99", "by": ["service.name"],
    "op": ">", "threshold": 0.5, "for": "60s", "severity": "critical",
    "labels": {"team": "ml-{{ labels.service_name }}"},
    "annotations": {"summary": "p99 of {{ labels.service_name }} is {{ value }}s"},
}


# --------------------------------------------------------------------------- rule semantics


async def test_for_keeps_alert_pending_until_it_held_the_whole_time(tmp_path, transitions):
    clock = FakeClock()
    exp = make_exporter({"rules": [LATENCY_RULE]}, clock)
    await exp.start(make_host(tmp_path))
    try:
        for _ in range(4):  # 0s, 20s, 40s: held, not yet for 60s
            await feed(exp, clock, "svc.latency.p99", [({}, 0.9)], {"service.name": "checkout"})
            await exp.evaluate_now()
            if clock.now - T0 < 60:
                assert [a.state for a in exp.alerts()] == ["pending"]
                assert transitions.states() == []
            clock.advance(20)
        # The fourth evaluation ran at 60s: it held the whole time, so it fires.
        assert transitions.states() == [("firing", "LatencyHigh")]
        fired = transitions.events[0]
        assert fired["labels"] == {"alertname": "LatencyHigh", "severity": "critical",
                                   "service_name": "checkout", "team": "ml-checkout"}
        assert fired["annotations"]["summary"] == "p99 of checkout is 0.9s"

        await feed(exp, clock, "svc.latency.p99", [({}, 0.1)], {"service.name": "checkout"})
        await exp.evaluate_now()
        assert transitions.states() == [("firing", "LatencyHigh"), ("resolved", "LatencyHigh")]
    finally:
        await exp.shutdown()


async def test_condition_breaking_during_for_restarts_the_wait(tmp_path, transitions):
    clock = FakeClock()
    exp = make_exporter({"rules": [LATENCY_RULE]}, clock)
    await exp.start(make_host(tmp_path))
    for value in (0.9, 0.9, 0.1, 0.9, 0.9, 0.9):  # 0,20,40(low),60,80,100s
        await feed(exp, clock, "svc.latency.p99", [({}, value)], {"service.name": "checkout"})
        await exp.evaluate_now()
        clock.advance(20)
    assert transitions.states() == []  # pending since 60s, so not firing before 120s
    await feed(exp, clock, "svc.latency.p99", [({}, 0.9)], {"service.name": "checkout"})
    await exp.evaluate_now()
    assert transitions.states() == [("firing", "LatencyHigh")]
    await exp.shutdown()


async def test_flapping_input_is_damped_by_keep_firing_for(tmp_path, transitions):
    clock = FakeClock()
    rule = {"name": "GpuHot", "metric": "gpu.util", "op": ">", "threshold": 0.9,
            "keep_firing_for": "60s"}
    exp = make_exporter({"rules": [rule]}, clock)
    await exp.start(make_host(tmp_path))
    # Flapping every 15 s for 3 minutes: one firing notification, no resolve.
    for i in range(12):
        await feed(exp, clock, "gpu.util", [({}, 0.95 if i % 2 == 0 else 0.5)])
        await exp.evaluate_now()
        clock.advance(15)
    assert transitions.states() == [("firing", "GpuHot")]
    # The last high value was at 150 s: it keeps firing until 60 s after that, then
    # resolves once.
    for _ in range(2):  # 180 s, 195 s
        await feed(exp, clock, "gpu.util", [({}, 0.5)])
        await exp.evaluate_now()
        assert transitions.states() == [("firing", "GpuHot")]
        clock.advance(15)
    await feed(exp, clock, "gpu.util", [({}, 0.5)])
    await exp.evaluate_now()  # 210 s
    assert transitions.states() == [("firing", "GpuHot"), ("resolved", "GpuHot")]
    await exp.shutdown()


async def test_without_keep_firing_for_the_same_input_flaps(tmp_path, transitions):
    """The counterpart of the test above: without damping, every dip resolves."""
    clock = FakeClock()
    exp = make_exporter({"rules": [{"name": "GpuHot", "metric": "gpu.util", "threshold": 0.9}]},
                        clock)
    await exp.start(make_host(tmp_path))
    for i in range(4):
        await feed(exp, clock, "gpu.util", [({}, 0.95 if i % 2 == 0 else 0.5)])
        await exp.evaluate_now()
        clock.advance(15)
    assert [s for s, _ in transitions.states()] == ["firing", "resolved", "firing", "resolved"]
    await exp.shutdown()


async def test_stale_points_do_not_count(tmp_path, transitions):
    clock = FakeClock()
    exp = make_exporter({"staleness": "5m", "rules": [
        {"name": "Hot", "metric": "gpu.util", "threshold": 0.9}]}, clock)
    await exp.start(make_host(tmp_path))
    await feed(exp, clock, "gpu.util", [({}, 0.95)])
    await exp.evaluate_now()
    assert transitions.states() == [("firing", "Hot")]
    clock.advance(299)
    await exp.evaluate_now()
    assert transitions.states() == [("firing", "Hot")]  # 299 s old: still counts
    clock.advance(2)
    await exp.evaluate_now()  # 301 s old: no data, the alert ends
    assert transitions.states() == [("firing", "Hot"), ("resolved", "Hot")]
    await exp.shutdown()


async def test_matchers_and_grouping_make_one_alert_per_group(tmp_path, transitions):
    clock = FakeClock()
    rule = {"name": "Slow", "metric": "lat", "by": ["service.name"], "aggregate": "avg",
            "threshold": 1.0,
            "matchers": {"service.name": "~chk.*|pay", "route": "!/health", "env": "=~prod"}}
    exp = make_exporter({"rules": [rule]}, clock)
    await exp.start(make_host(tmp_path))
    await feed(exp, clock, "lat", [
        ({"service.name": "chk-eu", "route": "/buy", "env": "~prod"}, 3.0),
        ({"service.name": "chk-eu", "route": "/cart", "env": "~prod"}, 1.0),   # avg 2.0 > 1
        ({"service.name": "chk-eu", "route": "/health", "env": "~prod"}, 99),  # excluded
        ({"service.name": "pay", "route": "/buy", "env": "~prod"}, 0.5),       # under
        ({"service.name": "search", "route": "/q", "env": "~prod"}, 9.0),      # no match
        ({"service.name": "chk-us", "route": "/buy", "env": "prod"}, 9.0),     # env differs
    ])
    await exp.evaluate_now()
    assert transitions.states() == [("firing", "Slow")]
    assert transitions.events[0]["labels"]["service_name"] == "chk-eu"
    assert transitions.events[0]["value"] == pytest.approx(2.0)
    await exp.shutdown()


async def test_each_resource_of_a_batch_keeps_its_own_attributes(tmp_path, transitions):
    clock = FakeClock()
    exp = make_exporter({"rules": [{"name": "Hot", "metric": "gpu.util", "by": ["host.name"],
                                    "threshold": 0.9}]}, clock)
    await exp.start(make_host(tmp_path))
    batch = metric_batch([gauge_metric("gpu.util", [({}, 0.95)], clock.now)], {"host.name": "a"})
    for host, value in (("b", 0.1), ("c", 0.99)):
        batch.extend(metric_batch([gauge_metric("gpu.util", [({}, value)], clock.now)],
                                  {"host.name": host}))
    await exp.consume(batch)
    await exp.evaluate_now()
    assert sorted(e["labels"]["host_name"] for e in transitions.events) == ["a", "c"]
    await exp.shutdown()


async def test_aggregations(tmp_path):
    clock = FakeClock()
    values = [({"i": str(i)}, v) for i, v in enumerate([1.0, 4.0, 7.0])]
    results = {}
    for agg in ("max", "min", "avg", "sum", "count"):
        exp = make_exporter({"rules": [{"name": "R", "metric": "m", "aggregate": agg,
                                        "op": ">=", "threshold": 0}]}, clock)
        await exp.start(make_host(tmp_path / agg))
        await feed(exp, clock, "m", values)
        await exp.evaluate_now()
        results[agg] = exp.alerts()[0].value
        await exp.shutdown()
    assert results == {"max": 7.0, "min": 1.0, "avg": 4.0, "sum": 12.0, "count": 3.0}


def test_bucket_quantile_interpolates_like_prometheus():
    bounds = (0.1, 0.2, 0.5, 1.0)
    counts = (10, 20, 60, 9, 1)  # 100 observations, 1 above 1.0
    assert bucket_quantile(0.5, bounds, counts) == pytest.approx(0.2 + 0.3 * (50 - 30) / 60)
    assert bucket_quantile(0.05, bounds, counts) == pytest.approx(0.05)  # first bucket from 0
    assert bucket_quantile(0.995, bounds, counts) == pytest.approx(1.0)  # overflow: top bound
    assert math.isnan(bucket_quantile(0.5, bounds, (0, 0, 0, 0, 0)))
    rng = np.random.default_rng(7)  # a fine histogram of a uniform sample: close to exact
    sample = rng.uniform(0, 1, 100_000)
    fine = tuple(np.linspace(0.001, 1, 1000))
    hist = tuple(np.histogram(sample, bins=(-np.inf, *fine, np.inf))[0].tolist())
    assert bucket_quantile(0.99, fine, hist) == pytest.approx(np.quantile(sample, 0.99), abs=2e-3)


@settings(max_examples=200, deadline=None)
@given(counts=st.lists(st.integers(0, 1000), min_size=5, max_size=5),
       q1=st.floats(0.01, 0.99), q2=st.floats(0.01, 0.99))
def test_bucket_quantile_is_monotonic_and_bounded(counts, q1, q2):
    bounds = (0.1, 0.2, 0.5, 1.0)
    lo, hi = sorted((q1, q2))
    a, b = bucket_quantile(lo, bounds, tuple(counts)), bucket_quantile(hi, bounds, tuple(counts))
    if sum(counts) == 0:
        assert math.isnan(a) and math.isnan(b)
    else:
        assert 0.0 <= a <= b <= 1.0


async def test_histogram_quantile_rule(tmp_path, transitions):
    clock = FakeClock()
    exp = make_exporter({"rules": [{"name": "P99", "metric": "http.server.duration",
                                    "quantile": 0.99, "threshold": 0.5}]}, clock)
    await exp.start(make_host(tmp_path))
    m = Metric(name="http.server.duration")
    m.histogram.aggregation_temporality = AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA
    dp = m.histogram.data_points.add(time_unix_nano=int(clock.now * 1e9), count=100, sum=30.0)
    dp.explicit_bounds.extend([0.1, 0.25, 0.5, 1.0])
    dp.bucket_counts.extend([50, 40, 5, 5, 0])  # p99 in (0.5, 1.0]
    await exp.consume(metric_batch([m]))
    await exp.evaluate_now()
    assert transitions.states() == [("firing", "P99")]
    assert transitions.events[0]["value"] == pytest.approx(0.5 + 0.5 * (99 - 95) / 5)
    await exp.shutdown()


def _counter(name: str, points: list[tuple[dict[str, str], float]], t: float) -> Metric:
    m = Metric(name=name)
    m.sum.is_monotonic = True
    m.sum.aggregation_temporality = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
    for attrs, v in points:
        dp = m.sum.data_points.add(time_unix_nano=int(t * 1e9), start_time_unix_nano=int(T0 * 1e9),
                                   as_double=v)
        for k, val in attrs.items():
            dp.attributes.add(key=k).value.string_value = val
    return m


async def test_error_rate_as_a_ratio_of_counter_rates(tmp_path, transitions):
    clock = FakeClock()
    rule = {"name": "Errors", "metric": "errors", "rate": True, "aggregate": "sum",
            "divide_by": {"metric": "calls"}, "by": ["service.name"], "threshold": 0.05}
    exp = make_exporter({"rules": [rule]}, clock)
    await exp.start(make_host(tmp_path))
    a, b = {"service.name": "a", "op": "x"}, {"service.name": "b", "op": "y"}
    clock.advance(10)
    await exp.consume(metric_batch([_counter("errors", [(a, 100), (b, 100)], clock.now),
                                    _counter("calls", [(a, 1000), (b, 1000)], clock.now)]))
    await exp.evaluate_now()  # one point per series: no rate yet, however large the totals
    assert transitions.states() == []
    clock.advance(60)
    # a: 30 errors / 300 calls in the minute (10 %); b: 1 / 300.
    await exp.consume(metric_batch([_counter("errors", [(a, 130), (b, 101)], clock.now),
                                    _counter("calls", [(a, 1300), (b, 1300)], clock.now)]))
    await exp.evaluate_now()
    assert transitions.states() == [("firing", "Errors")]
    assert transitions.events[0]["labels"]["service_name"] == "a"
    assert transitions.events[0]["value"] == pytest.approx(0.1)
    await exp.shutdown()


async def test_exemplar_trace_ids_become_annotations_and_links(tmp_path, transitions):
    clock = FakeClock()
    exp = make_exporter({"trace_link_template": "http://jaeger:16686/trace/{trace_id}",
                         "max_exemplars": 2,
                         "rules": [{"name": "Slow", "metric": "lat", "threshold": 1}]}, clock)
    await exp.start(make_host(tmp_path))
    old, new, calm = (bytes([i]) * 16 for i in (1, 2, 3))
    await feed(exp, clock, "lat", [({"op": "a"}, 5.0)], exemplars=[(old, b"\x01" * 8)])
    clock.advance(1)
    await feed(exp, clock, "lat", [({"op": "a"}, 6.0)], exemplars=[(new, b"\x02" * 8)])
    await feed(exp, clock, "lat", [({"op": "b"}, 0.1)], exemplars=[(calm, b"\x03" * 8)])
    await exp.evaluate_now()
    ann = transitions.events[0]["annotations"]
    # Newest first, only from the series over the threshold.
    assert ann["trace_ids"] == f"{new.hex()},{old.hex()}"
    assert ann["trace_url"] == f"http://jaeger:16686/trace/{new.hex()}"
    await exp.shutdown()


async def test_series_limit_is_counted(tmp_path):
    clock, tel = FakeClock(), Telemetry()
    exp = make_exporter({"max_series": 2, "rules": [{"name": "R", "metric": "m"}]}, clock, tel)
    await exp.start(make_host(tmp_path))
    await feed(exp, clock, "m", [({"i": str(i)}, 1.0) for i in range(5)])
    await feed(exp, clock, "other", [({"i": str(i)}, 1.0) for i in range(5)])  # not watched
    snap = tel.snapshot("alerts")
    assert snap["mlagent_agent_dropped_items_total{reason=alerts_series_limit,signal=metrics}"] == 3
    assert snap["mlagent_agent_accepted_items_total{signal=metrics}"] == 10
    await exp.shutdown()


async def test_malformed_points_are_ignored_without_alerts_or_errors(tmp_path, transitions):
    clock = FakeClock()
    exp = make_exporter({"rules": [
        {"name": "Q", "metric": "h", "quantile": 0.99, "op": ">=", "threshold": 0},
        {"name": "V", "metric": "g", "op": ">=", "threshold": 0},
        {"name": "Mean", "metric": "e", "stat": "mean", "op": ">=", "threshold": 0},
    ]}, clock)
    await exp.start(make_host(tmp_path))
    h = Metric(name="h")
    bad = h.histogram.data_points.add(time_unix_nano=1, count=5)
    bad.explicit_bounds.extend([1.0, 2.0])
    bad.bucket_counts.extend([5])  # fewer buckets than bounds + 1
    h.histogram.data_points.add(time_unix_nano=1, count=0).explicit_bounds.append(1.0)
    g = Metric(name="g")
    g.gauge.data_points.add(time_unix_nano=1)  # no value at all
    g.gauge.data_points.add(time_unix_nano=1, as_double=math.nan).attributes.add(key="k")
    g.gauge.data_points.add(time_unix_nano=1, as_int=5, flags=1)  # flagged: no recorded value
    e = Metric(name="e")
    e.exponential_histogram.data_points.add(time_unix_nano=1, count=0, sum=0.0)
    empty = Metric(name="g")  # no data field set
    await exp.consume(metric_batch([h, g, e, empty]))
    await exp.evaluate_now()
    assert transitions.states() == []
    assert exp.alerts() == []
    await exp.shutdown()


# --------------------------------------------------------------------------- restarts


async def test_restart_during_for_keeps_the_pending_time(tmp_path, transitions):
    clock, host = FakeClock(), make_host(tmp_path)
    exp = make_exporter({"rules": [LATENCY_RULE]}, clock)
    await exp.start(host)
    await feed(exp, clock, "svc.latency.p99", [({}, 0.9)], {"service.name": "checkout"})
    await exp.evaluate_now()
    clock.advance(30)
    await exp.evaluate_now()
    await exp.shutdown()
    assert (tmp_path / "alerts" / "alerts.json").exists()

    clock.advance(15)  # down for 15 s; the new instance has no series yet
    exp2 = make_exporter({"rules": [LATENCY_RULE]}, clock)
    await exp2.start(host)
    await exp2.evaluate_now()  # no data yet: the restored alert is held, not dropped
    assert [(a.state, a.active_since) for a in exp2.alerts()] == [("pending", T0)]
    await feed(exp2, clock, "svc.latency.p99", [({}, 0.9)], {"service.name": "checkout"})
    await exp2.evaluate_now()
    assert transitions.states() == []  # 45 s since it became active
    clock.advance(15)
    await feed(exp2, clock, "svc.latency.p99", [({}, 0.9)], {"service.name": "checkout"})
    await exp2.evaluate_now()  # 60 s since it first became active, before the restart
    assert transitions.states() == [("firing", "LatencyHigh")]
    await exp2.shutdown()


async def test_restart_does_not_forget_to_resolve(tmp_path, transitions):
    clock, host = FakeClock(), make_host(tmp_path)
    rule = {"name": "Hot", "metric": "gpu.util", "threshold": 0.9}
    exp = make_exporter({"rules": [rule]}, clock)
    await exp.start(host)
    await feed(exp, clock, "gpu.util", [({}, 0.95)])
    await exp.evaluate_now()
    await exp.shutdown()

    clock.advance(30)
    exp2 = make_exporter({"rules": [rule]}, clock)
    await exp2.start(host)
    await feed(exp2, clock, "gpu.util", [({}, 0.2)])
    await exp2.evaluate_now()
    assert transitions.states() == [("firing", "Hot"), ("resolved", "Hot")]
    assert transitions.events[1]["fingerprint"] == transitions.events[0]["fingerprint"]
    await exp2.shutdown()


async def test_restored_alert_resolves_when_its_data_never_returns(tmp_path, transitions):
    clock, host = FakeClock(), make_host(tmp_path)
    rule = {"name": "Hot", "metric": "gpu.util", "threshold": 0.9}
    exp = make_exporter({"rules": [rule]}, clock)
    await exp.start(host)
    await feed(exp, clock, "gpu.util", [({}, 0.95)])
    await exp.evaluate_now()
    await exp.shutdown()
    exp2 = make_exporter({"rules": [rule], "restore_grace": "60s"}, clock)
    await exp2.start(host)
    clock.advance(59)
    await exp2.evaluate_now()
    assert transitions.states() == [("firing", "Hot")]
    clock.advance(2)
    await exp2.evaluate_now()
    assert transitions.states() == [("firing", "Hot"), ("resolved", "Hot")]
    await exp2.shutdown()


async def test_alerts_of_a_removed_rule_resolve(tmp_path, transitions):
    clock, host = FakeClock(), make_host(tmp_path)
    exp = make_exporter({"rules": [{"name": "Old", "metric": "m"}]}, clock)
    await exp.start(host)
    await feed(exp, clock, "m", [({}, 1.0)])
    await exp.evaluate_now()
    await exp.shutdown()
    exp2 = make_exporter({"rules": [{"name": "New", "metric": "m", "threshold": 5}]}, clock)
    await exp2.start(host)
    await exp2.evaluate_now()
    assert transitions.states() == [("firing", "Old"), ("resolved", "Old")]
    await exp2.shutdown()


async def test_corrupt_state_file_starts_empty(tmp_path, transitions):
    host = make_host(tmp_path)
    (tmp_path / "alerts").mkdir()
    (tmp_path / "alerts" / "alerts.json").write_text("{not json")
    clock = FakeClock()
    exp = make_exporter({"rules": [{"name": "Hot", "metric": "m"}]}, clock)
    await exp.start(host)
    await feed(exp, clock, "m", [({}, 1.0)])
    await exp.evaluate_now()
    assert transitions.states() == [("firing", "Hot")]
    await exp.shutdown()


def test_fingerprint_is_stable_and_order_independent():
    a = fingerprint({"alertname": "X", "service_name": "checkout"})
    assert a == fingerprint({"service_name": "checkout", "alertname": "X"})
    assert a != fingerprint({"alertname": "X", "service_name": "cart"})
    assert a == "9d81ce94306db895"  # a changed hash would orphan PagerDuty incidents


# --------------------------------------------------------------------------- configuration


def _errors(raw: dict[str, Any]) -> list[str]:
    errors: list[str] = []
    decode_dataclass(AlertsConfig, raw, "exporters.alerts", errors)
    return errors


def test_config_errors_carry_their_paths():
    errors = _errors({
        "rules": [
            {"name": "A", "metric": "m", "for": "soon"},
            {"name": "B", "metric": "m", "op": "=>"},
            {"name": "A", "metric": "m", "labels": {"bad.name": "x", "v": "{{ value }}"},
             "annotations": {"summary": "{{ valeu }}"}, "thresold": 1},
            {"metric": "m", "quantile": 1.5, "matchers": {"x": "~("}},
        ],
        "notifiers": {"slak": {}, "pagerduty": {"url": "events.pagerduty.com"},
                      "slack": {"webhook": "https://hooks.slack.com/x"},
                      "alertmanager": {"urls": []}},
        "interval": "0s",
    })
    expected = [
        "exporters.alerts.interval: must be positive",
        "exporters.alerts.rules[0].for: 'soon' is not a duration",
        "exporters.alerts.rules[1].op: '=>' is not one of",
        "exporters.alerts.rules[2].thresold: unknown key (did you mean 'threshold'?)",
        "exporters.alerts.rules[3].name: is required",
        "exporters.alerts.rules[3].quantile: must be within 0..1",
        "exporters.alerts.rules[3].matchers.x: invalid regular expression",
        "exporters.alerts.notifiers.slak: unknown notifier type 'slak' (did you mean 'slack'?)",
        "exporters.alerts.notifiers.pagerduty.url: 'events.pagerduty.com' is not an http",
        "exporters.alerts.notifiers.pagerduty.routing_key: is required",
        "exporters.alerts.notifiers.slack.webhook: unknown key (did you mean 'webhook_url'?)",
        "exporters.alerts.notifiers.alertmanager.urls: at least one Alertmanager URL",
    ]
    for prefix in expected:
        assert any(e.startswith(prefix) for e in errors), (prefix, errors)
    # A rule with an unknown key is not validated further, so rule [2]'s other problems
    # surface once the typo is fixed:
    errors = _errors({"rules": [{"name": "A", "metric": "m"}, {
        "name": "A", "metric": "m", "labels": {"bad.name": "x", "v": "{{ value }}"},
        "annotations": {"summary": "{{ valeu }}"}}]})
    for prefix in ("exporters.alerts.rules[1].labels.bad.name: label names must match",
                   "exporters.alerts.rules[1].labels.v: {{ value }} is not allowed in a label",
                   "exporters.alerts.rules[1].annotations.summary: unknown placeholder "
                   "{{ valeu }} (did you mean 'value'?)",
                   "exporters.alerts.rules[1].name: 'A' is already the name of rule [0]"):
        assert any(e.startswith(prefix) for e in errors), (prefix, errors)


def test_annotation_names_must_be_valid_alertmanager_names(tmp_path):
    rule = {"name": "GpuHot", "metric": "m",
            "annotations": {"runbook-url": "http://wiki/{{ alertname }}", "summary": "hot"}}
    assert _errors({"rules": [rule]}) == [
        "exporters.alerts.rules[0].annotations.runbook-url: rule 'GpuHot': annotation names "
        "must match [a-zA-Z_][a-zA-Z0-9_]* (Alertmanager refuses the alert otherwise), "
        "e.g. 'runbook_url'"]
    # The same check in a rules file, which fails start with the file named.
    path = tmp_path / "rules.toml"
    path.write_text('[[rules]]\nname = "GpuHot"\nmetric = "m"\n'
                    'annotations = { "runbook-url" = "http://wiki" }\n')
    with pytest.raises(ConfigError) as info:
        load_rules_file(path)
    assert info.value.source == str(path)
    assert [e.split(":")[0] for e in info.value.errors] == ["rules[0].annotations.runbook-url"]


@dataclass
class _NoConfig:
    pass


class _SourceFactory:
    """A stand-in receiver, so this test needs no other component of the registry."""

    type = "metrics_source"
    kind = Kind.RECEIVER
    config_class = _NoConfig
    signals = frozenset({Signal.METRICS})
    output_signals: frozenset[Signal] = frozenset()


REGISTRY = {Kind.RECEIVER: {"metrics_source": _SourceFactory()},
            Kind.EXPORTER: {"alerts": factory}}


def test_alerts_factory_is_registered():
    assert "agent.exporters.alerts:factory" in FACTORIES


def test_full_agent_config_with_rules_and_for_key():
    text = """
[receivers.metrics_source]
[exporters.alerts]
interval = "30s"
trace_link_template = "http://jaeger:16686/trace/{trace_id}"
[[exporters.alerts.rules]]
name = "LatencyHigh"
metric = "mlagent.latency.quantile"
matchers = { quantile = "0.99" }
by = ["service.name"]
threshold = 0.5
for = "5m"
[exporters.alerts.notifiers.slack]
webhook_url = "https://hooks.slack.com/services/T/B/X"
[exporters.alerts.notifiers."alertmanager/ha"]
urls = ["http://am1:9093", "http://am2:9093"]
[service.pipelines.metrics]
receivers = ["metrics_source"]
exporters = ["alerts"]
"""
    cfg = load_config(text, REGISTRY)
    alerts = cfg.component("exporters", "alerts")
    assert alerts.factory is factory
    exp = AlertsExporter(settings_for("alerts"), alerts.config)
    assert exp.rules[0].cfg.for_ == 300.0
    assert [n.id for n in exp.notifiers] == ["slack", "alertmanager/ha"]
    assert len(exp.notifiers[1].channels) == 2

    with pytest.raises(ConfigError) as e:
        load_config(text.replace('for = "5m"', 'for = "5 minutes"'), REGISTRY)
    assert any(err.startswith("exporters.alerts.rules[0].for: '5 minutes' is not a duration")
               for err in e.value.errors), e.value.errors


async def test_invalid_rules_file_fails_start_with_path_tagged_errors(tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rules]]\nname = "A"\nmetric = "m"\n[[rules]]\nname = "B"\n'
                     'metric = "m"\nop = "=>"\nfor = "later"\n')
    exp = make_exporter({"rules_file": str(rules)}, FakeClock())
    with pytest.raises(ConfigError) as e:
        await exp.start(make_host(tmp_path))
    assert e.value.source == str(rules)
    assert any(err.startswith("rules[1].op: '=>' is not one of") for err in e.value.errors)
    assert any(err.startswith("rules[1].for: 'later' is not a duration") for err in e.value.errors)
    await exp.shutdown()

    missing = make_exporter({"rules_file": str(tmp_path / "nope.toml")}, FakeClock())
    with pytest.raises(ConfigError, match="cannot read rules file"):
        await missing.start(make_host(tmp_path))


async def test_rules_file_rules_are_evaluated(tmp_path, transitions):
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rules]]\nname = "FromFile"\nmetric = "m"\nthreshold = 1\n')
    clock = FakeClock()
    exp = make_exporter({"rules_file": str(rules)}, clock)
    await exp.start(make_host(tmp_path))
    await feed(exp, clock, "m", [({}, 2.0)])
    await exp.evaluate_now()
    assert transitions.states() == [("firing", "FromFile")]
    await exp.shutdown()


def test_default_rules_file_is_valid_and_covers_ml_operations():
    rules = load_rules_file(ROOT / "config" / "alerts.toml")
    metrics = {r.metric for r in rules}
    assert {"mlagent.latency.quantile", "mlagent.latency.errors", "mlagent.drift.detected",
            "hw.gpu.utilization", "hw.gpu.memory.usage", "mlagent.agent.send_failed_items",
            "mlagent.agent.queue_size", "mlagent.agent.refused_items"} <= metrics
    assert all(r.for_ > 0 for r in rules)


async def test_shutdown_is_idempotent_and_safe_without_start():
    exp = make_exporter({}, FakeClock())
    await exp.shutdown()
    await exp.shutdown()
