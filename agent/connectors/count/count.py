"""The ``count`` connector: spans, log records and data points counted per service.

Like the collector's count connector, it turns any signal into metrics:
``mlagent.count.spans``, ``mlagent.count.log_records`` and
``mlagent.count.data_points`` -- cumulative monotonic sums with a ``service.name``
attribute, emitted every ``interval`` and once more at shutdown.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality

from agent.component import (
    Capabilities,
    ComponentFactory,
    Consumer,
    Host,
    Kind,
    Settings,
    Signal,
    cancel_tasks,
    emit,
)
from agent.connectors.count.config import CountConfig
from agent.pdata import Batch, MetricBatch, data_points, service_name

METRIC_NAMES = {
    Signal.TRACES: ("mlagent.count.spans", "Spans received, per service."),
    Signal.LOGS: ("mlagent.count.log_records", "Log records received, per service."),
    Signal.METRICS: ("mlagent.count.data_points", "Metric data points received, per service."),
}
OTHER = "_other"


class CountConnector:
    """Counts items of every signal it is wired for; emits metrics on a timer."""

    capabilities = Capabilities(mutates_data=False)

    def __init__(self, settings: Settings, config: CountConfig, next: Consumer) -> None:
        self.settings = settings
        self.cfg = config
        self.next = next
        self.counts: dict[Signal, Counter[str]] = {s: Counter() for s in Signal}
        self.start_ns = time.time_ns()
        self._task: asyncio.Task[None] | None = None

    async def start(self, host: Host) -> None:
        self._task = asyncio.create_task(self._run(), name=f"{self.settings.id}-emit")

    async def consume(self, batch: Batch) -> None:
        counts = self.counts[batch.signal]
        for res in batch.resources():
            svc = service_name(res.resource)
            if svc not in counts and len(counts) >= self.cfg.max_services:
                svc = OTHER
            counts[svc] += _items(batch.signal, res)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.interval)
            await self.emit()

    def build(self) -> MetricBatch | None:
        """The current cumulative counts as one metrics batch (None when nothing was seen)."""
        if not any(self.counts.values()):
            return None
        now = time.time_ns()
        out = MetricBatch()
        sm = out.request.resource_metrics.add().scope_metrics.add()
        sm.scope.name = "mlagent.count"
        for sig, counts in self.counts.items():
            if not counts:
                continue
            name, desc = METRIC_NAMES[sig]
            m = sm.metrics.add(name=name, description=desc, unit="1")
            m.sum.is_monotonic = True
            m.sum.aggregation_temporality = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
            for svc, n in sorted(counts.items()):
                dp = m.sum.data_points.add(start_time_unix_nano=self.start_ns, time_unix_nano=now,
                                           as_int=n)
                dp.attributes.add(key="service.name").value.string_value = svc
        return out

    async def emit(self) -> None:
        """Send the counts downstream; a refusal is counted, the counts stay cumulative."""
        batch = self.build()
        if batch is not None:
            await emit(self.next, batch, self.settings.telemetry)

    async def shutdown(self) -> None:
        task, self._task = self._task, None
        if task is not None:  # started, and not yet stopped: flush the counts once
            await cancel_tasks(task)
            await self.emit()


def _items(signal: Signal, res: Any) -> int:
    if signal is Signal.TRACES:
        return sum(len(ss.spans) for ss in res.scope_spans)
    if signal is Signal.LOGS:
        return sum(len(sl.log_records) for sl in res.scope_logs)
    return sum(len(data_points(m)) for sm in res.scope_metrics for m in sm.metrics)


factory = ComponentFactory("count", Kind.CONNECTOR, CountConfig, frozenset(Signal),
                           lambda settings, config, next: CountConnector(
                               settings, config, next[Signal.METRICS]),
                           output_signals=frozenset({Signal.METRICS}))
