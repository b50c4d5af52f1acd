"""The ``memory_limiter`` processor: refuse new data while the agent holds too much.

Put it first in every pipeline. A refusal is a ``RetryableError`` carrying
``retry_after``, which the OTLP receiver turns into 503 / UNAVAILABLE with a retry
hint, so well-behaved SDKs back off and keep their data instead of the agent
growing until the kernel kills it.
"""

from __future__ import annotations

import asyncio
import gc

import psutil

from agent.component import (
    Capabilities,
    ComponentFactory,
    Consumer,
    Host,
    Kind,
    RetryableError,
    Settings,
    Signal,
    Status,
    cancel_tasks,
)
from agent.pdata import Batch
from agent.processors.memory_limiter.config import MemoryLimiterConfig
from agent.queue.memory import MemoryAccountant


class MemoryLimiter:
    """Passes batches on unless a soft or hard limit is exceeded (then refuses them)."""

    capabilities = Capabilities(mutates_data=False)

    def __init__(self, settings: Settings, config: MemoryLimiterConfig,
                 next_consumer: Consumer) -> None:
        self.settings = settings
        self.tel = settings.telemetry
        self.config = config
        self._next = next_consumer
        self._memory = MemoryAccountant()
        self._process = psutil.Process()
        self._rss_refusal: str | None = None  # reason while RSS is above a limit
        self._task: asyncio.Task[None] | None = None
        self._held_gauge = self.tel.gauge("mlagent_agent_memory_held_bytes",
                                          "Bytes of telemetry held by the agent's queues.")
        self._rss_gauge = self.tel.gauge("mlagent_agent_memory_rss_bytes",
                                         "Resident set size of the agent process.")

    async def start(self, host: Host) -> None:
        """Install the hard limit, check the queues' bounds against it, start sampling RSS."""
        cfg = self.config
        self._memory = MemoryAccountant.of(host)
        # Several pipelines share one accountant: the strictest limit wins.
        current = self._memory.hard_limit
        self._memory.hard_limit = cfg.data_hard_limit if current is None \
            else min(current, cfg.data_hard_limit)
        total = self._memory.bounds_total
        if total > cfg.data_hard_limit:
            msg = (f"sending queues may hold {total} bytes together, more than "
                   f"data_hard_limit {cfg.data_hard_limit}: they will be refused before "
                   f"their max_bytes (bounds: {self._memory.bounds})")
            self.tel.warn("config", "bounds_exceed_hard_limit", detail=msg)
            host.report_status(self.settings.id, Status.DEGRADED, msg)
        self._check_rss()
        if self._task is None:
            self._task = asyncio.create_task(self._watch(), name=f"{self.settings.id}-rss")

    async def shutdown(self) -> None:
        """Stop sampling RSS. Idempotent; holds no data, so there is nothing to flush."""
        await cancel_tasks(self._task)
        self._task = None

    async def consume(self, batch: Batch) -> None:
        """Refuse ``batch`` (``RetryableError``, counted) above a limit; else pass it on."""
        reason = self._rss_refusal
        if reason is None and self._memory.held > self.config.data_soft_limit:
            reason = "data_soft_limit"
        if reason is not None:
            self.tel.refused(batch.signal, batch.item_count, reason)
            raise RetryableError(f"agent memory limit reached ({reason})",
                                 retry_after=self.config.retry_after)
        await self._next.consume(batch)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.config.check_interval)
            self._check_rss()

    def _check_rss(self) -> None:
        """Sample RSS (a cheap /proc read) and decide whether to refuse until the next check."""
        cfg = self.config
        rss = self._process.memory_info().rss
        self._rss_gauge.labels().set(rss)
        self._held_gauge.labels().set(self._memory.held)
        if cfg.rss_hard_limit and rss > cfg.rss_hard_limit:
            # Refusing stops growth; collecting may give back what cycles still hold.
            gc.collect()
            self._rss_refusal = "rss_hard_limit"
        elif cfg.rss_soft_limit and rss > cfg.rss_soft_limit:
            self._rss_refusal = "rss_soft_limit"
        else:
            self._rss_refusal = None


# One instance per pipeline; all share the agent's memory accountant.
factory = ComponentFactory("memory_limiter", Kind.PROCESSOR, MemoryLimiterConfig, frozenset(Signal),
                           lambda settings, config, next: MemoryLimiter(settings, config,
                                                                        *next.values()),
                           output_signals=frozenset(Signal))
