"""Webhooks in Alertmanager's webhook format (version 4), so existing receivers work.

One message per rule per evaluation that changed something, carrying the alerts of
that rule that started firing or resolved (or whose earlier message the receiver
never acknowledged, see ``EventNotifier``); ``groupKey`` and ``groupLabels`` group by
``alertname``. 2xx is success; 429 and 5xx are retried, other statuses dropped.
"""

from __future__ import annotations

from typing import Any

from agent.exporters.alerts.config import WebhookConfig
from agent.exporters.alerts.notifiers.base import (
    Channel,
    EventNotifier,
    NotifyContext,
    post_json,
    rfc3339,
)
from agent.exporters.alerts.state import Alert

ZERO_TIME = "0001-01-01T00:00:00Z"  # Alertmanager's endsAt of an alert still firing


def _common(maps: list[dict[str, str]]) -> dict[str, str]:
    first, rest = maps[0], maps[1:]
    return {k: v for k, v in first.items() if all(m.get(k) == v for m in rest)}


class WebhookNotifier(EventNotifier):
    """Posts Alertmanager-webhook-compatible JSON to one URL."""

    cfg: WebhookConfig

    def __init__(self, notifier_id: str, cfg: WebhookConfig, ctx: NotifyContext) -> None:
        super().__init__(notifier_id, ctx, cfg)
        self.receiver = cfg.receiver or notifier_id
        self.channels.append(Channel(ctx, notifier_id, cfg, self._post))

    async def _post(self, body: dict[str, Any]) -> None:
        await post_json(self.ctx, self.cfg.url, body, self.cfg.timeout)

    def send(self, alerts: list[Alert], changed: set[str]) -> None:
        by_rule: dict[str, list[Alert]] = {}
        for a in alerts:
            by_rule.setdefault(a.rule, []).append(a)
        for rule, group in by_rule.items():
            self.offer(self.channels[0], self.message(rule, group), group, changed)

    def message(self, rule: str, alerts: list[Alert]) -> dict[str, Any]:
        """The webhook body for the transitions of one rule."""
        items = [{
            "status": "firing" if a.state == "firing" else "resolved",
            "labels": a.labels,
            "annotations": a.annotations,
            "startsAt": rfc3339(a.fired_at if a.fired_at is not None else a.active_since),
            "endsAt": rfc3339(a.resolved_at) if a.resolved_at is not None else ZERO_TIME,
            "generatorURL": self.ctx.external_url,
            "fingerprint": a.fingerprint,
        } for a in alerts]
        group_labels = {"alertname": rule}
        escaped = rule.replace('"', '\\"')
        return {
            "version": "4",
            "groupKey": "{}:" + f'{{alertname="{escaped}"}}',
            "truncatedAlerts": 0,
            "status": "firing" if any(a.state == "firing" for a in alerts) else "resolved",
            "receiver": self.receiver,
            "groupLabels": group_labels,
            "commonLabels": _common([a.labels for a in alerts]),
            "commonAnnotations": _common([a.annotations for a in alerts]),
            "externalURL": self.ctx.external_url,
            "alerts": items,
        }
