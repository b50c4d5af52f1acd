"""The ``alerts`` exporter: evaluates alerting rules over the metrics that flow through it.

``consume`` only copies the latest points of the series that rules name into a
``SeriesStore`` (cheap, never blocks, never raises). Every ``interval`` the
evaluator runs the rules, the resulting transitions and active alerts are handed
to each notifier (which queue and send on their own tasks), and the alert table is
saved to the state directory, with what each notifier's peer acknowledged so far
(so a restart offers again what was lost, and nothing that arrived).

Time comes from an injectable ``Clock``: tests pass a fake one and drive
``evaluate_now()`` instead of waiting for the periodic loop (which sleeps in real
time, ``interval`` seconds between evaluations).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from agent.component import Capabilities, Host, Settings, Signal, cancel_tasks
from agent.config import ConfigError
from agent.exporters.alerts.config import (
    AlertmanagerConfig,
    AlertsConfig,
    RuleConfig,
    decode_notifiers,
    decode_rules,
    load_rules_file,
)
from agent.exporters.alerts.evaluator import Evaluator
from agent.exporters.alerts.notifiers import Clock, NotifyContext, SystemClock, build_notifiers
from agent.exporters.alerts.notifiers.base import EventNotifier
from agent.exporters.alerts.rules import CompiledRule
from agent.exporters.alerts.series import SeriesStore
from agent.exporters.alerts.state import Alert, StateFile, state_path
from agent.pdata import Batch, MetricBatch

# The rules shipped with the agent (``config/alerts.toml`` links here).
DEFAULT_RULES = Path(__file__).with_name("default_rules.toml")


class AlertsExporter:
    """Rules, evaluation loop, notifiers and persisted alert state of one ``alerts`` id."""

    capabilities = Capabilities(mutates_data=False)

    def __init__(self, settings: Settings, config: AlertsConfig, *,
                 clock: Clock | None = None) -> None:
        self.settings = settings
        self.cfg = config
        self.tel = settings.telemetry
        self.clock: Clock = clock or SystemClock()
        errors: list[str] = []
        self._inline_rules = decode_rules(config.rules, "rules", errors)
        self._notifier_configs = decode_notifiers(config.notifiers, "notifiers", errors)
        if errors:  # the config loader validated already; this is a programming error
            raise ConfigError(errors, settings.id)
        self.store = SeriesStore(set(), max_series=config.max_series,
                                 max_exemplars=config.max_exemplars, telemetry=self.tel)
        self.ctx = NotifyContext(settings.id, self.tel, self.clock, config.interval,
                                 config.external_url)
        self.notifiers = build_notifiers(self._notifier_configs, self.ctx)
        self.evaluator = self._make_evaluator(self._inline_rules)
        self._state: StateFile | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._eval_lock = asyncio.Lock()
        self._saved_nonempty = False
        self._started = False
        self._stopped = False
        self._gauge = self.tel.gauge("mlagent_agent_alerts", "Alerts held, by state.", ("state",))

    def _make_evaluator(self, rules: list[RuleConfig]) -> Evaluator:
        """An evaluator for ``rules``, with the store watching the metrics they read."""
        compiled = [CompiledRule(r, self.cfg.max_exemplars) for r in rules]
        self.store.watch(set().union(*(r.metrics for r in compiled)))
        # Alertmanager is the only notifier that re-sends resolved alerts; keep them as
        # long as any Alertmanager notifier wants them.
        keep = max((c.resolved_retention for c in self._notifier_configs.values()
                    if isinstance(c, AlertmanagerConfig) and c.send_resolved), default=0.0)
        events = [n for n in self.notifiers if isinstance(n, EventNotifier)]
        return Evaluator(compiled, self.store, staleness=self.cfg.staleness,
                         max_alerts=self.cfg.max_alerts, keep_resolved=keep,
                         trace_link_template=self.cfg.trace_link_template, telemetry=self.tel,
                         unsettled=lambda fp: any(n.unsettled(fp) for n in events))

    @property
    def rules(self) -> list[CompiledRule]:
        """The rules in effect (the config's, plus the rules file's once started)."""
        return self.evaluator.rules

    async def start(self, host: Host) -> None:
        """Read the rules file (a bad one fails start with every error), restore state,
        start the notifiers and the evaluation loop."""
        if self._started:
            return
        rules = list(self._inline_rules)
        if self.cfg.rules_file is not None:
            file_rules = await asyncio.to_thread(load_rules_file, self.cfg.rules_file)
            clash = {r.name for r in rules} & {r.name for r in file_rules}
            if clash:
                raise ConfigError([f"rules: {', '.join(sorted(clash))}: defined both in the "
                                   "exporter config and in the rules file"],
                                  str(self.cfg.rules_file))
            rules += file_rules
        if self.cfg.default_rules:
            shipped = await asyncio.to_thread(load_rules_file, DEFAULT_RULES)
            mine = {r.name for r in rules}
            rules = [r for r in shipped if r.name not in mine] + rules
        self.evaluator = self._make_evaluator(rules)
        self._state = StateFile(state_path(host.state_dir, self.settings.id))
        tracked = {n.id for n in self.notifiers if isinstance(n, EventNotifier)}
        alerts, problems = await asyncio.to_thread(self._state.load, tracked)
        for p in problems:
            self.tel.warn("state", "unreadable_alert_state", detail=p)
        for a in alerts:  # a notifier a reload removed owes nothing any more
            a.delivered = {k: v for k, v in a.delivered.items() if k in tracked}
        self.evaluator.restore(alerts, self.clock.time(), self.cfg.restore_grace)
        self._saved_nonempty = bool(alerts)
        self.ctx.report = lambda status, error: host.report_status(self.settings.id, status, error)
        self.ctx.session = aiohttp.ClientSession()
        restored = list(self.evaluator.table.values())
        for n in self.notifiers:
            n.start()
            try:  # what a peer did not acknowledge before the restart goes out now
                n.resume(restored)
            except Exception as e:  # one notifier's bug must not stop the others
                self.tel.error(f"notifier {n.id} failed to queue alerts", error=repr(e))
        self._loop_task = asyncio.create_task(self._loop(), name=f"{self.settings.id}-evaluate")
        self._started = True
        self.tel.info("started", rules=len(rules), restored_alerts=len(alerts),
                      notifiers=[n.id for n in self.notifiers])

    async def consume(self, batch: Batch) -> None:
        """Keep the latest points of the series that rules read. Never raises for bad data."""
        self.tel.accepted(batch.signal, batch.item_count)
        if isinstance(batch, MetricBatch) and batch.signal == Signal.METRICS:
            self.store.ingest(batch, self.clock.time())

    async def evaluate_now(self) -> None:
        """Evaluate every rule at the clock's current time, notify, and save the state."""
        async with self._eval_lock:
            update = self.evaluator.evaluate(self.clock.time())
            for n in self.notifiers:
                try:
                    n.notify(update)
                except Exception as e:  # one notifier's bug must not stop the others
                    self.tel.error(f"notifier {n.id} failed to queue alerts", error=repr(e))
            for state, count in self.evaluator.counts().items():
                self._gauge.labels(state).set(count)
            await self._save(update.alerts)

    async def flush(self) -> None:
        """Wait until every notification queued so far was delivered or dropped."""
        for n in self.notifiers:
            await n.drain()

    def alerts(self) -> list[Alert]:
        """The alerts held now (pending, firing, recently resolved)."""
        return list(self.evaluator.table.values())

    async def _save(self, alerts: list[Alert]) -> None:
        if self._state is None or (not alerts and not self._saved_nonempty):
            return
        # Copied here, on the event loop: the notifiers' tasks record their peers'
        # answers on the alerts (``delivered``) while the file is being written.
        records = [a.to_json() for a in alerts]
        try:
            await asyncio.to_thread(self._state.save, records)
            self._saved_nonempty = bool(alerts)
        except OSError as e:
            self.tel.warn("state", "alert_state_not_saved", error=e, path=str(self._state.path))

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.interval)
            try:
                await self.evaluate_now()
            except Exception as e:  # keep evaluating; a bug is logged (rate-limited), not fatal
                self.tel.error("rule evaluation failed", error=repr(e))

    async def shutdown(self) -> None:
        """Stop evaluating, save the state, drain the notifiers within ``shutdown_timeout``,
        and save again with what the peers acknowledged meanwhile."""
        if self._stopped:
            return
        self._stopped = True
        await cancel_tasks(self._loop_task)
        self._loop_task = None
        # Saved before draining too: the service's own deadline may cancel the drain.
        if self._started:
            await self._save(list(self.evaluator.table.values()))
        await asyncio.gather(*(n.shutdown(self.cfg.shutdown_timeout) for n in self.notifiers))
        if self._started:
            await self._save(list(self.evaluator.table.values()))
        if self.ctx.session is not None:
            await self.ctx.session.close()
            self.ctx.session = None

