"""The batch processor: group commit, and acknowledgement only after the merged batch is taken."""

from __future__ import annotations

import asyncio

import pytest

from agent.component import PermanentError, RetryableError
from agent.processors.batch import BatchProcessor
from agent.processors.batch.config import BatchConfig
from agent.telemetry import Telemetry
from agent.testing import Sink, settings_for, span, trace_batch


class GatedSink(Sink):
    """A sink whose ``consume`` blocks until ``gate`` is set (a busy exporter queue)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.entered = 0

    async def consume(self, batch) -> None:
        self.entered += 1
        await self.gate.wait()
        await super().consume(batch)


def batch_of(n: int, tag: int = 0):
    return trace_batch([span(span_id=bytes([tag, i, 0, 0, 0, 0, 0, 1])) for i in range(n)])


def processor(sink, telemetry: Telemetry | None = None, **kw) -> BatchProcessor:
    return BatchProcessor(settings_for("batch", telemetry=telemetry), BatchConfig(**kw), sink)


async def test_an_idle_pipeline_adds_no_wait() -> None:
    """A sender exporting one request at a time is not held for the timeout."""
    sink = Sink()
    p = processor(sink, send_batch_size=1000, timeout=60)
    await asyncio.wait_for(p.consume(batch_of(3)), 1)
    await asyncio.wait_for(p.consume(batch_of(2, 1)), 1)
    assert [b.item_count for b in sink.batches] == [3, 2]


async def test_data_arriving_during_a_flush_is_merged_and_acked_after_its_flush() -> None:
    sink = GatedSink()
    p = processor(sink, send_batch_size=1000, timeout=60, max_in_flight=1)
    first = asyncio.create_task(p.consume(batch_of(4, 1)))
    await asyncio.sleep(0.01)
    assert sink.entered == 1  # flushed at once: downstream was idle
    later = [asyncio.create_task(p.consume(batch_of(n, t))) for t, n in ((2, 6), (3, 3))]
    await asyncio.sleep(0.01)
    assert not first.done() and not any(t.done() for t in later)  # nothing acked while held
    sink.gate.set()
    await asyncio.wait_for(asyncio.gather(first, *later), 2)
    assert [b.item_count for b in sink.batches] == [4, 9]


async def test_size_bound_flushes_even_while_busy() -> None:
    sink = GatedSink()
    p = processor(sink, send_batch_size=5, timeout=60, max_in_flight=1)
    busy = asyncio.create_task(p.consume(batch_of(1, 1)))
    await asyncio.sleep(0.01)
    full = asyncio.create_task(p.consume(batch_of(5, 2)))
    await asyncio.sleep(0.01)
    assert sink.entered == 2
    sink.gate.set()
    await asyncio.gather(busy, full)


async def test_timeout_bounds_the_wait_while_busy() -> None:
    sink = GatedSink()
    p = processor(sink, send_batch_size=1000, timeout=0.05, max_in_flight=1)
    busy = asyncio.create_task(p.consume(batch_of(1, 1)))
    await asyncio.sleep(0.01)
    waiting = asyncio.create_task(p.consume(batch_of(2, 2)))
    await asyncio.sleep(0.2)
    assert sink.entered == 2  # the timer flushed it though the first flush still runs
    sink.gate.set()
    await asyncio.gather(busy, waiting)


async def test_downstream_refusal_reaches_every_contributor() -> None:
    sink = GatedSink()
    p = processor(sink, send_batch_size=1000, timeout=60, max_in_flight=1)
    busy = asyncio.create_task(p.consume(batch_of(1, 1)))
    await asyncio.sleep(0.01)
    merged = [asyncio.create_task(p.consume(batch_of(n, t))) for t, n in ((2, 2), (3, 3))]
    await asyncio.sleep(0.01)
    sink.fail_with = RetryableError("queue full", retry_after=3)
    sink.gate.set()
    results = await asyncio.gather(busy, *merged, return_exceptions=True)
    assert all(isinstance(r, RetryableError) and r.retry_after == 3 for r in results)


async def test_shutdown_flushes_pending() -> None:
    sink = GatedSink()
    p = processor(sink, send_batch_size=1000, timeout=60, max_in_flight=1)
    busy = asyncio.create_task(p.consume(batch_of(1, 1)))
    await asyncio.sleep(0.01)
    pending = asyncio.create_task(p.consume(batch_of(7, 2)))
    await asyncio.sleep(0.01)
    sink.gate.set()
    await p.shutdown()
    await asyncio.wait_for(asyncio.gather(busy, pending), 1)
    assert sink.item_count == 8


async def test_refuses_when_too_much_is_pending() -> None:
    sink = GatedSink()
    one = batch_of(50)
    p = processor(sink, send_batch_size=10_000, timeout=60, max_in_flight=1,
                  max_pending_bytes=one.byte_size + 10)
    busy = asyncio.create_task(p.consume(batch_of(1, 9)))
    await asyncio.sleep(0.01)
    waiter = asyncio.create_task(p.consume(one))
    await asyncio.sleep(0.01)
    with pytest.raises(RetryableError):
        await p.consume(batch_of(50, 8))
    sink.gate.set()
    await asyncio.gather(busy, waiter)
    assert sink.item_count == 51


async def test_a_flush_cut_by_the_drain_deadline_tells_every_contributor_to_retry() -> None:
    """The graph's deadline cancels the flush: its callers hear "retry", not a cancellation."""
    sink = GatedSink()  # never opens: an exporter queue that stays full
    p = processor(sink, send_batch_size=1000, timeout=60, max_in_flight=1)
    busy = asyncio.create_task(p.consume(batch_of(1, 1)))
    await asyncio.sleep(0.01)
    merged = [asyncio.create_task(p.consume(batch_of(n, t))) for t, n in ((2, 2), (3, 3))]
    await asyncio.sleep(0.01)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(p.shutdown(), 0.05)  # Graph.shutdown at its deadline
    results = await asyncio.gather(busy, *merged, return_exceptions=True)
    assert [type(r) for r in results] == [RetryableError] * 3
    assert all(str(r) == "agent is shutting down" and r.retry_after for r in results)


async def test_a_partial_rejection_of_a_merged_batch_is_counted_once_not_per_caller() -> None:
    """Nothing says whose item was rejected: each caller hears success (the rest of the
    pipeline took its data) and the rejected item is counted once, not once per caller."""
    sink, tel = GatedSink(), Telemetry()
    p = processor(sink, tel, send_batch_size=1000, timeout=60, max_in_flight=1)
    alone = asyncio.create_task(p.consume(batch_of(4, 1)))
    await asyncio.sleep(0.01)
    merged = [asyncio.create_task(p.consume(batch_of(n, t))) for t, n in ((2, 6), (3, 3))]
    await asyncio.sleep(0.01)
    sink.fail_with = PermanentError("peer rejected 1 item", rejected=1)
    sink.gate.set()
    with pytest.raises(PermanentError) as ei:  # one caller: the rejection is its own
        await alone
    assert ei.value.rejected == 1
    assert await asyncio.gather(*merged) == [None, None]
    snap = tel.snapshot("batch")
    assert snap["mlagent_agent_dropped_items_total{reason=downstream_rejected,signal=traces}"] == 1
