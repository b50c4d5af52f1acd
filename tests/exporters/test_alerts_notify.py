"""Notifiers against strict contract servers: Slack, PagerDuty, Alertmanager-format webhooks.

Retry waits go through the fake clock, so a ``Retry-After`` of seconds is checked by
what the notifier asked to sleep, not by how long the test took.
"""

from __future__ import annotations

from typing import Any

import pytest

from agent.component import Status
from agent.exporters.alerts.rules import fingerprint
from agent.telemetry import Telemetry
from agent.testing import make_host
from tests.exporters.test_alerts import FakeClock, feed, make_exporter
from tests.notify_contract import PagerDutyServer, SlackServer, WebhookServer

ROUTING_KEY = "R" * 32
RULE = {"name": "LatencyHigh", "metric": "lat", "by": ["service.name"], "threshold": 0.5,
        "severity": "page",
        "annotations": {"summary": "p99 of {{ labels.service_name }} is {{ value }}s"}}
EXPECTED_LABELS = {"alertname": "LatencyHigh", "severity": "page", "service_name": "checkout"}
TRACE = bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736")


async def fire_and_resolve(exp: Any, clock: FakeClock, services: tuple[str, ...] = ("checkout",)
                           ) -> None:
    """Fire one alert per service, deliver, then resolve them all and deliver."""
    await feed(exp, clock, "lat", [({"service.name": s}, 0.9) for s in services],
               exemplars=[(TRACE, b"\x01" * 8)])
    await exp.evaluate_now()
    await exp.flush()
    clock.advance(15)
    await feed(exp, clock, "lat", [({"service.name": s}, 0.1) for s in services])
    await exp.evaluate_now()
    await exp.flush()


def dropped(tel: Telemetry, reason: str) -> float:
    key = f"mlagent_agent_dropped_items_total{{reason={reason},signal=alerts}}"
    return tel.snapshot("alerts").get(key, 0.0)


# --------------------------------------------------------------------------- Slack


async def fire_once(exp, clock: FakeClock, tmp_path) -> None:
    """Start ``exp``, make RULE fire for checkout, deliver what it sends, stop."""
    await exp.start(make_host(tmp_path))
    await feed(exp, clock, "lat", [({"service.name": "checkout"}, 0.9)])
    await exp.evaluate_now()
    await exp.flush()
    await exp.shutdown()


async def test_slack_messages_follow_the_webhook_contract(tmp_path):
    clock = FakeClock()
    async with SlackServer() as slack:
        exp = make_exporter({"rules": [RULE],
                             "trace_link_template": "http://jaeger:16686/trace/{trace_id}",
                             "notifiers": {"slack": {"webhook_url": slack.url}}}, clock)
        await exp.start(make_host(tmp_path))
        await fire_and_resolve(exp, clock)
        await exp.shutdown()
    assert slack.rejected == []
    firing, resolved = slack.accepted
    assert firing["text"] == "[FIRING] LatencyHigh (page): p99 of checkout is 0.9s"
    assert resolved["text"].startswith("[RESOLVED] LatencyHigh")
    assert firing["blocks"][0]["type"] == "header"
    assert "<http://jaeger:16686/trace/4bf92f3577b34da6a3ce929d0e0e4736|Example trace>" in str(
        firing["blocks"][-1])


async def test_slack_is_rate_limited_per_webhook(tmp_path):
    clock = FakeClock()
    async with SlackServer() as slack:
        exp = make_exporter({"rules": [RULE], "notifiers": {
            "slack": {"webhook_url": slack.url, "rate_limit": 1.0}}}, clock)
        await exp.start(make_host(tmp_path))
        await feed(exp, clock, "lat", [({"service.name": s}, 0.9) for s in ("a", "b", "c")])
        await exp.evaluate_now()
        await exp.flush()
        await exp.shutdown()
    assert len(slack.accepted) == 3
    assert clock.sleeps == [1.0, 1.0]  # three messages at once: spaced one second apart


async def test_slack_honours_retry_after_and_retries_5xx(tmp_path):
    clock, tel = FakeClock(), Telemetry()
    async with SlackServer() as slack:
        slack.fail_next(429, {"Retry-After": "7"}, "rate_limited")
        slack.fail_next(503, body="service unavailable")
        exp = make_exporter({"rules": [RULE], "notifiers": {"slack": {
            "webhook_url": slack.url, "retry": {"initial_interval": "2s",
                                                "randomization_factor": 0}}}}, clock, tel)
        await fire_once(exp, clock, tmp_path)
    assert len(slack.attempts) == 3 and len(slack.accepted) == 1
    assert slack.attempts[0] == slack.attempts[2]
    assert clock.sleeps[:2] == [7.0, 2.0]  # Retry-After, then the configured backoff
    snap = tel.snapshot("alerts")
    assert snap["mlagent_agent_alert_notifications_total{notifier=slack,outcome=failed}"] == 2
    assert snap["mlagent_agent_alert_notifications_total{notifier=slack,outcome=sent}"] == 1


async def test_slack_400_is_not_retried(tmp_path):
    clock, tel = FakeClock(), Telemetry()
    async with SlackServer() as slack:
        slack.fail_next(400, body="invalid_blocks")
        exp = make_exporter({"rules": [RULE], "notifiers": {"slack": {"webhook_url": slack.url}}},
                            clock, tel)
        host = make_host(tmp_path)
        statuses: list[tuple[Status, str | None]] = []
        host.report_status = lambda _id, status, error=None: statuses.append((status, error))
        await exp.start(host)
        await fire_and_resolve(exp, clock)
        await exp.shutdown()
    # The firing message was refused once and dropped; the resolve still went out.
    assert len(slack.attempts) == 2
    assert [m["text"].split()[0] for m in slack.accepted] == ["[RESOLVED]"]
    assert dropped(tel, "slack:rejected") == 1
    # Health showed the loss until the notifier delivered again.
    assert [s for s, _ in statuses] == [Status.DEGRADED, Status.OK]
    assert "slack: rejected: HTTP 400" in (statuses[0][1] or "")


# --------------------------------------------------------------------------- PagerDuty


async def test_pagerduty_trigger_and_resolve_share_the_dedup_key(tmp_path):
    clock = FakeClock()
    rule = {**RULE, "annotations": {"summary": "x" * 3000}}
    async with PagerDutyServer() as pd:
        exp = make_exporter({"rules": [rule], "notifiers": {"pagerduty": {
            "routing_key": ROUTING_KEY, "url": pd.url, "source": "gpu-host-1"}}}, clock)
        await exp.start(make_host(tmp_path))
        await fire_and_resolve(exp, clock)
        await exp.shutdown()
    assert pd.rejected == []
    trigger, resolve = pd.accepted
    key = fingerprint(EXPECTED_LABELS)
    assert (trigger["event_action"], trigger["dedup_key"]) == ("trigger", key)
    assert (resolve["event_action"], resolve["dedup_key"]) == ("resolve", key)
    assert pd.incidents == {key: "resolved"}
    payload = trigger["payload"]
    assert payload["severity"] == "critical"  # "page" maps to PagerDuty's critical
    assert payload["source"] == "gpu-host-1"
    assert len(payload["summary"]) == 1024
    assert payload["custom_details"]["labels"] == EXPECTED_LABELS
    assert payload["component"] == "checkout"


async def test_pagerduty_retries_429_and_5xx_with_the_same_dedup_key(tmp_path):
    clock = FakeClock()
    async with PagerDutyServer() as pd:
        pd.fail_next(500)
        pd.fail_next(429, {"Retry-After": "3"})
        exp = make_exporter({"rules": [RULE], "notifiers": {"pagerduty": {
            "routing_key": ROUTING_KEY, "url": pd.url}}}, clock)
        await fire_once(exp, clock, tmp_path)
    assert [e["dedup_key"] for e in pd.attempts] == [fingerprint(EXPECTED_LABELS)] * 3
    assert len(pd.accepted) == 1
    assert 3.0 in clock.sleeps


async def test_pagerduty_400_is_not_retried(tmp_path):
    clock, tel = FakeClock(), Telemetry()
    async with PagerDutyServer() as pd:
        pd.fail_next(400, body='{"status":"invalid event"}')
        exp = make_exporter({"rules": [RULE], "notifiers": {"pagerduty": {
            "routing_key": ROUTING_KEY, "url": pd.url}}}, clock, tel)
        await fire_once(exp, clock, tmp_path)
    assert len(pd.attempts) == 1 and pd.accepted == []
    assert clock.sleeps == []
    assert dropped(tel, "pagerduty:rejected") == 1


async def test_pagerduty_resolve_after_restart_closes_the_same_incident(tmp_path):
    clock, host = FakeClock(), make_host(tmp_path)
    async with PagerDutyServer() as pd:
        cfg = {"rules": [RULE], "notifiers": {"pagerduty": {"routing_key": ROUTING_KEY,
                                                            "url": pd.url}}}
        exp = make_exporter(cfg, clock)
        await exp.start(host)
        await feed(exp, clock, "lat", [({"service.name": "checkout"}, 0.9)])
        await exp.evaluate_now()
        await exp.shutdown()
        clock.advance(20)
        exp2 = make_exporter(cfg, clock)
        await exp2.start(host)
        await feed(exp2, clock, "lat", [({"service.name": "checkout"}, 0.1)])
        await exp2.evaluate_now()
        await exp2.shutdown()
    assert [e["event_action"] for e in pd.accepted] == ["trigger", "resolve"]
    assert pd.incidents == {fingerprint(EXPECTED_LABELS): "resolved"}


# --------------------------------------------------------------------------- retry budget


async def test_max_elapsed_time_zero_retries_until_the_peer_answers(tmp_path):
    clock, tel = FakeClock(), Telemetry()
    async with SlackServer() as slack:
        for _ in range(12):  # down for longer than the default 2-minute budget
            slack.fail_next(503, body="service unavailable")
        exp = make_exporter({"rules": [RULE], "notifiers": {"slack": {
            "webhook_url": slack.url, "retry": {"max_elapsed_time": "0s",
                                                "randomization_factor": 0}}}}, clock, tel)
        await fire_once(exp, clock, tmp_path)
    assert len(slack.attempts) == 13 and len(slack.accepted) == 1
    assert sum(clock.sleeps) > 120
    assert dropped(tel, "slack:retries_exhausted") == 0


async def test_retry_after_past_the_budget_gets_a_last_attempt_at_the_deadline(tmp_path):
    clock, tel = FakeClock(), Telemetry()
    async with PagerDutyServer() as pd:
        pd.fail_next(429, {"Retry-After": "3600"})
        exp = make_exporter({"rules": [RULE], "notifiers": {"pagerduty": {
            "routing_key": ROUTING_KEY, "url": pd.url,
            "retry": {"max_elapsed_time": "1m"}}}}, clock, tel)
        await fire_once(exp, clock, tmp_path)
    assert clock.sleeps == [60.0]  # not an hour, and not a drop: once more at the deadline
    assert len(pd.attempts) == 2 and len(pd.accepted) == 1
    assert dropped(tel, "pagerduty:retries_exhausted") == 0


async def test_retry_after_is_capped_like_the_sending_queue(tmp_path):
    from agent.queue.sender import MAX_HINT_S

    clock = FakeClock()
    async with PagerDutyServer() as pd:
        pd.fail_next(503, {"Retry-After": "86400"})
        exp = make_exporter({"rules": [RULE], "notifiers": {"pagerduty": {
            "routing_key": ROUTING_KEY, "url": pd.url,
            "retry": {"max_elapsed_time": "0s"}}}}, clock)
        await fire_once(exp, clock, tmp_path)
    assert clock.sleeps == [MAX_HINT_S]  # a day's Retry-After waits 5 minutes
    assert len(pd.accepted) == 1


async def test_retry_after_zero_or_in_the_past_falls_back_to_the_backoff(tmp_path):
    """``Retry-After: 0`` or a past date is no hint: retrying at once would spin."""
    clock = FakeClock()
    async with SlackServer() as slack:
        slack.fail_next(503, {"Retry-After": "0"})
        slack.fail_next(429, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})
        exp = make_exporter({"rules": [RULE], "notifiers": {"slack": {
            "webhook_url": slack.url, "retry": {"initial_interval": "2s", "multiplier": 2,
                                                "randomization_factor": 0}}}}, clock)
        await fire_once(exp, clock, tmp_path)
    assert len(slack.attempts) == 3 and len(slack.accepted) == 1
    assert clock.sleeps[:2] == [2.0, 4.0]  # the configured backoff, not two zero waits


# --------------------------------------------------------------------------- webhook, isolation


async def test_webhook_sends_alertmanager_webhook_format(tmp_path):
    clock = FakeClock()
    async with WebhookServer() as hook:
        exp = make_exporter({"rules": [RULE], "external_url": "http://agent:13133",
                             "notifiers": {"webhook": {"url": hook.url, "receiver": "ops"}}},
                            clock)
        await exp.start(make_host(tmp_path))
        await fire_and_resolve(exp, clock, services=("checkout", "cart"))
        await exp.shutdown()
    assert hook.rejected == []
    firing, resolved = hook.accepted
    assert firing["version"] == "4" and firing["status"] == "firing"
    assert firing["receiver"] == "ops"
    assert firing["groupKey"] == '{}:{alertname="LatencyHigh"}'
    assert firing["commonLabels"] == {"alertname": "LatencyHigh", "severity": "page"}
    assert sorted(a["labels"]["service_name"] for a in firing["alerts"]) == ["cart", "checkout"]
    assert {a["endsAt"] for a in firing["alerts"]} == {"0001-01-01T00:00:00Z"}
    assert resolved["status"] == "resolved"
    assert {a["status"] for a in resolved["alerts"]} == {"resolved"}
    assert {a["fingerprint"] for a in firing["alerts"]} == {
        a["fingerprint"] for a in resolved["alerts"]}


async def test_a_failing_notifier_blocks_neither_evaluation_nor_other_notifiers(tmp_path):
    from tests.conftest import free_port

    clock, tel = FakeClock(), Telemetry()
    dead = f"http://127.0.0.1:{free_port()}/services/T/B/X"  # nothing listens there
    async with PagerDutyServer() as pd:
        exp = make_exporter({"rules": [RULE], "notifiers": {
            "slack": {"webhook_url": dead, "retry": {"max_elapsed_time": "1m"}},
            "pagerduty": {"routing_key": ROUTING_KEY, "url": pd.url}}}, clock, tel)
        await exp.start(make_host(tmp_path))
        await fire_and_resolve(exp, clock)
        await exp.shutdown()
    assert [e["event_action"] for e in pd.accepted] == ["trigger", "resolve"]
    snap = tel.snapshot("alerts")
    assert snap["mlagent_agent_alert_notifications_total{notifier=slack,outcome=failed}"] >= 1
    # The trigger was lost; a resolve of an alert Slack never heard of is not sent.
    assert dropped(tel, "slack:retries_exhausted") == 1


@pytest.mark.parametrize("send_resolved", [True, False])
async def test_send_resolved_false_only_reports_firing(tmp_path, send_resolved):
    clock = FakeClock()
    async with SlackServer() as slack:
        exp = make_exporter({"rules": [RULE], "notifiers": {"slack": {
            "webhook_url": slack.url, "send_resolved": send_resolved}}}, clock)
        await exp.start(make_host(tmp_path))
        await fire_and_resolve(exp, clock)
        await exp.shutdown()
    assert len(slack.accepted) == (2 if send_resolved else 1)
