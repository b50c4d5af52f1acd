"""Child process of the SIGKILL test: puts batches into a persistent queue forever.

Prints ``A <n>`` once the put of batch ``n`` returned (acknowledged) and ``S <n>``
when the backend took batch ``n``; the backend accepts every third attempt so
that deletes race the kill as well. Never returns: the test kills it with SIGKILL.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from agent.component import Kind, RetryableError
from agent.queue import QueueConfig, QueuedSender, RetryConfig
from agent.testing import make_host, settings_for, span, trace_batch


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def main(state_dir: Path) -> None:
    attempts = 0

    async def send(batch) -> None:
        nonlocal attempts
        attempts += 1
        if attempts % 3:
            raise RetryableError("flaky", retry_after=0.001)
        say(f"S {batch.request.resource_spans[0].scope_spans[0].spans[0].name}")

    sender = QueuedSender(settings_for("otlp/up", Kind.EXPORTER),
                          QueueConfig(persistent=True, consumers=2),
                          RetryConfig(initial_interval=0.001, max_interval=0.002,
                                      max_elapsed_time=0), send)
    await sender.start(make_host(state_dir))
    counter = iter(range(10**9))

    async def producer() -> None:
        while True:
            n = next(counter)
            await sender.put(trace_batch([span(str(n)), span(str(n))]))
            say(f"A {n}")

    await asyncio.gather(*(producer() for _ in range(4)))


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
