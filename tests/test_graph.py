"""The pipeline graph: wiring, fan-out copies, start/stop order, the error boundary."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest

from agent.component import (
    Capabilities,
    Host,
    Kind,
    PermanentError,
    RetryableError,
    Signal,
    Status,
)
from agent.config import load_config
from agent.connectors.count import factory as count_factory
from agent.graph import Fanout, Graph
from agent.pdata import get_attribute, set_attribute
from agent.telemetry import Telemetry
from agent.testing import Sink, span, trace_batch

EVENTS: list[str] = []
SINKS: dict[str, Sink] = {}
RECEIVERS: dict[str, Any] = {}


@dataclass
class Empty:
    hang_on_shutdown: bool = False
    explode: bool = False


class Part:
    """A component that records start/shutdown order."""

    def __init__(self, cid: str, cfg: Empty) -> None:
        self.cid, self.cfg = cid, cfg

    async def start(self, host: Host) -> None:
        EVENTS.append(f"start {self.cid}")

    async def shutdown(self) -> None:
        EVENTS.append(f"stop {self.cid}")
        if self.cfg.hang_on_shutdown:
            await asyncio.sleep(3600)


class FakeReceiver(Part):
    def __init__(self, cid: str, cfg: Empty, next: Mapping[Signal, Any]) -> None:
        super().__init__(cid, cfg)
        self.next = next
        RECEIVERS[cid] = self


class Tagger(Part):
    """Mutating processor: sets resource attribute tagged=<id>."""

    capabilities = Capabilities(mutates_data=True)

    def __init__(self, cid: str, cfg: Empty, next: Any) -> None:
        super().__init__(cid, cfg)
        self.next = next

    async def consume(self, batch: Any) -> None:
        if self.cfg.explode:
            raise ZeroDivisionError("boom")
        for rs in batch.resources():
            set_attribute(rs.resource.attributes, "tagged", self.cid)
        batch.invalidate()
        await self.next.consume(batch)


class SinkExporter(Part, Sink):
    def __init__(self, cid: str, cfg: Empty) -> None:
        Part.__init__(self, cid, cfg)
        Sink.__init__(self)
        SINKS[cid] = self


def _factory(type_: str, kind: Kind, make: Any, signals=frozenset(Signal)) -> Any:
    class F:
        config_class = Empty

        def create(self, settings, config, next):
            return make(settings.id, config, next)

    F.type, F.kind, F.signals, F.output_signals = type_, kind, signals, frozenset(Signal)
    return F()


REGISTRY = {
    Kind.RECEIVER: {"fake": _factory("fake", Kind.RECEIVER, FakeReceiver)},
    Kind.PROCESSOR: {"tag": _factory("tag", Kind.PROCESSOR,
                                     lambda i, c, n: Tagger(i, c, next(iter(n.values()))))},
    Kind.EXPORTER: {"sink": _factory("sink", Kind.EXPORTER, lambda i, c, n: SinkExporter(i, c))},
    Kind.CONNECTOR: {"count": count_factory},
}


@pytest.fixture(autouse=True)
def _reset():
    EVENTS.clear()
    SINKS.clear()
    RECEIVERS.clear()


def build(text: str, tmp_path) -> Graph:
    cfg = load_config(text, REGISTRY, env={})
    return Graph(cfg, Telemetry(), Host(state_dir=tmp_path))


FANOUT = """
[receivers.fake]
[processors.tag]
[exporters.sink]
[exporters."sink/b"]
[service.pipelines."traces/a"]
receivers = ["fake"]
processors = ["tag"]
exporters = ["sink"]
[service.pipelines."traces/b"]
receivers = ["fake"]
exporters = ["sink/b"]
"""


async def test_one_receiver_feeds_two_pipelines_and_mutation_stays_private(tmp_path) -> None:
    g = build(FANOUT, tmp_path)
    await g.start()
    await RECEIVERS["fake"].next[Signal.TRACES].consume(trace_batch([span()]))
    tagged = SINKS["sink"].batches[0].request.resource_spans[0].resource.attributes
    untouched = SINKS["sink/b"].batches[0].request.resource_spans[0].resource.attributes
    assert get_attribute(tagged, "tagged") == "tag"
    assert get_attribute(untouched, "tagged") is None
    await g.shutdown(5)


async def test_start_downstream_first_and_stop_upstream_first(tmp_path) -> None:
    g = build(FANOUT, tmp_path)
    await g.start()
    starts = [e.split()[1] for e in EVENTS if e.startswith("start")]
    assert starts.index("fake") == len(starts) - 1  # receiver last
    assert starts.index("sink") < starts.index("tag")
    EVENTS.clear()
    assert await g.shutdown(5) == []
    stops = [e.split()[1] for e in EVENTS]
    assert stops[0] == "fake" and stops.index("tag") < stops.index("sink")
    assert all(n.status is Status.STOPPED for n in g.nodes.values())


async def test_connector_feeds_metrics_pipeline(tmp_path) -> None:
    g = build("""
[receivers.fake]
[connectors.count]
[exporters.sink]
[service.pipelines.traces]
receivers = ["fake"]
exporters = ["count"]
[service.pipelines.metrics]
receivers = ["count"]
exporters = ["sink"]
""", tmp_path)
    await g.start()
    batch = trace_batch({"checkout": [span(), span(span_id=b"\x03" * 8)], "cart": [span()]})
    await RECEIVERS["fake"].next[Signal.TRACES].consume(batch)
    await g.shutdown(5)  # the connector flushes its counts into the metrics pipeline
    (metric,) = SINKS["sink"].metrics()
    counts = {get_attribute(dp.attributes, "service.name"): dp.as_int
              for dp in metric.sum.data_points}
    assert metric.name == "mlagent.count.spans" and counts == {"cart": 1, "checkout": 2}


async def test_unexpected_error_is_contained_and_reported(tmp_path) -> None:
    g = build(FANOUT.replace("[processors.tag]", "[processors.tag]\nexplode = true"), tmp_path)
    await g.start()
    intake = RECEIVERS["fake"].next[Signal.TRACES]
    with pytest.raises(PermanentError, match="tag: internal error: ZeroDivisionError"):
        await intake.consume(trace_batch([span()]))
    node = g.nodes["processor:tag@traces/a"]
    assert node.status is Status.DEGRADED and "boom" in (node.last_error or "")
    assert g.status()["components"]["processors.tag"]["status"] == "degraded"
    # The other pipeline still got its data, and the graph keeps serving.
    assert SINKS["sink/b"].item_count == 1
    await g.shutdown(5)


async def test_drain_deadline_cancels_and_names_stuck_component(tmp_path) -> None:
    g = build(FANOUT.replace("[exporters.sink]", "[exporters.sink]\nhang_on_shutdown = true"),
              tmp_path)
    await g.start()
    cancelled = await g.shutdown(0.2)
    assert cancelled == ["exporter:sink"]


async def test_fanout_retryable_wins_and_keeps_largest_hint() -> None:
    a, b, c = Sink(), Sink(), Sink()
    a.fail_with = RetryableError("full", retry_after=2)
    b.fail_with = PermanentError("bad")
    with pytest.raises(RetryableError) as ei:
        await Fanout([a, b, c]).consume(trace_batch([span()]))
    assert ei.value.retry_after == 2
    assert c.item_count == 1


async def test_fanout_passes_a_partial_rejection_on_only_when_no_consumer_took_it_all() -> None:
    ten = trace_batch([span(f"s{i}") for i in range(10)])
    took_all, part = Sink(), Sink()
    part.fail_with = PermanentError("peer rejected 1 item", rejected=1)
    await Fanout([took_all, part]).consume(ten.copy())  # the data is in the agent: success
    assert took_all.item_count == 10

    less, more = Sink(), Sink()
    less.fail_with = PermanentError("rejected 1", rejected=1)
    more.fail_with = PermanentError("rejected 3", rejected=3)
    with pytest.raises(PermanentError) as ei:
        await Fanout([less, more]).consume(ten.copy())
    assert ei.value.rejected == 3  # the largest, not "the whole batch"

    whole = Sink()
    whole.fail_with = PermanentError("all bad")
    with pytest.raises(PermanentError) as ei:
        await Fanout([less, whole]).consume(ten.copy())
    assert ei.value.rejected is None


async def test_fanout_copies_only_for_mutators() -> None:
    ro1, ro2, mut = Sink(), Sink(), Sink(mutates=True)
    batch = trace_batch([span()])
    await Fanout([ro1, mut, ro2]).consume(batch)
    assert ro1.batches[0] is batch and ro2.batches[0] is batch
    assert mut.batches[0] is not batch
    only_mut = Sink(mutates=True), Sink(mutates=True)
    await Fanout(only_mut).consume(batch)
    assert only_mut[1].batches[0] is batch and only_mut[0].batches[0] is not batch
