"""QueuedSender: the in-memory sending queue with retries (persistence: see issue 3)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from agent.component import Host, PermanentError, RetryableError, Settings
from agent.config import Duration
from agent.pdata import Batch


@dataclass
class RetryConfig:
    """``retry_on_failure``: exponential backoff with jitter."""

    enabled: bool = True
    initial_interval: Duration = 1.0
    max_interval: Duration = 30.0
    max_elapsed_time: Duration = 300.0
    multiplier: float = 1.5
    randomization_factor: float = 0.5

    def validate(self) -> list[str]:
        errs = []
        if self.multiplier < 1:
            errs.append("multiplier: must be >= 1")
        if not 0 <= self.randomization_factor <= 1:
            errs.append("randomization_factor: must be within 0..1")
        return errs


@dataclass
class QueueConfig:
    """``sending_queue``: bounded by items; ``when_full`` decides between backpressure and drops."""

    enabled: bool = True
    max_items: int = 100_000
    when_full: Literal["block", "drop_newest"] = "block"
    block_timeout: Duration = 5.0
    consumers: int = 4
    timeout: Duration = 10.0  # per send attempt


class QueuedSender:
    """A bounded queue in front of ``send`` with ``consumers`` workers retrying with backoff."""

    def __init__(self, settings: Settings, queue: QueueConfig, retry: RetryConfig,
                 send: Callable[[Batch], Awaitable[None]]) -> None:
        self.settings = settings
        self.tel = settings.telemetry
        self.qc = queue
        self.rc = retry
        self._send = send
        self._q: asyncio.Queue[Batch] = asyncio.Queue()
        self._items = 0
        self._space = asyncio.Condition()
        self._workers: list[asyncio.Task[None]] = []
        self._stopping = False

    async def start(self, host: Host) -> None:
        if self.qc.enabled:
            self._workers = [asyncio.create_task(self._worker(), name=f"{self.settings.id}-send-{i}")
                             for i in range(max(1, self.qc.consumers))]

    async def put(self, batch: Batch) -> None:
        """Accept ``batch`` into the queue (or send it directly when the queue is disabled)."""
        n = batch.item_count
        if not self.qc.enabled:
            await self._attempt_until_done(batch)
            return
        async with self._space:
            if self._items + n > self.qc.max_items and self._items > 0:
                if self.qc.when_full == "drop_newest":
                    self.tel.dropped(batch.signal, n, "queue_full")
                    return
                try:
                    await asyncio.wait_for(
                        self._space.wait_for(lambda: self._items + n <= self.qc.max_items),
                        self.qc.block_timeout)
                except TimeoutError:
                    self.tel.refused(batch.signal, n, "queue_full")
                    raise RetryableError("sending queue is full", retry_after=1.0) from None
            self._items += n
        self._q.put_nowait(batch)

    async def _worker(self) -> None:
        while True:
            batch = await self._q.get()
            try:
                await self._attempt_until_done(batch)
            finally:
                async with self._space:
                    self._items -= batch.item_count
                    self._space.notify_all()
                self._q.task_done()

    async def _attempt_until_done(self, batch: Batch) -> None:
        """Send with retries; drops (and counts) on permanent error or when retries run out."""
        sig, n = batch.signal, batch.item_count
        started = time.monotonic()
        interval = self.rc.initial_interval
        while True:
            try:
                await asyncio.wait_for(self._send(batch), self.qc.timeout)
                self.tel.sent(sig, n)
                return
            except PermanentError as e:
                self.tel.dropped(sig, e.rejected or n, "permanent_error", e)
                return
            except (RetryableError, TimeoutError, OSError) as e:
                self.tel.send_failed(sig, n, type(e).__name__, e)
                hint = getattr(e, "retry_after", None)
                delay = hint if hint is not None else interval * (
                    1 + self.rc.randomization_factor * (2 * random.random() - 1))
                if not self.rc.enabled or time.monotonic() - started + delay > self.rc.max_elapsed_time:
                    self.tel.dropped(sig, n, "retries_exhausted", e)
                    return
                self.tel.retried(sig)
                await asyncio.sleep(delay)
                interval = min(interval * self.rc.multiplier, self.rc.max_interval)

    async def shutdown(self, deadline: float = 5.0) -> None:
        """Drain what is queued within ``deadline`` seconds, then cancel the workers."""
        if self._workers:
            try:
                await asyncio.wait_for(self._q.join(), deadline)
            except TimeoutError:
                self.tel.warn("shutdown", "drain_deadline", items_left=self._items)
            for w in self._workers:
                w.cancel()
            await asyncio.gather(*self._workers, return_exceptions=True)
            self._workers = []
