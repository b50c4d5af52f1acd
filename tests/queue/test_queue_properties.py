"""Property: whatever the backend answers, every batch put is delivered or counted.

Hypothesis scripts the backend's answers (accept, retryable error with or without
a hint, connection error, permanent error) and, for a persistent queue, a restart
halfway through. Afterwards every batch was delivered exactly once, or dropped as
permanent and counted; nothing else may happen to it.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.component import Kind, PermanentError, RetryableError
from agent.queue import QueueConfig, QueuedSender
from agent.telemetry import Telemetry
from agent.testing import make_host, settings_for
from tests.queue.queue_doubles import FAST_RETRY, batch

ANSWERS = st.sampled_from(["ok", "ok", "retry", "retry_hint", "reset", "permanent"])


class ScriptedBackend:
    """Answers each call with the next scripted answer (then accepts everything)."""

    def __init__(self, script: list[str]) -> None:
        self.script = list(script)
        self.received: list[str] = []
        self.rejected: list[str] = []

    async def send(self, b) -> None:
        name = b.request.resource_spans[0].scope_spans[0].spans[0].name
        answer = self.script.pop(0) if self.script else "ok"
        if answer == "retry":
            raise RetryableError("busy")
        if answer == "retry_hint":
            raise RetryableError("busy", retry_after=0.001)
        if answer == "reset":
            raise ConnectionResetError("reset")
        if answer == "permanent":
            self.rejected.append(name)
            raise PermanentError("bad")
        self.received.append(name)


async def scenario(state: Path, n: int, script: list[str], persistent: bool,
                   consumers: int) -> None:
    backend = ScriptedBackend(script)
    tel = Telemetry()
    queue = QueueConfig(persistent=persistent, consumers=consumers)

    def sender() -> QueuedSender:
        return QueuedSender(settings_for("otlp/up", Kind.EXPORTER, tel), queue, FAST_RETRY,
                            backend.send)

    s = sender()
    await s.start(make_host(state))
    names = [f"b{i}" for i in range(n)]
    for name in names[: n // 2]:
        await s.put(batch(name, spans=2))
    if persistent:  # restart halfway: nothing queued may be lost or sent twice
        await s.shutdown(deadline=0.01)
        s = sender()
        await s.start(make_host(state))
    for name in names[n // 2:]:
        await s.put(batch(name, spans=2))
    async with asyncio.timeout(10):
        while len(backend.received) + len(backend.rejected) < n:
            await asyncio.sleep(0.002)
    await s.shutdown()

    assert sorted(backend.received + backend.rejected) == sorted(names)
    snap = tel.snapshot("otlp/up")
    assert snap.get("mlagent_agent_dropped_items_total{reason=permanent_error,signal=traces}",
                    0) == 2 * len(backend.rejected)
    assert snap.get("mlagent_agent_sent_items_total{signal=traces}", 0) == 2 * len(backend.received)
    assert not [k for k in snap if k.startswith("mlagent_agent_dropped")
                and "permanent_error" not in k]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 12), script=st.lists(ANSWERS, max_size=40), persistent=st.booleans(),
       consumers=st.integers(1, 3))
def test_every_batch_is_delivered_once_or_counted(n, script, persistent, consumers):
    with tempfile.TemporaryDirectory(prefix="queue-prop-") as state:
        asyncio.run(scenario(Path(state), n, script, persistent, consumers))
