"""The in-memory sending queue: bounds, backpressure, retries, drops, shutdown."""

from __future__ import annotations

import asyncio

import pytest

from agent.component import Kind, PermanentError, RetryableError
from agent.queue import MemoryAccountant, QueueConfig, QueuedSender, RetryConfig
from agent.telemetry import Telemetry
from agent.testing import make_host, settings_for
from tests.queue.queue_doubles import FAST_RETRY, Backend, batch, names


def counters(tel: Telemetry, cid: str = "otlp/up") -> dict[str, float]:
    """The self-metrics of one component, keyed ``name{label=value,...}``."""
    return tel.snapshot(cid)


def make_sender(backend: Backend, *, queue: QueueConfig | None = None,
                retry: RetryConfig = FAST_RETRY, tel: Telemetry | None = None):
    tel = tel or Telemetry()
    settings = settings_for("otlp/up", Kind.EXPORTER, tel)
    return QueuedSender(settings, queue or QueueConfig(), retry, backend.send), tel


async def test_delivers_every_batch_and_empties_the_gauges(tmp_path):
    backend = Backend()
    sender, tel = make_sender(backend)
    await sender.start(make_host(tmp_path))
    for i in range(20):
        await sender.put(batch(f"b{i}", spans=3))
    await backend.wait_for(20)
    await sender.shutdown()
    assert sorted(names(backend.received)) == sorted(f"b{i}" for i in range(20))
    c = counters(tel)
    assert c["mlagent_agent_sent_items_total{signal=traces}"] == 60
    assert c["mlagent_agent_queue_size{signal=traces}"] == 0
    assert c["mlagent_agent_queue_bytes{signal=traces}"] == 0


async def test_retryable_failures_are_retried_until_delivered_and_honour_retry_after(tmp_path):
    backend = Backend()
    # A computed backoff of a minute: only the backend's retry_after hint lets the
    # batch arrive within the test's timeout.
    retry = RetryConfig(initial_interval=60, max_interval=60, max_elapsed_time=0)
    backend.errors = [RetryableError("busy", retry_after=0.01) for _ in range(3)]
    sender, tel = make_sender(backend, retry=retry, queue=QueueConfig(consumers=1))
    await sender.start(make_host(tmp_path))
    await sender.put(batch("a"))
    await backend.wait_for(1)
    await sender.shutdown()
    assert names(backend.received) == ["a"]
    c = counters(tel)
    assert c["mlagent_agent_retries_total{signal=traces}"] == 3
    assert c["mlagent_agent_send_failed_items_total{reason=retryable_error,signal=traces}"] == 3


async def backoff_waits(tmp_path, monkeypatch, errors: list[Exception],
                        retry: RetryConfig) -> list[float]:
    """The waits between attempts of one batch whose first sends fail with ``errors``."""
    backend = Backend()
    backend.errors = errors
    sender, _ = make_sender(backend, retry=retry, queue=QueueConfig(consumers=1))
    waits: list[float] = []

    async def record(delay: float) -> None:
        waits.append(delay)

    monkeypatch.setattr(sender, "_backoff", record)
    await sender.start(make_host(tmp_path))
    await sender.put(batch("a"))
    await backend.wait_for(1)
    await sender.shutdown()
    return waits


async def test_a_huge_retry_after_is_capped(tmp_path, monkeypatch):
    """A peer asking for a day's pause does not park the worker for a day."""
    waits = await backoff_waits(tmp_path, monkeypatch,
                                [RetryableError("busy", retry_after=86_400)],
                                RetryConfig(max_interval=1, max_elapsed_time=0))
    assert waits and max(waits) <= 300


@pytest.mark.parametrize("hint", [0.0, -3.0])
async def test_a_retry_after_of_zero_or_less_backs_off_as_configured(tmp_path, monkeypatch, hint):
    """``Retry-After: 0`` or a date in the past is no hint: no tight retry loop."""
    waits = await backoff_waits(
        tmp_path, monkeypatch, [RetryableError("busy", retry_after=hint) for _ in range(3)],
        RetryConfig(initial_interval=2, max_interval=30, multiplier=2,
                    randomization_factor=0, max_elapsed_time=0))
    assert waits == [2, 4, 8]


async def test_intermittent_failures_lose_nothing(tmp_path):
    backend = Backend()
    backend.errors = [RetryableError("flaky"), ConnectionResetError("reset"),
                      TimeoutError(), RetryableError("busy", retry_after=0.002)] * 5
    sender, tel = make_sender(backend)
    await sender.start(make_host(tmp_path))
    for i in range(30):
        await sender.put(batch(f"b{i}"))
    await backend.wait_for(30)
    await sender.shutdown()
    assert sorted(names(backend.received)) == sorted(f"b{i}" for i in range(30))
    assert not any(k.startswith("mlagent_agent_dropped") for k in counters(tel))


async def test_send_that_hangs_is_timed_out_and_retried(tmp_path):
    backend = Backend()
    backend.gate = asyncio.Event()  # the first attempt never answers
    sender, tel = make_sender(backend, queue=QueueConfig(timeout=0.05, consumers=1))
    await sender.start(make_host(tmp_path))
    await sender.put(batch("slow"))
    async with asyncio.timeout(5):
        while backend.calls < 2:
            await asyncio.sleep(0.005)
    backend.gate.set()
    await backend.wait_for(1)
    await sender.shutdown()
    assert counters(tel)["mlagent_agent_send_failed_items_total{reason=timeout,signal=traces}"] >= 1


async def test_permanent_error_drops_and_counts_and_later_batches_flow(tmp_path):
    backend = Backend()
    backend.errors = [PermanentError("bad request")]
    sender, tel = make_sender(backend, queue=QueueConfig(consumers=1))
    await sender.start(make_host(tmp_path))
    await sender.put(batch("poison", spans=4))
    await sender.put(batch("fine"))
    await backend.wait_for(1)
    await sender.shutdown()
    assert names(backend.received) == ["fine"]
    c = counters(tel)
    assert c["mlagent_agent_dropped_items_total{reason=permanent_error,signal=traces}"] == 4
    assert backend.calls == 2  # never retried


async def test_partial_rejection_counts_only_the_rejected_items(tmp_path):
    backend = Backend()
    backend.errors = [PermanentError("2 spans invalid", rejected=2)]
    sender, tel = make_sender(backend)
    await sender.start(make_host(tmp_path))
    await sender.put(batch("partly", spans=5))
    async with asyncio.timeout(5):
        while "mlagent_agent_dropped_items_total{reason=permanent_error,signal=traces}" \
                not in counters(tel):
            await asyncio.sleep(0.005)
    await sender.shutdown()
    c = counters(tel)
    assert c["mlagent_agent_dropped_items_total{reason=permanent_error,signal=traces}"] == 2
    assert c["mlagent_agent_sent_items_total{signal=traces}"] == 3


async def test_retries_exhausted_drops_and_counts(tmp_path):
    backend = Backend()
    backend.down = True
    retry = RetryConfig(initial_interval=0.001, max_interval=0.002, max_elapsed_time=0.05)
    sender, tel = make_sender(backend, retry=retry)
    await sender.start(make_host(tmp_path))
    await sender.put(batch("lost", spans=2))
    key = "mlagent_agent_dropped_items_total{reason=retries_exhausted,signal=traces}"
    async with asyncio.timeout(5):
        while key not in counters(tel):
            await asyncio.sleep(0.005)
    await sender.shutdown()
    assert counters(tel)[key] == 2
    assert backend.calls > 1


async def test_unexpected_exception_in_send_drops_that_batch_only(tmp_path):
    backend = Backend()
    backend.errors = [KeyError("exporter bug")]
    sender, tel = make_sender(backend, queue=QueueConfig(consumers=1))
    await sender.start(make_host(tmp_path))
    await sender.put(batch("trigger"))
    await sender.put(batch("next"))
    await backend.wait_for(1)
    await sender.shutdown()
    assert names(backend.received) == ["next"]
    assert counters(tel)["mlagent_agent_dropped_items_total{reason=send_error,signal=traces}"] == 1


async def test_full_queue_blocks_then_refuses_with_retryable_error(tmp_path):
    backend = Backend()
    backend.gate = asyncio.Event()  # nothing leaves the queue until the gate opens
    queue = QueueConfig(max_items=3, block_timeout=0.05, consumers=1)
    sender, tel = make_sender(backend, queue=queue)
    await sender.start(make_host(tmp_path))
    for i in range(3):
        await sender.put(batch(f"b{i}"))
    with pytest.raises(RetryableError) as exc:
        await sender.put(batch("refused"))
    assert exc.value.retry_after is not None
    assert counters(tel)["mlagent_agent_refused_items_total{reason=queue_full,signal=traces}"] == 1
    # A blocked put goes through as soon as a batch is delivered.
    sender.qc.block_timeout = 5
    waiting = asyncio.create_task(sender.put(batch("waited")))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    backend.gate.set()
    await waiting
    await backend.wait_for(4)
    await sender.shutdown()
    assert "refused" not in names(backend.received)


async def test_byte_bound_applies_as_well_as_item_bound(tmp_path):
    backend = Backend()
    backend.gate = asyncio.Event()
    one = batch("x", spans=10)
    queue = QueueConfig(max_items=1000, max_bytes=one.byte_size * 2, block_timeout=0.01)
    sender, tel = make_sender(backend, queue=queue)
    await sender.start(make_host(tmp_path))
    await sender.put(one)
    await sender.put(batch("y", spans=10))
    with pytest.raises(RetryableError):
        await sender.put(batch("z", spans=10))
    assert counters(tel)["mlagent_agent_refused_items_total{reason=queue_full,signal=traces}"] == 10
    backend.gate.set()
    await backend.wait_for(2)
    await sender.shutdown()


async def test_drop_newest_drops_and_counts_without_blocking(tmp_path):
    backend = Backend()
    backend.gate = asyncio.Event()
    queue = QueueConfig(max_items=2, when_full="drop_newest", consumers=1)
    sender, tel = make_sender(backend, queue=queue)
    await sender.start(make_host(tmp_path))
    for i in range(5):
        await sender.put(batch(f"b{i}", spans=1))
    backend.gate.set()
    await backend.wait_for(2)
    await sender.shutdown()
    assert sorted(names(backend.received)) == ["b0", "b1"]
    assert counters(tel)["mlagent_agent_dropped_items_total{reason=queue_full,signal=traces}"] == 3


async def test_memory_hard_limit_refuses_growth(tmp_path):
    backend = Backend()
    backend.gate = asyncio.Event()
    host = make_host(tmp_path)
    first = batch("a", spans=5)
    MemoryAccountant.of(host).hard_limit = first.byte_size + 10
    sender, tel = make_sender(backend)
    await sender.start(host)
    await sender.put(first)
    with pytest.raises(RetryableError):
        await sender.put(batch("b", spans=5))
    assert counters(tel)["mlagent_agent_refused_items_total{reason=memory_limit,signal=traces}"] == 5
    backend.gate.set()
    await backend.wait_for(1)
    assert MemoryAccountant.of(host).held == 0
    await sender.put(batch("c", spans=5))  # room again once delivered
    await backend.wait_for(2)
    await sender.shutdown()
    assert MemoryAccountant.of(host).bounds == {}


async def test_disabled_queue_raises_the_final_error_to_the_caller(tmp_path):
    backend = Backend()
    backend.errors = [PermanentError("nope")]
    sender, tel = make_sender(backend, queue=QueueConfig(enabled=False))
    await sender.start(make_host(tmp_path))
    with pytest.raises(PermanentError):
        await sender.put(batch("a"))
    await sender.put(batch("b"))
    assert names(backend.received) == ["b"]
    assert counters(tel)["mlagent_agent_refused_items_total{reason=permanent_error,signal=traces}"] == 1
    await sender.shutdown()


async def test_disabled_queue_gives_up_after_block_timeout_even_when_retrying_forever(tmp_path):
    """No queue and a backend down: the receiver's request is answered "retry" in
    bounded time instead of waiting (with ``max_elapsed_time = 0``) for good."""
    backend = Backend()
    backend.down = True
    sender, tel = make_sender(backend, queue=QueueConfig(enabled=False, block_timeout=0.2))
    await sender.start(make_host(tmp_path))
    with pytest.raises(RetryableError, match=r"not delivered within 0\.2s"):
        await asyncio.wait_for(sender.put(batch("a", spans=3)), 5)
    assert backend.calls > 1  # it did retry meanwhile
    c = counters(tel)
    assert c["mlagent_agent_refused_items_total{reason=retries_exhausted,signal=traces}"] == 3
    backend.down = False
    await sender.put(batch("b"))
    assert names(backend.received) == ["b"]
    await sender.shutdown()


async def test_shutdown_of_a_memory_queue_counts_what_it_could_not_deliver(tmp_path):
    backend = Backend()
    backend.down = True
    sender, tel = make_sender(backend)
    await sender.start(make_host(tmp_path))
    for i in range(4):
        await sender.put(batch(f"b{i}", spans=2))
    await sender.shutdown(deadline=0.05)
    await sender.shutdown()  # idempotent
    assert counters(tel)["mlagent_agent_dropped_items_total{reason=shutdown,signal=traces}"] == 8
    with pytest.raises(RetryableError):
        await sender.put(batch("late"))


async def test_a_memory_queue_drains_for_the_services_shutdown_timeout(tmp_path):
    """The drain deadline is ``service.shutdown_timeout`` (from the host), not a fixed 5 s."""
    backend = Backend()
    backend.down = True
    sender, tel = make_sender(backend)
    host = make_host(tmp_path)
    host.shutdown_timeout = 0.2
    await sender.start(host)
    await sender.put(batch("a", spans=2))
    started = asyncio.get_running_loop().time()
    await sender.shutdown()
    assert asyncio.get_running_loop().time() - started < 2
    assert counters(tel)["mlagent_agent_dropped_items_total{reason=shutdown,signal=traces}"] == 2

    backend = Backend()
    backend.down = True
    sender, tel = make_sender(backend)
    host = make_host(tmp_path)
    host.shutdown_timeout = 30
    await sender.start(host)
    await sender.put(batch("b", spans=2))
    shutdown = asyncio.create_task(sender.shutdown())
    await asyncio.sleep(0.2)
    backend.down = False  # back within the deadline: delivered, not dropped
    await asyncio.wait_for(shutdown, 5)
    assert names(backend.received) == ["b"]


async def test_shutdown_without_start_is_safe(tmp_path):
    sender, _ = make_sender(Backend())
    await sender.shutdown()
    await sender.shutdown()
