"""The alert state machine: rules' group results in, transitions out.

At each evaluation, for every rule and group:

- the condition holds: a new alert starts ``pending`` (``active_since = now``); a
  pending one becomes ``firing`` once ``now - active_since >= for`` (with ``for = 0``
  at once);
- it does not hold (or the group has no fresh series): a pending alert is dropped
  without notice; a firing one stays firing while ``now - last_true <
  keep_firing_for`` (this damps flapping), then becomes ``resolved``.

Alerts restored from disk are held as they are while their group has not reported
again, for ``restore_grace`` after start, so a restart does not resolve everything or
reset ``for`` just because the metrics have not arrived yet. Resolved alerts are
kept for ``keep_resolved`` seconds (Alertmanager's resolved-retention), and longer
while a notifier's peer still has to acknowledge the resolve (``Alert.owes_resolve``),
then forgotten. The table is bounded by ``max_alerts``: when it is full, a new alert
takes the place of the resolved alert that ended first (counted ``alert_limit``), and
only when none is resolved is the new one dropped.

A peer that was told a label set fires and has not yet acknowledged that it stopped
still believes it fires, so that record (``Alert.delivered``) outlives the resolved
alert: a new alert of the same label set inherits it, and a pending one that ends
without firing becomes ``resolved`` (without a transition: it never fired this time)
instead of vanishing, so that the owed resolve is still sent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from agent.exporters.alerts.rules import CompiledRule, GroupResult, fingerprint
from agent.exporters.alerts.series import SeriesStore
from agent.exporters.alerts.state import Alert
from agent.telemetry import ComponentTelemetry


@dataclass
class Update:
    """What one evaluation hands to the notifiers.

    ``transitions`` are the alerts that started firing or resolved at this evaluation
    (their ``state`` says which); ``alerts`` is every alert held, for notifiers that
    resend (Alertmanager) or offer again what their peer has not acknowledged (Slack,
    PagerDuty, webhook). Notifiers copy what they send; they may only write their own
    key of ``Alert.last_sent`` and of ``Alert.delivered`` (the latter also later, from
    their sending task, once the peer answered).
    """

    now: float
    transitions: list[Alert]
    alerts: list[Alert]


class Evaluator:
    """Evaluates the rules over a ``SeriesStore`` and keeps the alert table."""

    def __init__(self, rules: list[CompiledRule], store: SeriesStore, *, staleness: float,
                 max_alerts: int, keep_resolved: float, trace_link_template: str,
                 telemetry: ComponentTelemetry,
                 unsettled: Callable[[str], bool] = lambda _fp: False) -> None:
        """``unsettled(fingerprint)``: whether a notifier still has a message about that
        alert queued or in flight (its answer must find the alert)."""
        self.rules = rules
        self.store = store
        self.staleness = staleness
        self.max_alerts = max_alerts
        self.keep_resolved = keep_resolved
        self.trace_link_template = trace_link_template
        self.tel = telemetry
        self.unsettled = unsettled
        self.table: dict[str, Alert] = {}
        self._grace_until = 0.0

    def restore(self, alerts: list[Alert], now: float, grace: float) -> None:
        """Adopt alerts read back from disk; hold them for ``grace`` seconds from ``now``."""
        for a in alerts[: self.max_alerts]:
            self.table[a.fingerprint] = a
        self._grace_until = now + grace

    def evaluate(self, now: float) -> Update:
        """Run every rule once at time ``now``."""
        transitions: list[Alert] = []
        self._forget_resolved(now)
        self.store.prune(now, self.staleness)
        by_rule: dict[str, list[Alert]] = {}
        for alert in self.table.values():
            by_rule.setdefault(alert.rule, []).append(alert)
        in_grace = now < self._grace_until
        for rule in self.rules:
            reported: set[str] = set()
            holding: set[str] = set()
            for res in rule.evaluate(self.store, now, self.staleness):
                fp = fingerprint(res.labels)
                reported.add(fp)
                current = self.table.get(fp)
                if current is not None:
                    current.restored = False
                if res.holds and self._holds(rule, res, fp, now, transitions):
                    holding.add(fp)
            for a in by_rule.pop(rule.name, []):
                if a.fingerprint in holding or a.state == "resolved":
                    continue
                if a.restored and in_grace and a.fingerprint not in reported:
                    continue
                if a.state == "pending":
                    self._end_pending(a, now)
                elif now - a.last_true >= rule.cfg.keep_firing_for:
                    self._resolve(a, now, transitions)
        # Alerts of rules that are gone (a reload removed or renamed them) end now.
        for alerts in by_rule.values():
            for a in alerts:
                if a.state == "pending":
                    self._end_pending(a, now)
                elif a.state == "firing":
                    self._resolve(a, now, transitions)
        return Update(now, transitions, list(self.table.values()))

    def counts(self) -> dict[str, int]:
        """Alerts held, by state."""
        out = {"pending": 0, "firing": 0, "resolved": 0}
        for a in self.table.values():
            out[a.state] += 1
        return out

    def _holds(self, rule: CompiledRule, res: GroupResult, fp: str, now: float,
               transitions: list[Alert]) -> bool:
        """The condition holds for a group: start, update or fire its alert.

        False when the alert table is full and a new alert had to be dropped.
        """
        a = self.table.get(fp)
        if a is None or a.state == "resolved":
            if a is None and len(self.table) >= self.max_alerts and not self._evict_resolved():
                self.tel.dropped("alerts", 1, "alert_limit")
                return False
            # The same dict, not a copy: answers to messages still in flight about the
            # resolved alert are recorded on it and must reach its successor.
            delivered = a.delivered if a is not None else {}
            a = self.table[fp] = Alert(fp, rule.name, res.labels, {}, "pending",
                                       active_since=now, last_true=now, delivered=delivered)
        a.last_true, a.value = now, res.value
        a.annotations = self._annotations(rule, res.value, res.labels, res.trace_ids)
        if a.state == "pending" and now - a.active_since >= rule.cfg.for_:
            a.state, a.fired_at = "firing", now
            transitions.append(a)
        return True

    def _resolve(self, a: Alert, now: float, transitions: list[Alert]) -> None:
        a.state, a.resolved_at = "resolved", now
        transitions.append(a)

    def _end_pending(self, a: Alert, now: float) -> None:
        """A pending alert whose condition stopped holding: forgotten, unless a peer still
        has to hear that an earlier alert of its label set resolved."""
        if self._owed(a):
            a.state, a.resolved_at = "resolved", now
        else:
            del self.table[a.fingerprint]

    def _owed(self, a: Alert) -> bool:
        return a.owes_resolve() or self.unsettled(a.fingerprint)

    def _forget_resolved(self, now: float) -> None:
        done = [fp for fp, a in self.table.items()
                if a.state == "resolved" and a.resolved_at is not None
                and now - a.resolved_at >= self.keep_resolved and not self._owed(a)]
        for fp in done:
            del self.table[fp]

    def _evict_resolved(self) -> bool:
        """Make room for a new alert by dropping the resolved alert that ended first.

        An alert that fires now matters more than re-sending (or still owing) the resolve
        of an old one; without this, a peer down for long would pin resolved alerts
        until the table refused new ones for every notifier.
        """
        resolved = [a for a in self.table.values() if a.state == "resolved"]
        if not resolved:
            return False
        oldest = min(resolved, key=lambda a: a.resolved_at or 0.0)
        del self.table[oldest.fingerprint]
        self.tel.dropped("alerts", 1, "alert_limit")
        return True

    def _annotations(self, rule: CompiledRule, value: float, labels: dict[str, str],
                     trace_ids: list[str]) -> dict[str, str]:
        out = rule.annotations(value, labels)
        if trace_ids:
            out["trace_ids"] = ",".join(trace_ids)
            if self.trace_link_template:
                out["trace_url"] = self.trace_link_template.replace("{trace_id}", trace_ids[0])
        return out
