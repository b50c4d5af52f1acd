"""Triggers and resolves reach Slack, PagerDuty and webhooks even when the peer was down
for longer than the retry budget or the agent restarted meanwhile, and only once when
the peer answered.

The peers are the strict contract servers of ``tests.notify_contract`` with an outage
switch: ``down`` answers 503 at once, ``stall()`` holds requests (an answer that never
comes) until ``resume()``. Retry waits run on the fake clock, so a 2-minute retry
budget is spent in milliseconds.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web

from agent.exporters.alerts.rules import fingerprint
from agent.telemetry import Telemetry
from agent.testing import make_host
from tests.exporters.test_alerts import FakeClock, feed, make_exporter
from tests.exporters.test_alerts_e2e import wait_until
from tests.exporters.test_alerts_notify import EXPECTED_LABELS, ROUTING_KEY, RULE, dropped
from tests.notify_contract import PagerDutyServer, SlackServer, WebhookServer


class Outage:
    """Mixin for a contract server: an outage that records nothing of what it refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False  # answer 503 at once
        self.refused = 0
        self.stalled = 0  # requests that arrived while stalled
        self._gate: asyncio.Event | None = None

    def stall(self) -> None:
        """Hold every request until ``resume()``, then answer it 503."""
        self._gate = asyncio.Event()

    def resume(self) -> None:
        if self._gate is not None:
            self._gate.set()
            self._gate = None

    async def _handle(self, request: web.Request) -> web.Response:
        gate = self._gate
        if gate is not None:
            self.stalled += 1
            await gate.wait()
            return web.Response(status=503, text="upstream timed out")
        if self.down:
            self.refused += 1
            return web.Response(status=503, text="service unavailable")
        return await super()._handle(request)  # type: ignore[misc]


class PagerDuty(Outage, PagerDutyServer):
    pass


class Slack(Outage, SlackServer):
    pass


class Webhook(Outage, WebhookServer):
    pass


def _pagerduty_states(bodies: list[Any]) -> list[str]:
    return [{"trigger": "firing", "resolve": "resolved"}[b["event_action"]] for b in bodies]


def _slack_states(bodies: list[Any]) -> list[str]:
    return ["firing" if b["text"].startswith("[FIRING]") else "resolved" for b in bodies]


def _webhook_states(bodies: list[Any]) -> list[str]:
    return [a["status"] for b in bodies for a in b["alerts"]]


# peer name -> (server, notifier config for its URL, what it was told, in order)
PEERS: dict[str, tuple[type, Callable[[str], dict[str, Any]], Callable[[list[Any]], list[str]]]] = {
    "pagerduty": (PagerDuty, lambda url: {"routing_key": ROUTING_KEY, "url": url},
                  _pagerduty_states),
    "slack": (Slack, lambda url: {"webhook_url": url}, _slack_states),
    "webhook": (Webhook, lambda url: {"url": url}, _webhook_states),
}


def config(peer: str, url: str, **notifier: Any) -> dict[str, Any]:
    return {"rules": [RULE], "notifiers": {peer: {**PEERS[peer][1](url), **notifier}}}


async def step(exp: Any, clock: FakeClock, value: float | None, seconds: float = 15) -> None:
    """``seconds`` later: report ``value`` (None: nothing), evaluate, wait for the sends."""
    clock.advance(seconds)
    if value is not None:
        await feed(exp, clock, "lat", [({"service.name": "checkout"}, value)])
    await exp.evaluate_now()
    await exp.flush()


@pytest.mark.parametrize("peer", sorted(PEERS))
async def test_trigger_lost_to_an_outage_longer_than_the_retry_budget_arrives_after(
        tmp_path, peer):
    server_cls, _, told = PEERS[peer]
    clock, tel = FakeClock(), Telemetry()
    async with server_cls() as srv:
        srv.down = True
        exp = make_exporter(config(peer, srv.url, retry={"max_elapsed_time": "2m"}), clock, tel)
        await exp.start(make_host(tmp_path))
        await step(exp, clock, 0.9, seconds=0)  # fires; every attempt for 2 minutes fails
        assert srv.refused > 1 and srv.accepted == []
        assert dropped(tel, f"{peer}:retries_exhausted") == 1

        srv.down = False  # the peer is back: the next evaluation offers the trigger again
        await step(exp, clock, 0.9)
        assert told(srv.accepted) == ["firing"]
        await step(exp, clock, 0.9)  # acknowledged: not repeated
        await step(exp, clock, 0.1)  # resolves
        await step(exp, clock, 0.1)
        await exp.shutdown()
    assert told(srv.accepted) == ["firing", "resolved"]
    snap = tel.snapshot("alerts")
    assert snap[f"mlagent_agent_alert_notifications_total{{notifier={peer},outcome=resent}}"] == 1
    if peer == "pagerduty":
        assert srv.incidents == {fingerprint(EXPECTED_LABELS): "resolved"}


@pytest.mark.parametrize("peer", sorted(PEERS))
async def test_resolve_lost_before_a_restart_is_delivered_after_it(tmp_path, peer):
    server_cls, _, told = PEERS[peer]
    clock, host = FakeClock(), make_host(tmp_path)
    async with server_cls() as srv:
        exp = make_exporter(config(peer, srv.url), clock)
        await exp.start(host)
        await step(exp, clock, 0.9, seconds=0)
        srv.down = True
        await step(exp, clock, 0.1)  # resolves; the resolve is never acknowledged
        await exp.shutdown()
        assert told(srv.accepted) == ["firing"]
        saved = json.loads((tmp_path / "alerts" / "alerts.json").read_text())
        assert saved["version"] == 2
        assert [(a["state"], a["delivered"]) for a in saved["alerts"]] == [
            ("resolved", {peer: "firing"})]

        srv.down = False
        clock.advance(300)
        exp2 = make_exporter(config(peer, srv.url), clock)
        await exp2.start(host)
        await exp2.flush()  # offered at start, before any evaluation
        assert told(srv.accepted) == ["firing", "resolved"]
        await step(exp2, clock, None)
        assert exp2.alerts() == []  # acknowledged, so forgotten
        await exp2.shutdown()
    assert told(srv.accepted) == ["firing", "resolved"]
    if peer == "pagerduty":
        assert srv.incidents == {fingerprint(EXPECTED_LABELS): "resolved"}


async def test_resolve_still_in_flight_at_shutdown_is_sent_after_the_restart(tmp_path):
    clock, host, tel = FakeClock(), make_host(tmp_path), Telemetry()
    async with PagerDuty() as pd:
        cfg = {**config("pagerduty", pd.url), "shutdown_timeout": "100ms"}
        exp = make_exporter(cfg, clock, tel)
        await exp.start(host)
        await step(exp, clock, 0.9, seconds=0)
        pd.stall()
        clock.advance(15)
        await feed(exp, clock, "lat", [({"service.name": "checkout"}, 0.1)])
        await exp.evaluate_now()
        await exp.shutdown()  # the resolve is still waiting for an answer: cancelled
        assert pd.stalled == 1 and dropped(tel, "pagerduty:shutdown") == 1
        pd.resume()

        exp2 = make_exporter(cfg, clock)
        await exp2.start(host)
        await exp2.flush()
        await exp2.shutdown()
    assert _pagerduty_states(pd.accepted) == ["firing", "resolved"]
    assert pd.incidents == {fingerprint(EXPECTED_LABELS): "resolved"}


@pytest.mark.parametrize("peer", sorted(PEERS))
async def test_acknowledged_messages_are_not_repeated_across_evaluations_and_restarts(
        tmp_path, peer):
    server_cls, _, told = PEERS[peer]
    clock, host = FakeClock(), make_host(tmp_path)
    async with server_cls() as srv:
        for value in (0.9, 0.1):  # a restart while firing, and one after the resolve
            exp = make_exporter(config(peer, srv.url), clock)
            await exp.start(host)
            for _ in range(3):
                await step(exp, clock, value)
            await exp.shutdown()
        exp = make_exporter(config(peer, srv.url), clock)
        await exp.start(host)
        await step(exp, clock, 0.1)
        await exp.shutdown()
    assert told(srv.accepted) == ["firing", "resolved"]
    assert srv.attempts == srv.accepted


async def test_no_second_message_while_one_is_in_flight(tmp_path):
    clock = FakeClock()
    async with PagerDuty() as pd:
        exp = make_exporter(config("pagerduty", pd.url), clock)
        await exp.start(make_host(tmp_path))
        pd.stall()  # the trigger gets no answer while the alert keeps firing
        for i in range(4):
            clock.advance(15)
            await feed(exp, clock, "lat", [({"service.name": "checkout"}, 0.9)])
            await exp.evaluate_now()
            if i == 0:
                await wait_until(lambda: pd.stalled == 1)
            await asyncio.sleep(0.05)
        assert pd.stalled == 1
        pd.resume()  # 503 for the stalled attempt; the retry is accepted
        await exp.flush()
        await step(exp, clock, 0.9)
        await exp.shutdown()
    assert _pagerduty_states(pd.accepted) == ["firing"]


async def test_a_peer_that_never_heard_the_trigger_gets_no_resolve(tmp_path):
    clock, tel = FakeClock(), Telemetry()
    async with Slack() as slack:
        slack.down = True
        exp = make_exporter(config("slack", slack.url), clock, tel)
        await exp.start(make_host(tmp_path))
        await step(exp, clock, 0.9, seconds=0)  # the trigger is lost
        slack.down = False
        await feed(exp, clock, "lat", [({"service.name": "checkout"}, 0.1)])
        await step(exp, clock, 0.1, seconds=0)  # resolved before Slack came back
        await step(exp, clock, 0.1)
        assert exp.alerts() == []
        await exp.shutdown()
    assert slack.accepted == []


async def test_state_file_of_version_1_is_read_and_repeats_nothing(tmp_path):
    """A file written before delivery was recorded: its firing alert counts as delivered
    (no second trigger on upgrade), and its resolve is still sent."""
    clock, host = FakeClock(), make_host(tmp_path)
    (tmp_path / "alerts").mkdir()
    (tmp_path / "alerts" / "alerts.json").write_text(json.dumps({"version": 1, "alerts": [{
        "fingerprint": fingerprint(EXPECTED_LABELS), "rule": "LatencyHigh",
        "labels": EXPECTED_LABELS, "annotations": {"summary": "p99 of checkout is 0.9s"},
        "state": "firing", "active_since": clock.now - 60, "last_true": clock.now - 15,
        "value": 0.9, "fired_at": clock.now - 60, "resolved_at": None, "last_sent": {}}]}))
    async with PagerDuty() as pd:
        exp = make_exporter(config("pagerduty", pd.url), clock)
        await exp.start(host)
        await exp.flush()
        await step(exp, clock, 0.9)
        assert pd.accepted == []
        await step(exp, clock, 0.1)
        await exp.shutdown()
    assert _pagerduty_states(pd.accepted) == ["resolved"]
    assert json.loads((tmp_path / "alerts" / "alerts.json").read_text())["version"] == 2


async def test_undelivered_resolves_do_not_take_the_place_of_new_alerts(tmp_path):
    clock, tel = FakeClock(), Telemetry()
    async with PagerDuty() as pd:
        exp = make_exporter({**config("pagerduty", pd.url), "max_alerts": 1}, clock, tel)
        await exp.start(make_host(tmp_path))
        await step(exp, clock, 0.9, seconds=0)
        pd.down = True  # the resolve of checkout cannot be delivered
        await step(exp, clock, 0.1)
        assert [a.state for a in exp.alerts()] == ["resolved"]
        clock.advance(15)
        await feed(exp, clock, "lat", [({"service.name": "cart"}, 0.9)])
        await exp.evaluate_now()
        await exp.shutdown()
    # The new alert fired; the old resolve gave way, and that loss is counted.
    assert [(a.labels["service_name"], a.state) for a in exp.alerts()] == [("cart", "firing")]
    snap = tel.snapshot("alerts")
    assert snap["mlagent_agent_dropped_items_total{reason=alert_limit,signal=alerts}"] == 1
