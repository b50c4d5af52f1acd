"""The batch processor merges, and acknowledges only after the merged batch was taken."""

from __future__ import annotations

import asyncio

import pytest

from agent.component import RetryableError
from agent.processors.batch import BatchProcessor
from agent.processors.batch.config import BatchConfig
from agent.testing import Sink, settings_for, span, trace_batch


def batch_of(n: int, tag: int = 0):
    return trace_batch([span(span_id=bytes([tag, i, 0, 0, 0, 0, 0, 1])) for i in range(n)])


async def test_merges_up_to_size_and_acks_after_flush() -> None:
    sink = Sink()
    p = BatchProcessor(settings_for("batch"), BatchConfig(send_batch_size=10, timeout=30), sink)
    first = asyncio.create_task(p.consume(batch_of(4, 1)))
    await asyncio.sleep(0.01)
    assert not first.done() and sink.batches == []  # not acknowledged while only buffered
    await asyncio.gather(first, p.consume(batch_of(6, 2)))
    assert len(sink.batches) == 1 and sink.item_count == 10


async def test_timeout_flushes_a_small_batch() -> None:
    sink = Sink()
    p = BatchProcessor(settings_for("batch"), BatchConfig(send_batch_size=1000, timeout=0.05), sink)
    await asyncio.wait_for(p.consume(batch_of(3)), 2)
    assert sink.item_count == 3


async def test_downstream_refusal_reaches_every_contributor() -> None:
    sink = Sink()
    sink.fail_with = RetryableError("queue full", retry_after=3)
    p = BatchProcessor(settings_for("batch"), BatchConfig(send_batch_size=5, timeout=30), sink)
    results = await asyncio.gather(p.consume(batch_of(2, 1)), p.consume(batch_of(3, 2)),
                                   return_exceptions=True)
    assert all(isinstance(r, RetryableError) and r.retry_after == 3 for r in results)


async def test_shutdown_flushes_pending() -> None:
    sink = Sink()
    p = BatchProcessor(settings_for("batch"), BatchConfig(send_batch_size=1000, timeout=60), sink)
    waiter = asyncio.create_task(p.consume(batch_of(7)))
    await asyncio.sleep(0.01)
    await p.shutdown()
    await asyncio.wait_for(waiter, 1)
    assert sink.item_count == 7


async def test_refuses_when_too_much_is_pending() -> None:
    sink = Sink()
    one = batch_of(50)
    cfg = BatchConfig(send_batch_size=10_000, timeout=60, max_pending_bytes=one.byte_size + 10)
    p = BatchProcessor(settings_for("batch"), cfg, sink)
    waiter = asyncio.create_task(p.consume(one))
    await asyncio.sleep(0.01)
    with pytest.raises(RetryableError):
        await p.consume(batch_of(50, 9))
    await p.shutdown()
    await waiter
    assert sink.item_count == 50
