"""Alert notifiers: Alertmanager, Slack, PagerDuty, webhook and the agent's log."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agent.exporters.alerts.notifiers.alertmanager import AlertmanagerNotifier
from agent.exporters.alerts.notifiers.base import Clock, Notifier, NotifyContext, SystemClock
from agent.exporters.alerts.notifiers.log import LogNotifier
from agent.exporters.alerts.notifiers.pagerduty import PagerDutyNotifier
from agent.exporters.alerts.notifiers.slack import SlackNotifier
from agent.exporters.alerts.notifiers.webhook import WebhookNotifier

NOTIFIERS: dict[str, Callable[[str, Any, NotifyContext], Notifier]] = {
    "alertmanager": AlertmanagerNotifier,
    "slack": SlackNotifier,
    "pagerduty": PagerDutyNotifier,
    "webhook": WebhookNotifier,
    "log": LogNotifier,
}


def build_notifiers(configs: dict[str, Any], ctx: NotifyContext) -> list[Notifier]:
    """One notifier per configured id (``type`` or ``type/name``), in config order."""
    return [NOTIFIERS[nid.split("/", 1)[0]](nid, cfg, ctx) for nid, cfg in configs.items()]


__all__ = ["Clock", "Notifier", "NotifyContext", "SystemClock", "build_notifiers"]
