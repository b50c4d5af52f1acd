"""The batch processor: merges requests, and acknowledges only once the merged batch is taken.

Unlike the collector's batch processor, ``consume`` does not return when the data is
merely buffered: each caller waits for the flush of the batch its data went into
and sees that flush's outcome. Batching therefore never weakens the receiver's
acknowledgement (DESIGN: nothing acknowledged is lost), and a SIGTERM flushes what
is pending into the exporters before they stop.

Because callers wait, a timer alone would put ``timeout`` on every request of a
sender that exports one request at a time (the OTel SDKs' batch processors do).
So batching is group commit: while fewer than ``max_in_flight`` flushes are running,
a batch is flushed at once; data arriving while the flushes run is merged and goes
in the next one. Under load batches grow by themselves, with no added latency when
idle; ``send_batch_size`` and ``timeout`` bound a batch's size and wait.
"""

from __future__ import annotations

import asyncio

from agent.component import (
    Capabilities,
    ComponentFactory,
    Consumer,
    Host,
    Kind,
    PermanentError,
    RetryableError,
    Settings,
    Signal,
)
from agent.pdata import Batch
from agent.processors.batch.config import BatchConfig

# The wait suggested to senders whose data was in a flush the shutdown deadline cancelled.
SHUTDOWN_RETRY_AFTER = 1.0


class _Pending:
    """The batch being filled and the callers waiting for its flush."""

    def __init__(self, first: Batch, loop: asyncio.AbstractEventLoop) -> None:
        self.batch = first
        self.items = first.item_count
        self.bytes = first.byte_size
        self.done: asyncio.Future[None] = loop.create_future()
        self.timer: asyncio.TimerHandle | None = None
        self.callers = 1  # requests merged into this batch


class BatchProcessor:
    """Merges batches up to ``send_batch_size`` items or ``timeout``, whichever comes first."""

    # It takes ownership of batches and merges into the first one it was handed.
    capabilities = Capabilities(mutates_data=True)

    def __init__(self, settings: Settings, config: BatchConfig, next: Consumer) -> None:
        self.settings = settings
        self.cfg = config
        self.next = next
        self._pending: _Pending | None = None
        self._flushing: set[asyncio.Task[None]] = set()
        self._closed = False

    async def start(self, host: Host) -> None:
        self._closed = False

    async def consume(self, batch: Batch) -> None:
        if self._closed:  # stopping: nothing may wait for a flush that will not come
            await self.next.consume(batch)
            return
        p = self._pending
        if p is not None and p.bytes + batch.byte_size > self.cfg.max_pending_bytes:
            self.settings.telemetry.refused(batch.signal, batch.item_count, "batch_pending_full")
            raise RetryableError("batch processor: too much data pending", retry_after=1.0)
        loop = asyncio.get_running_loop()
        if p is None:
            p = self._pending = _Pending(batch, loop)
            p.timer = loop.call_later(self.cfg.timeout, self._flush_soon, p)
        else:
            p.batch.extend(batch)
            p.items += batch.item_count
            p.bytes += batch.byte_size
            p.callers += 1
        if p.items >= self.cfg.send_batch_size or len(self._flushing) < self.cfg.max_in_flight:
            self._flush_soon(p)
        await asyncio.shield(p.done)

    def _flush_soon(self, p: _Pending) -> None:
        if self._pending is not p:
            return
        self._pending = None
        if p.timer is not None:
            p.timer.cancel()
        task = asyncio.get_running_loop().create_task(self._flush(p))
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def _flush(self, p: _Pending) -> None:
        try:
            await self.next.consume(p.batch)
        except PermanentError as e:
            if e.rejected is None or e.rejected >= p.items or p.callers == 1:
                self._settle(p, e)
            else:
                # Part of a merged batch was rejected, and nothing says whose part: handing
                # ``rejected`` to every contributor would tell each sender that its share
                # was lost (and count the loss once per sender). The rest of the pipeline
                # took the data, so the callers hear success and the drop is counted here,
                # once.
                self.settings.telemetry.dropped(p.batch.signal, e.rejected,
                                                "downstream_rejected", e)
                self._settle(p, None)
        except asyncio.CancelledError:
            # A flush cancelled by the drain deadline did not deliver: the waiters'
            # senders must hear "retry" (503 / UNAVAILABLE), not a cancellation that is
            # not theirs and that their receiver would answer with nothing.
            self._settle(p, RetryableError("agent is shutting down",
                                           retry_after=SHUTDOWN_RETRY_AFTER))
            raise
        except BaseException as e:  # every waiter gets the flush's outcome
            self._settle(p, e)
        else:
            self._settle(p, None)
        finally:
            self._flushing.discard(asyncio.current_task())  # type: ignore[arg-type]
            # What arrived during this flush goes now (group commit).
            if self._pending is not None and len(self._flushing) < self.cfg.max_in_flight:
                self._flush_soon(self._pending)

    @staticmethod
    def _settle(p: _Pending, error: BaseException | None) -> None:
        """Give every waiter of ``p`` the flush's outcome."""
        if p.done.done():
            return
        if error is None:
            p.done.set_result(None)
        else:
            p.done.set_exception(error)
            p.done.exception()  # retrieved once, so an unwaited future does not warn

    async def shutdown(self) -> None:
        """Flush what is pending and wait for in-flight flushes.

        When the graph's drain deadline cancels this wait, the flushes are cancelled
        too and their callers get ``RetryableError`` ("agent is shutting down").
        """
        self._closed = True
        if self._pending is not None:
            self._flush_soon(self._pending)
        if self._flushing:
            await asyncio.gather(*list(self._flushing), return_exceptions=True)


# One instance per pipeline.
factory = ComponentFactory("batch", Kind.PROCESSOR, BatchConfig, frozenset(Signal),
                           lambda settings, config, next: BatchProcessor(settings, config,
                                                                         *next.values()),
                           output_signals=frozenset(Signal))
