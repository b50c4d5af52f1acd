"""The ``log`` notifier: one structured log line per alert transition.

Firing is logged at WARNING, resolved at INFO, through the agent's JSON log (so
journald keeps it). It writes inline: there is no peer to wait for.
"""

from __future__ import annotations

import logging
import math

from agent.exporters.alerts.config import LogConfig
from agent.exporters.alerts.evaluator import Update
from agent.exporters.alerts.notifiers.base import (
    SIGNAL,
    Notifier,
    NotifyContext,
    rfc3339,
    transitions_to_send,
)
from agent.telemetry import log


class LogNotifier(Notifier):
    """Writes each transition to the agent's log."""

    def __init__(self, notifier_id: str, cfg: LogConfig, ctx: NotifyContext) -> None:
        super().__init__(notifier_id, ctx)
        self.cfg = cfg

    def notify(self, update: Update) -> None:
        for a in transitions_to_send(update, self.cfg.send_resolved):
            firing = a.state == "firing"
            log(logging.WARNING if firing else logging.INFO,
                f"{self.ctx.component_id}: alert {a.state}: {a.labels.get('alertname', a.rule)}",
                component=self.ctx.component_id, event="alert", notifier=self.id,
                state=a.state, alertname=a.labels.get("alertname", a.rule),
                fingerprint=a.fingerprint, labels=a.labels, annotations=a.annotations,
                value=a.value if math.isfinite(a.value) else str(a.value),  # JSON-safe
                active_since=rfc3339(a.active_since),
                resolved_at=None if a.resolved_at is None else rfc3339(a.resolved_at))
            self.ctx.count(self.id, "sent")
            self.ctx.telemetry.sent(SIGNAL, 1)
