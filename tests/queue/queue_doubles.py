"""Doubles shared by the queue tests: a scriptable backend and batch helpers."""

from __future__ import annotations

import asyncio

from agent.component import RetryableError
from agent.pdata import Batch
from agent.queue import RetryConfig
from agent.testing import span, trace_batch

# Retries every few milliseconds, forever: tests wait for outcomes, not for backoff.
FAST_RETRY = RetryConfig(initial_interval=0.001, max_interval=0.005, max_elapsed_time=0)


def batch(name: str, spans: int = 1) -> Batch:
    """A trace batch of ``spans`` spans all named ``name`` (the batch's identity in tests)."""
    return trace_batch([span(name) for _ in range(spans)])


def names(batches: list[Batch]) -> list[str]:
    """The name of each batch, as given to ``batch``."""
    return [b.request.resource_spans[0].scope_spans[0].spans[0].name for b in batches]


class Backend:
    """A send target: fails with queued ``errors`` first, or while ``down``; else records."""

    def __init__(self) -> None:
        self.received: list[Batch] = []
        self.errors: list[BaseException] = []
        self.down = False
        self.calls = 0
        self.gate: asyncio.Event | None = None  # when set, sends wait for it

    async def send(self, b: Batch) -> None:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.errors:
            raise self.errors.pop(0)
        if self.down:
            raise RetryableError("backend down", retry_after=0.001)
        self.received.append(b)

    async def wait_for(self, count: int, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.received) < count:
                await asyncio.sleep(0.005)
