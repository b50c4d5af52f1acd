"""PagerDuty Events API v2: ``trigger`` when an alert fires, ``resolve`` when it ends.

``dedup_key`` is the alert's fingerprint (a stable hash of its label set), so a
resolve closes the incident its trigger opened, retries and restarts included, and
a trigger offered again after an outage (see ``EventNotifier``) adds to the same
incident instead of opening a second one.
Rule severities map onto PagerDuty's four (``critical|error|warning|info``; common
synonyms such as ``page`` or ``high`` are understood, others use
``default_severity``). 202 is success; 429 and 5xx are retried, 400 never.
"""

from __future__ import annotations

import socket
from typing import Any

from agent.exporters.alerts.config import PagerDutyConfig
from agent.exporters.alerts.notifiers.base import (
    Channel,
    EventNotifier,
    NotifyContext,
    post_json,
    rfc3339,
)
from agent.exporters.alerts.rules import format_value
from agent.exporters.alerts.state import Alert

SUMMARY_MAX = 1024
SEVERITIES = {
    "critical": "critical", "page": "critical", "fatal": "critical", "emergency": "critical",
    "error": "error", "high": "error", "major": "error",
    "warning": "warning", "warn": "warning", "medium": "warning", "minor": "warning",
    "info": "info", "low": "info", "none": "info", "ticket": "info",
}


class PagerDutyNotifier(EventNotifier):
    """Sends trigger and resolve events to one PagerDuty service (its routing key)."""

    cfg: PagerDutyConfig

    def __init__(self, notifier_id: str, cfg: PagerDutyConfig, ctx: NotifyContext) -> None:
        super().__init__(notifier_id, ctx, cfg)
        self.source = cfg.source or socket.gethostname()
        self.channels.append(Channel(ctx, notifier_id, cfg, self._post))

    async def _post(self, event: dict[str, Any]) -> None:
        await post_json(self.ctx, self.cfg.url, event, self.cfg.timeout)

    def send(self, alerts: list[Alert], changed: set[str]) -> None:
        for a in alerts:
            self.offer(self.channels[0], self.event(a), [a], changed)

    def severity(self, a: Alert) -> str:
        return SEVERITIES.get(a.labels.get("severity", "").lower(), self.cfg.default_severity)

    def event(self, a: Alert) -> dict[str, Any]:
        """The Events v2 body for one transition of ``a``."""
        base = {"routing_key": self.cfg.routing_key, "dedup_key": a.fingerprint}
        if a.state != "firing":
            return {**base, "event_action": "resolve"}
        summary = a.annotations.get("summary") or a.labels.get("alertname", "alert")
        payload: dict[str, Any] = {
            "summary": summary if len(summary) <= SUMMARY_MAX else summary[:SUMMARY_MAX - 1] + "…",
            "source": self.source,
            "severity": self.severity(a),
            "timestamp": rfc3339(a.fired_at if a.fired_at is not None else a.active_since),
            "class": a.labels.get("alertname", ""),
            # The value as text: JSON has no NaN or infinity.
            "custom_details": {"labels": a.labels, "annotations": a.annotations,
                               "value": format_value(a.value)},
        }
        if "service_name" in a.labels:
            payload["component"] = a.labels["service_name"]
        event: dict[str, Any] = {**base, "event_action": "trigger", "payload": payload,
                                 "client": "mlagent"}
        if self.ctx.external_url:
            event["client_url"] = self.ctx.external_url
        if "trace_url" in a.annotations:
            event["links"] = [{"href": a.annotations["trace_url"], "text": "Example trace"}]
        return event
