"""The ``internal`` receiver: the agent's own metrics, as OTLP, into a metrics pipeline.

Every ``interval`` it reads the self-metrics registry (the same numbers the health
endpoint's ``/metrics`` serves) and emits them as ``mlagent.agent.*`` metrics:
counters as cumulative monotonic sums, gauges as gauges, with the labels
(``component``, ``signal``, ``reason``) as attributes. Wire it into a metrics
pipeline to alert on the agent's own trouble or ship it upstream.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality

from agent.component import (
    ComponentFactory,
    Consumer,
    Host,
    Kind,
    Settings,
    Signal,
    cancel_tasks,
    emit,
)
from agent.config import Duration
from agent.pdata import MetricBatch

PROM_PREFIX = "mlagent_agent_"
OTLP_PREFIX = "mlagent.agent."


@dataclass
class InternalConfig:
    interval: Duration = 10.0

    def validate(self) -> list[str]:
        return ["interval: must be positive"] if self.interval <= 0 else []


class InternalReceiver:
    """Emits the agent's self-metrics every ``interval``."""

    def __init__(self, settings: Settings, config: InternalConfig, next: Consumer) -> None:
        self.settings = settings
        self.cfg = config
        self.next = next
        self.telemetry: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, host: Host) -> None:
        self.telemetry = host.telemetry
        self._task = asyncio.create_task(self._run(), name=f"{self.settings.id}-emit")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.interval)
            await self.emit()

    def build(self) -> MetricBatch:
        """The registry's current values as one OTLP metrics batch."""
        now = time.time_ns()
        out = MetricBatch()
        rm = out.request.resource_metrics.add()
        rm.resource.attributes.add(key="service.name").value.string_value = "mlagent"
        sm = rm.scope_metrics.add()
        sm.scope.name = "mlagent.agent"
        assert self.telemetry is not None
        for family in self.telemetry.registry.collect():
            if not family.name.startswith(PROM_PREFIX) or family.type not in ("counter", "gauge"):
                continue
            # No unit: the names already say it (``_bytes``, ``_seconds``), and a unit
            # would make exporters append a suffix (``1`` on a gauge reads ``_ratio``).
            m = sm.metrics.add(name=OTLP_PREFIX + family.name[len(PROM_PREFIX):],
                               description=family.documentation)
            if family.type == "counter":
                m.sum.is_monotonic = True
                m.sum.aggregation_temporality = (
                    AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE)
                points = m.sum.data_points
                samples = [s for s in family.samples if s.name.endswith("_total")]
            else:
                points = m.gauge.data_points
                samples = family.samples
            for s in samples:
                dp = points.add(time_unix_nano=now, as_double=float(s.value))
                if family.type == "counter":
                    # The registry outlives reloads; so does its counters' start.
                    dp.start_time_unix_nano = self.telemetry.started_ns
                for k, v in sorted(s.labels.items()):
                    dp.attributes.add(key=k).value.string_value = v
        return out

    async def emit(self) -> None:
        batch = self.build()
        if batch.item_count:
            await emit(self.next, batch, self.settings.telemetry)

    async def shutdown(self) -> None:
        await cancel_tasks(self._task)
        self._task = None


factory = ComponentFactory("internal", Kind.RECEIVER, InternalConfig, frozenset({Signal.METRICS}),
                           lambda settings, config, next: InternalReceiver(
                               settings, config, next[Signal.METRICS]))
