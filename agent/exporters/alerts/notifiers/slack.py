"""Slack incoming webhooks: one message per alert transition, ``text`` plus ``blocks``.

``text`` is always set (it is what notifications and screen readers show); blocks add
the summary, description, labels and a link to an example trace. A message the
webhook never acknowledged is posted again later (see ``EventNotifier``): a repeat
after an outage is better than a page nobody saw. Messages to one
webhook are spaced by ``1 / rate_limit`` seconds (Slack allows about one per second);
429 (honouring ``Retry-After``) and 5xx are retried, anything else is dropped.
"""

from __future__ import annotations

from typing import Any

from agent.exporters.alerts.config import SlackConfig
from agent.exporters.alerts.notifiers.base import (
    Channel,
    EventNotifier,
    NotifyContext,
    post_json,
)
from agent.exporters.alerts.state import Alert

# Slack Block Kit limits.
HEADER_MAX = 150
SECTION_TEXT_MAX = 3000
FIELD_TEXT_MAX = 2000
MAX_FIELDS = 10


def _escape(text: str) -> str:
    """Slack mrkdwn needs &, < and > escaped."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def message(a: Alert) -> dict[str, Any]:
    """The webhook body for one transition of ``a``."""
    firing = a.state == "firing"
    status = "FIRING" if firing else "RESOLVED"
    name, severity = a.labels.get("alertname", ""), a.labels.get("severity", "")
    summary = a.annotations.get("summary", name)
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "emoji": True, "text": _cut(
            f"{':rotating_light:' if firing else ':white_check_mark:'} {status}: {name}",
            HEADER_MAX)}},
        {"type": "section", "text": {"type": "mrkdwn", "text": _cut("\n".join(
            _escape(t) for t in (summary, a.annotations.get("description", "")) if t),
            SECTION_TEXT_MAX)}},
    ]
    fields = [{"type": "mrkdwn", "text": _cut(f"*{_escape(k)}*\n{_escape(v)}", FIELD_TEXT_MAX)}
              for k, v in sorted(a.labels.items()) if k != "alertname"][:MAX_FIELDS]
    if fields:
        blocks.append({"type": "section", "fields": fields})
    url = a.annotations.get("trace_url")
    if url:
        blocks.append({"type": "context", "elements": [
            {"type": "mrkdwn", "text": f"<{url}|Example trace>"}]})
    return {"text": f"[{status}] {name} ({severity}): {summary}", "blocks": blocks}


class SlackNotifier(EventNotifier):
    """Posts transitions to one Slack incoming webhook."""

    cfg: SlackConfig

    def __init__(self, notifier_id: str, cfg: SlackConfig, ctx: NotifyContext) -> None:
        super().__init__(notifier_id, ctx, cfg)
        self.channels.append(Channel(ctx, notifier_id, cfg, self._post,
                                     min_interval=1.0 / cfg.rate_limit))

    async def _post(self, body: dict[str, Any]) -> None:
        await post_json(self.ctx, self.cfg.webhook_url, body, self.cfg.timeout)

    def send(self, alerts: list[Alert], changed: set[str]) -> None:
        for a in alerts:
            self.offer(self.channels[0], message(a), [a], changed)
