"""Alertmanager: the real Alertmanager 0.25 for what it shows, a recorder for the send schedule.

The real-server tests keep the fake clock a little behind real time, because
Alertmanager judges ``startsAt``/``endsAt`` by its own clock: an alert resolved "now"
on the fake clock must be in the past for Alertmanager too.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

import aiohttp
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

from agent.config import parse_duration
from agent.exporters.alerts.notifiers.base import rfc3339
from agent.pdata import MetricBatch
from agent.telemetry import Telemetry
from agent.testing import make_host
from tests.am_server import running_alertmanager
from tests.exporters.test_alerts import FakeClock, feed, make_exporter
from tests.notify_contract import ContractServer

LABEL_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


def valid_name(name: str) -> bool:
    """Alertmanager's rule for label and annotation names: ``[a-zA-Z_][a-zA-Z0-9_]*``."""
    return bool(name) and set(name) <= LABEL_NAME_OK and not name[0].isdigit()


def ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class AlertmanagerRecorder(ContractServer):
    """Records ``POST /api/v2/alerts`` bodies; refuses what Alertmanager refuses."""

    path = "/api/v2/alerts"

    def validate(self, body: Any) -> list[str]:
        if not isinstance(body, list):
            return ["body must be a list of alerts"]
        problems = []
        for a in body:
            labels = a.get("labels") or {}
            if not labels:
                problems.append("invalid label set: empty")
            problems += [f"invalid label set: invalid name {k!r}" for k in labels
                         if not valid_name(k)]
            problems += [f'invalid annotations: invalid name "{k}"'
                         for k in a.get("annotations") or {} if not valid_name(k)]
            for key in ("startsAt", "endsAt"):
                ts(a[key])  # RFC 3339 or the test fails
        return problems


async def test_resend_schedule_endsat_and_resolved_retention(tmp_path):
    clock = FakeClock()
    t0 = clock.now
    async with AlertmanagerRecorder() as am:
        exp = make_exporter({"interval": "15s", "rules": [
            {"name": "Hot", "metric": "m", "threshold": 1}], "notifiers": {"alertmanager": {
                "urls": [am.url.removesuffix("/api/v2/alerts")], "resend_interval": "1m",
                "resolved_retention": "3m"}}}, clock)
        await exp.start(make_host(tmp_path))
        sent_at: list[tuple[float, str, float]] = []  # (when, state, endsAt - when)
        for step in range(0, 24):  # every 15 s for 6 minutes
            clock.now = t0 + 15 * step
            await feed(exp, clock, "m", [({}, 5.0 if step < 6 else 0.0)])  # resolves at 90 s
            before = len(am.accepted)
            await exp.evaluate_now()
            await exp.flush()
            for body in am.accepted[before:]:
                for a in body:
                    state = "resolved" if ts(a["endsAt"]) <= clock.now else "firing"
                    sent_at.append((clock.now - t0, state, ts(a["endsAt"]) - clock.now))
        await exp.shutdown()
    assert am.rejected == []
    # Firing: at once and every minute, valid for 4 × max(15 s, 1 m); resolved at 90 s,
    # re-sent every minute while younger than 3 minutes, then forgotten.
    assert sent_at == [(0, "firing", 240.0), (60, "firing", 240.0), (90, "resolved", 0.0),
                       (150, "resolved", -60.0), (210, "resolved", -120.0)]
    assert exp.alerts() == []


async def test_pending_alerts_are_not_sent_and_400_is_not_retried(tmp_path):
    clock, tel = FakeClock(), Telemetry()
    async with AlertmanagerRecorder() as am:
        am.fail_next(400, body="invalid label set")
        exp = make_exporter({"rules": [{"name": "Hot", "metric": "m", "for": "1m"}],
                             "notifiers": {"alertmanager": {"urls": [am.url]}}}, clock, tel)
        await exp.start(make_host(tmp_path))
        await feed(exp, clock, "m", [({}, 5.0)])
        await exp.evaluate_now()
        await exp.flush()
        assert am.attempts == []  # pending
        clock.advance(60)
        await feed(exp, clock, "m", [({}, 5.0)])
        await exp.evaluate_now()
        await exp.flush()
        await exp.shutdown()
    assert len(am.attempts) == 1 and am.accepted == []
    assert clock.sleeps == []
    snap = tel.snapshot("alerts")
    assert snap["mlagent_agent_dropped_items_total{reason=alertmanager:rejected,signal=alerts}"] == 1


async def test_recorder_refuses_annotation_names_like_the_real_alertmanager(tmp_path):
    """The recorder's contract, checked against Alertmanager 0.25: a bad annotation name
    is a 400 naming it (the good alerts of the batch are still stored)."""
    now = rfc3339(time.time())
    batch = [{"labels": {"alertname": "Bad"}, "annotations": {"runbook-url": "http://wiki"},
              "startsAt": now, "endsAt": rfc3339(time.time() + 300)},
             {"labels": {"alertname": "Good"}, "annotations": {"runbook_url": "http://wiki"},
              "startsAt": now, "endsAt": rfc3339(time.time() + 300)}]
    answers = []
    async with running_alertmanager(tmp_path / "am") as real, AlertmanagerRecorder() as rec:
        async with aiohttp.ClientSession() as s:
            for url in (f"{real.url}/api/v2/alerts", rec.url):
                async with s.post(url, json=batch) as r:
                    answers.append((r.status, await r.text()))
        assert [a["labels"]["alertname"] for a in await real.alerts()] == ["Good"]
    (real_status, real_body), (rec_status, rec_body) = answers
    assert real_status == rec_status == 400
    # Alertmanager answers a JSON string; the recorder plain text.
    assert json.loads(real_body) == rec_body == 'invalid annotations: invalid name "runbook-url"'


class Inference:
    """A model server instrumented with the OTel SDK: each request is a span, and its
    duration goes to a histogram whose exemplars carry the span's ids."""

    def __init__(self) -> None:
        self.tracer = TracerProvider().get_tracer("inference")
        self.reader = InMemoryMetricReader()
        meter = MeterProvider(metric_readers=[self.reader], resource=Resource.create(
            {"service.name": "checkout", "service.namespace": "shop"})).get_meter("inference")
        self.duration = meter.create_histogram(
            "inference.duration", unit="s", explicit_bucket_boundaries_advisory=[0.1, 0.25, 0.5, 1.0])

    def serve(self, seconds: float) -> str:
        """One request taking ``seconds``; returns its trace id (hex)."""
        with self.tracer.start_as_current_span("predict") as span:
            self.duration.record(seconds, {"ml.model.name": "ranker"})
            return format(span.get_span_context().trace_id, "032x")

    def collect(self) -> MetricBatch:
        return MetricBatch(encode_metrics(self.reader.get_metrics_data()))


P99_RULE = {
    "name": "InferenceP99High", "metric": "inference.duration", "quantile": 0.99,
    "matchers": {"ml.model.name": "ranker"}, "by": ["service.name", "ml.model.name"],
    "op": ">", "threshold": 0.5, "for": "1m", "severity": "critical",
    "labels": {"team": "ranking"},
    "annotations": {"summary": "p99 of {{ labels.ml_model_name }} is {{ value }}s",
                    "runbook_url": "http://wiki/runbooks/{{ alertname }}"},
}


async def test_real_alertmanagers_receive_firing_alert_and_see_it_resolve(tmp_path):
    server = Inference()
    # Two slow requests, in different buckets so the SDK keeps both exemplars.
    trace_ids = [server.serve(0.7), server.serve(0.3)][::-1]  # newest first
    clock = FakeClock(start=time.time() - 120)  # see the module docstring
    async with running_alertmanager(tmp_path / "am1") as am1, \
            running_alertmanager(tmp_path / "am2") as am2:
        exp = make_exporter({
            "rules": [P99_RULE], "trace_link_template": "http://jaeger:16686/trace/{trace_id}",
            "notifiers": {"alertmanager": {"urls": [am1.url, am2.url]}}}, clock)
        await exp.start(make_host(tmp_path / "state"))
        await exp.consume(server.collect())
        await exp.evaluate_now()
        await exp.flush()
        assert await am1.alerts() == []  # pending for `for`

        clock.advance(parse_duration(P99_RULE["for"]))
        await exp.consume(server.collect())  # no new requests: p99 still over budget
        await exp.evaluate_now()
        await exp.flush()
        for am in (am1, am2):
            (alert,) = await am.alerts()
            assert alert["labels"] == {"alertname": "InferenceP99High", "severity": "critical",
                                       "service_name": "checkout", "ml_model_name": "ranker",
                                       "team": "ranking"}
            ann = alert["annotations"]
            assert ann["summary"] == "p99 of ranker is 0.99s"
            assert ann["runbook_url"] == "http://wiki/runbooks/InferenceP99High"
            assert ann["trace_ids"] == ",".join(trace_ids)
            assert ann["trace_url"] == f"http://jaeger:16686/trace/{trace_ids[0]}"
            assert alert["status"]["state"] == "active"

        clock.advance(30)  # still behind real time: the resolve's endsAt is past for AM
        for _ in range(1000):  # fast requests bring the p99 back under budget
            server.serve(0.05)
        await exp.consume(server.collect())
        await exp.evaluate_now()
        await exp.flush()
        assert await am1.alerts() == []
        assert await am2.alerts() == []
        await exp.shutdown()


async def test_alert_sent_while_one_alertmanager_is_down_reaches_the_other(tmp_path):
    from tests.conftest import free_port

    clock = FakeClock(start=time.time() - 60)
    async with running_alertmanager(tmp_path / "am") as am:
        down = f"http://127.0.0.1:{free_port()}"
        exp = make_exporter({"rules": [{"name": "Hot", "metric": "m", "threshold": 1}],
                             "notifiers": {"alertmanager": {
                                 "urls": [down, am.url],
                                 "retry": {"max_elapsed_time": "5s"}}}}, clock)
        await exp.start(make_host(tmp_path / "state"))
        await feed(exp, clock, "m", [({"service.name": "checkout"}, 5.0)])
        await exp.evaluate_now()
        await exp.notifiers[0].channels[1].drain()  # the live one, without waiting for the dead
        (alert,) = await am.alerts()
        assert alert["labels"]["alertname"] == "Hot"
        await exp.shutdown()
