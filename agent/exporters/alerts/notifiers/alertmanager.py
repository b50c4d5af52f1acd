"""Alertmanager API v2: ``POST <url>/api/v2/alerts`` to every URL of an HA cluster.

Follows Prometheus' sender: firing alerts are (re)sent when they start firing and
then every ``resend_interval``, each time with ``endsAt = now + 4 × max(evaluation
interval, resend_interval)`` so Alertmanager keeps them active between sends and
expires them if the agent goes away. A resolved alert is sent with ``endsAt`` = the
time it resolved, and re-sent every ``resend_interval`` for ``resolved_retention``
in case an Alertmanager missed it. Pending alerts are never sent. A 400 (bad label
name, empty label set) is logged and not retried; the good alerts of that batch
were stored anyway.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from agent.exporters.alerts.config import AlertmanagerConfig
from agent.exporters.alerts.evaluator import Update
from agent.exporters.alerts.notifiers.base import (
    Channel,
    Notifier,
    NotifyContext,
    post_json,
    rfc3339,
)
from agent.exporters.alerts.state import Alert

API_PATH = "/api/v2/alerts"


class AlertmanagerNotifier(Notifier):
    """Sends active and recently resolved alerts to Alertmanager."""

    def __init__(self, notifier_id: str, cfg: AlertmanagerConfig, ctx: NotifyContext) -> None:
        super().__init__(notifier_id, ctx)
        self.cfg = cfg
        self.validity = 4 * max(ctx.eval_interval, cfg.resend_interval)
        for url in cfg.urls:
            endpoint = url if url.rstrip("/").endswith(API_PATH) else url.rstrip("/") + API_PATH
            self.channels.append(Channel(ctx, notifier_id, cfg,
                                         partial(self._post, endpoint)))

    async def _post(self, endpoint: str, alerts: list[dict[str, Any]]) -> None:
        await post_json(self.ctx, endpoint, alerts, self.cfg.timeout)

    def notify(self, update: Update) -> None:
        cfg, now = self.cfg, update.now
        changed = {a.fingerprint for a in update.transitions}
        due: list[dict[str, Any]] = []
        for a in update.alerts:
            if a.state == "pending":
                continue
            if a.state == "resolved" and (not cfg.send_resolved or a.resolved_at is None
                                          or now - a.resolved_at >= cfg.resolved_retention):
                continue
            last = a.last_sent.get(self.id)
            if a.fingerprint in changed or last is None or now - last >= cfg.resend_interval:
                a.last_sent[self.id] = now
                due.append(self.payload(a, now))
        for i in range(0, len(due), cfg.max_batch):
            chunk = due[i:i + cfg.max_batch]
            for ch in self.channels:
                ch.offer(chunk, len(chunk))

    def payload(self, a: Alert, now: float) -> dict[str, Any]:
        """One alert as Alertmanager's ``postableAlert``."""
        ends = a.resolved_at if a.state == "resolved" and a.resolved_at is not None \
            else now + self.validity
        out: dict[str, Any] = {
            "labels": a.labels,
            "annotations": a.annotations,
            "startsAt": rfc3339(a.fired_at if a.fired_at is not None else a.active_since),
            "endsAt": rfc3339(ends),
        }
        if self.ctx.external_url:
            out["generatorURL"] = self.ctx.external_url
        return out
