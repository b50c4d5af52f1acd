"""The memory_limiter processor: refuses above its limits, accepts again below them."""

from __future__ import annotations

import asyncio

import pytest

from agent.component import Kind, RetryableError, Signal, Status
from agent.config import decode_dataclass
from agent.processors.memory_limiter import factory
from agent.processors.memory_limiter.config import MemoryLimiterConfig
from agent.queue import MemoryAccountant, QueueConfig, QueuedSender, RetryConfig
from agent.telemetry import Telemetry
from agent.testing import Sink, make_host, settings_for, span, trace_batch

MiB = 2**20


def make(config: MemoryLimiterConfig, tel: Telemetry | None = None):
    tel = tel or Telemetry()
    sink = Sink()
    limiter = factory.create(settings_for("memory_limiter", Kind.PROCESSOR, tel), config,
                             {Signal.TRACES: sink})
    return limiter, sink, tel


def no_rss_limit(**kw) -> MemoryLimiterConfig:
    return MemoryLimiterConfig(rss_soft_limit=0, rss_hard_limit=0, **kw)


async def test_refuses_above_the_data_soft_limit_and_accepts_again_below(tmp_path):
    host = make_host(tmp_path)
    limiter, sink, tel = make(no_rss_limit(data_soft_limit=10 * MiB, retry_after=7))
    await limiter.start(host)
    memory = MemoryAccountant.of(host)

    await limiter.consume(trace_batch([span("ok")]))
    memory.add(11 * MiB)  # the queues now hold more than the soft limit
    with pytest.raises(RetryableError) as exc:
        await limiter.consume(trace_batch([span("refused"), span("refused")]))
    assert exc.value.retry_after == 7
    memory.remove(11 * MiB)
    await limiter.consume(trace_batch([span("again")]))
    await limiter.shutdown()

    assert [s.name for s in sink.spans()] == ["ok", "again"]
    assert tel.snapshot("memory_limiter")[
        "mlagent_agent_refused_items_total{reason=data_soft_limit,signal=traces}"] == 2


async def test_refuses_above_the_rss_soft_limit_until_rss_is_below_it(tmp_path):
    limiter, sink, tel = make(MemoryLimiterConfig(check_interval=0.01, rss_soft_limit=1,
                                                  rss_hard_limit=0))
    await limiter.start(make_host(tmp_path))
    with pytest.raises(RetryableError):
        await limiter.consume(trace_batch([span("refused")]))
    limiter.config.rss_soft_limit = 2**50  # as if memory had been given back
    async with asyncio.timeout(5):
        while True:
            try:
                await limiter.consume(trace_batch([span("accepted")]))
                break
            except RetryableError:
                await asyncio.sleep(0.01)
    await limiter.shutdown()
    await limiter.shutdown()  # idempotent
    assert [s.name for s in sink.spans()] == ["accepted"]
    snap = tel.snapshot("memory_limiter")
    assert snap["mlagent_agent_refused_items_total{reason=rss_soft_limit,signal=traces}"] >= 1
    assert snap["mlagent_agent_memory_rss_bytes"] > 0


async def test_rss_hard_limit_refuses_with_its_own_reason(tmp_path):
    limiter, _, tel = make(MemoryLimiterConfig(rss_soft_limit=1, rss_hard_limit=2))
    await limiter.start(make_host(tmp_path))
    with pytest.raises(RetryableError):
        await limiter.consume(trace_batch([span("x")]))
    await limiter.shutdown()
    assert tel.snapshot("memory_limiter")[
        "mlagent_agent_refused_items_total{reason=rss_hard_limit,signal=traces}"] == 1


async def test_hard_limit_stops_queues_growing_and_bounds_are_checked(tmp_path):
    host = make_host(tmp_path)
    statuses = []
    host.report_status = lambda cid, status, msg: statuses.append((cid, status, msg))
    gate = asyncio.Event()

    async def send(batch):
        await gate.wait()

    tel = Telemetry()
    sender = QueuedSender(settings_for("otlp/up", Kind.EXPORTER, tel),
                          QueueConfig(max_bytes=64 * MiB), RetryConfig(), send)
    await sender.start(host)  # exporters start before processors
    first = trace_batch([span("a") for _ in range(50)])
    limiter, _, _ = make(no_rss_limit(data_soft_limit=first.byte_size - 1,
                                      data_hard_limit=first.byte_size + 100), tel)
    await limiter.start(host)
    assert statuses and statuses[0][:2] == ("memory_limiter", Status.DEGRADED)
    assert "otlp/up" in statuses[0][2]

    await sender.put(first)
    with pytest.raises(RetryableError):  # the queue itself refuses past the hard limit
        await sender.put(trace_batch([span("b") for _ in range(50)]))
    with pytest.raises(RetryableError):  # and the limiter refuses above the soft limit
        await limiter.consume(trace_batch([span("c")]))
    gate.set()
    await sender.shutdown()
    await limiter.shutdown()
    snap = tel.snapshot()
    assert snap["otlp/up:mlagent_agent_refused_items_total{reason=memory_limit,signal=traces}"] == 50


def test_config_defaults_and_validation():
    errors: list[str] = []
    cfg = decode_dataclass(MemoryLimiterConfig, {"data_soft_limit": "1GiB",
                                                 "data_hard_limit": "512MiB",
                                                 "check_interval": "0s"}, "processors.memory_limiter",
                           errors)
    assert cfg.data_soft_limit == 2**30
    assert sorted(errors) == [
        "processors.memory_limiter.check_interval: must be > 0",
        "processors.memory_limiter.data_soft_limit: must not exceed data_hard_limit",
    ]
    assert MemoryLimiterConfig().validate() == []
    assert factory.signals == frozenset(Signal)
    assert factory.create(settings_for("memory_limiter"), MemoryLimiterConfig(),
                          {Signal.LOGS: Sink()}).capabilities.mutates_data is False
