"""The latency connector: RED metrics, trace assembly, self time, critical path,
stages, service graph, windows and limits — every expected value computed by hand
from the spans each test builds."""

from __future__ import annotations

import asyncio
import os
import random
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hst
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode

from agent.component import Kind, PermanentError, RetryableError, Signal
from agent.config import decode_dataclass
from agent.connectors.latency import LatencyConfig, LatencyConnector, StageConfig, factory
from agent.connectors.latency.analysis import union_lengths
from agent.connectors.latency.config import DEFAULT_BUCKETS
from agent.connectors.latency.normalize import normalize_name
from agent.connectors.latency.series import Histograms
from agent.pdata import MetricBatch, TraceBatch, anyvalue_to_python
from agent.registry import FACTORIES
from agent.telemetry import Telemetry
from agent.testing import (
    Sink,
    log_batch,
    log_record,
    make_host,
    settings_for,
    span,
    trace_batch,
)

INTERNAL, SERVER, CLIENT = Span.SPAN_KIND_INTERNAL, Span.SPAN_KIND_SERVER, Span.SPAN_KIND_CLIENT
PRODUCER, CONSUMER = Span.SPAN_KIND_PRODUCER, Span.SPAN_KIND_CONSUMER
T0 = 1_700_000_000 * 10**9  # span times: T0 + milliseconds
MS = 10**6
WALL = 1_800_000_000 * 10**9  # the connector's wall clock (timestamps of emitted points)
TID = bytes.fromhex("0af7651916cd43dd8448eb211c80319c")


def sid(n: int) -> bytes:
    return n.to_bytes(8, "big")


def sp(name: str, n: int, parent: int | None, start_ms: float, end_ms: float, *,
       kind: int = INTERNAL, status: int = 0, trace_id: bytes = TID,
       attributes: dict[str, Any] | None = None) -> Span:
    """Span ``n`` (id), child of span ``parent``; times in ms after T0."""
    return span(name, trace_id=trace_id, span_id=sid(n),
                parent_span_id=sid(parent) if parent is not None else b"",
                start=T0 + int(start_ms * MS), end=T0 + int(end_ms * MS), kind=kind,
                status=status, attributes=attributes)


class Clock:
    """The connector's monotonic clock, moved by hand."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Harness:
    """A connector wired to a sink, with a hand-driven clock and its own telemetry."""

    def __init__(self, **config: Any) -> None:
        config.setdefault("trace_sample_rate", 1.0)  # exact per-trace expectations
        self.config = LatencyConfig(**config)
        assert self.config.validate() == []
        self.clock = Clock()
        self.telemetry = Telemetry()
        self.sink = Sink()
        self.conn = LatencyConnector(settings_for("latency", Kind.CONNECTOR, self.telemetry),
                                     self.config, self.sink, clock=self.clock,
                                     wall_clock_ns=lambda: WALL)

    async def feed(self, spans: Any) -> None:
        await self.conn.consume(trace_batch(spans))

    async def advance(self, seconds: float) -> None:
        self.clock.t += seconds
        await self.conn.tick()

    async def settle(self) -> None:
        """Let buffered traces become due, then close the window (which emits)."""
        await self.advance(self.config.decision_wait + 0.001)
        await self.advance(self.config.window)

    def points(self, name: str) -> list[tuple[dict[str, Any], Any]]:
        """``(attributes, data point)`` of metric ``name`` in the latest emitted batch."""
        assert self.sink.batches, "nothing emitted"
        batch = self.sink.batches[-1]
        assert isinstance(batch, MetricBatch)
        out = []
        for rm in batch.request.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name == name:
                        data = getattr(m, m.WhichOneof("data"))
                        out.extend(({kv.key: anyvalue_to_python(kv.value)
                                     for kv in dp.attributes}, dp) for dp in data.data_points)
        return out

    def values(self, name: str, *keys: str) -> dict[Any, float]:
        """``{attribute values: value}`` of a sum or gauge (histograms: their sum),
        added up over the attributes not named in ``keys``."""
        out: dict[Any, float] = {}
        for attrs, dp in self.points(name):
            key = tuple(attrs.get(k) for k in keys)
            key = key[0] if len(key) == 1 else key
            out[key] = out.get(key, 0.0) + (dp.sum if hasattr(dp, "bucket_counts")
                                            else dp.as_double)
        return out

    def counters(self) -> dict[str, float]:
        return self.telemetry.snapshot("latency")


def approx(d: dict[Any, float]) -> dict[Any, Any]:
    return {k: pytest.approx(v, abs=1e-9) for k, v in d.items()}


# --------------------------------------------------------------------------- per trace


async def test_nested_chain_self_time_and_critical_path() -> None:
    # a:handle [0,100] -> b:call [10,90] -> c:work [20,60]
    h = Harness()
    await h.feed({"a": [sp("handle", 1, None, 0, 100, kind=SERVER)],
                  "b": [sp("call", 2, 1, 10, 90)],
                  "c": [sp("work", 3, 2, 20, 60)]})
    await h.settle()
    # Self time: a 100-80, b 80-40, c 40. On a chain the critical path is the self time.
    assert h.values("mlagent.latency.self_time", "service.name") == approx(
        {"a": 0.020, "b": 0.040, "c": 0.040})
    assert h.values("mlagent.latency.critical_path.time", "service.name") == approx(
        {"a": 0.020, "b": 0.040, "c": 0.040})
    assert h.values("mlagent.latency.critical_path.share", "service.name") == approx(
        {"a": 0.2, "b": 0.4, "c": 0.4})
    ((attrs, dp),) = h.points("mlagent.latency.trace.duration")
    assert attrs == {"service.name": "a", "span.name": "handle"}
    assert (dp.count, dp.sum) == (1, pytest.approx(0.1))
    assert h.counters()["mlagent_agent_latency_traces_total{outcome=complete}"] == 1


async def test_sequential_stages_and_their_share() -> None:
    # The root SERVER span's name contains "predict" but stages match internal spans only.
    h = Harness()
    await h.feed({"server": [
        sp("POST /predict", 1, None, 0, 100, kind=SERVER),
        sp("batch queue", 2, 1, 5, 20),
        sp("preprocess", 3, 1, 20, 30),
        sp("model.infer", 4, 1, 30, 85),
        sp("postprocess", 5, 1, 85, 95),
    ]})
    await h.settle()
    stages = {"queue": 0.015, "preprocess": 0.010, "inference": 0.055, "postprocess": 0.010}
    assert h.values("mlagent.latency.stage.duration", "stage") == approx(stages)
    assert h.values("mlagent.latency.stage.share", "stage") == approx(
        {k: v / 0.1 for k, v in stages.items()})
    # One trace per stage: every quantile of the window is that trace's stage time.
    q = h.values("mlagent.latency.stage.quantile", "stage", "quantile")
    assert q == approx({(s, label): v for s, v in stages.items()
                        for label in ("0.5", "0.95", "0.99")})
    # Root self time: 100 minus the union [5,95] of its children.
    assert h.values("mlagent.latency.self_time", "span.name")["POST /predict"] == \
        pytest.approx(0.010)


async def test_huge_traces_are_analysed_exactly() -> None:
    # 40k sequential steps under one root, and a chain 20k spans deep. The analysis is
    # O(n log n) (the walk used to be quadratic: ~6 s of event loop for the steps);
    # speed is measured in bench/, this checks the numbers at that size.
    steps, depth = 40_000, 20_000
    flat, nested = b"\x01" * 16, b"\x02" * 16
    h = Harness()
    spans = [sp("generate", 1, None, 0, steps, kind=SERVER, trace_id=flat)]
    spans += [sp("step", i + 2, 1, i, i + 1, trace_id=flat) for i in range(steps)]
    spans += [sp("call", i + 1, i or None, i / 1000, 2 * depth - i / 1000, trace_id=nested)
              for i in range(depth)]
    await h.feed({"llm": spans})
    await h.advance(0)
    await h.advance(h.config.decision_wait + 0.001)
    await h.advance(h.config.window)
    assert h.counters()["mlagent_agent_latency_traces_total{outcome=complete}"] == 2
    # Every step is on the critical path, and every span of the chain.
    assert h.values("mlagent.latency.critical_path.time", "service.name") == approx(
        {"llm": steps / 1000 + 2 * depth / 1000})
    assert h.values("mlagent.latency.self_time", "span.name") == pytest.approx(
        {"generate": 0.0, "step": steps / 1000, "call": 2 * depth / 1000}, abs=1e-6)


async def test_concurrent_children_only_the_last_to_finish_is_critical() -> None:
    # Fan-out: three children start together; the longest one gates the response.
    h = Harness()
    await h.feed({"api": [sp("handle", 1, None, 0, 100, kind=SERVER)],
                  "cache": [sp("lookup", 2, 1, 10, 60)],
                  "model": [sp("score", 3, 1, 10, 90)],
                  "features": [sp("fetch", 4, 1, 10, 40)]})
    await h.settle()
    # Root self: 100 - union[10,90] = 20; path: api 10 + model 80 + api 10.
    assert h.values("mlagent.latency.self_time", "service.name") == approx(
        {"api": 0.020, "cache": 0.050, "model": 0.080, "features": 0.030})
    assert h.values("mlagent.latency.critical_path.share", "service.name") == approx(
        {"api": 0.2, "model": 0.8, "cache": 0.0, "features": 0.0})


async def test_overlapping_children_union_and_backwards_walk() -> None:
    # Children [10,40] and [30,50] overlap, [70,80] is alone.
    h = Harness()
    await h.feed({"api": [sp("handle", 1, None, 0, 100, kind=SERVER)],
                  "x": [sp("x", 2, 1, 10, 40)],
                  "y": [sp("y", 3, 1, 30, 50)],
                  "z": [sp("z", 4, 1, 70, 80)]})
    await h.settle()
    # Union of children = [10,50] + [70,80] = 50 ms -> root self 50 ms.
    assert h.values("mlagent.latency.self_time", "service.name")["api"] == pytest.approx(0.050)
    # Walk back from 100: api 20, z 10, api 20 (50..70), y 20 (30..50), x ends at 40 > 30
    # so it is off the path, api 30 (0..30).
    assert h.values("mlagent.latency.critical_path.time", "service.name") == approx(
        {"api": 0.070, "x": 0.0, "y": 0.020, "z": 0.010})


async def test_child_longer_than_parent_is_clipped_and_counted() -> None:
    h = Harness()
    await h.feed({"api": [sp("handle", 1, None, 0, 100, kind=SERVER)],
                  "model": [sp("score", 2, 1, 90, 150)]})  # ends 50 ms after its parent
    await h.settle()
    assert h.values("mlagent.latency.self_time", "service.name") == approx(
        {"api": 0.090, "model": 0.060})
    # Clipped to [90,100]: the critical path still adds up to the root's 100 ms.
    assert h.values("mlagent.latency.critical_path.time", "service.name") == approx(
        {"api": 0.090, "model": 0.010})
    assert h.counters()["mlagent_agent_latency_span_anomalies_total{anomaly=clock_skew}"] == 1


async def test_missing_parent_is_an_orphan_off_the_critical_path() -> None:
    h = Harness()
    await h.feed({"api": [sp("handle", 1, None, 0, 100, kind=SERVER),
                          sp("call", 2, 1, 20, 50)],
                  "worker": [sp("job", 3, 99, 10, 20)]})  # parent 99 never arrives
    await h.settle()
    assert h.values("mlagent.latency.self_time", "service.name") == approx(
        {"api": 0.070 + 0.030, "worker": 0.010})
    assert h.values("mlagent.latency.critical_path.time", "service.name") == approx(
        {"api": 0.100, "worker": 0.0})
    assert h.counters()["mlagent_agent_latency_span_anomalies_total{anomaly=orphan}"] == 1


async def test_trace_split_across_three_batches_out_of_order() -> None:
    h = Harness(decision_wait=5.0)
    await h.feed({"c": [sp("work", 3, 2, 20, 60)]})  # grandchild first
    await h.advance(1)
    await h.feed({"a": [sp("handle", 1, None, 0, 100, kind=SERVER)]})  # then the root
    await h.advance(4)  # 4 s after the root: still waiting for stragglers
    await h.feed({"b": [sp("call", 2, 1, 10, 90)]})  # the middle span arrives last
    await h.advance(4.9)  # quiet for 4.9 s < decision_wait
    assert "mlagent_agent_latency_traces_total{outcome=complete}" not in h.counters()
    await h.settle()
    assert h.counters()["mlagent_agent_latency_traces_total{outcome=complete}"] == 1
    # Assembled as one trace: same numbers as the nested chain in one batch.
    assert h.values("mlagent.latency.critical_path.share", "service.name") == approx(
        {"a": 0.2, "b": 0.4, "c": 0.4})
    assert "mlagent_agent_latency_span_anomalies_total{anomaly=orphan}" not in h.counters()


async def test_trace_whose_root_never_arrives_is_evicted_at_the_limit() -> None:
    h = Harness(max_traces=2, flush_spans=1)  # each batch processed as it comes
    stuck = bytes.fromhex("11" * 16)
    await h.feed({"api": [sp("call", 2, 1, 10, 90, trace_id=stuck),
                          sp("work", 3, 2, 20, 60, trace_id=stuck)]})
    for t in (b"\x22" * 16, b"\x33" * 16):
        await h.feed({"api": [sp("handle", 1, None, 0, 100, trace_id=t)]})
    # Three traces for two places: the oldest (rootless) one goes, with its 2 spans.
    assert h.counters()["mlagent_agent_dropped_items_total{reason=max_traces,signal=traces}"] == 2
    # Its root turning up later is recognised as late, not as a new trace.
    await h.feed({"api": [sp("handle", 1, None, 0, 100, trace_id=stuck)]})
    assert h.counters()["mlagent_agent_dropped_items_total{reason=late_span,signal=traces}"] == 1
    await h.settle()
    assert h.counters()["mlagent_agent_latency_traces_total{outcome=complete}"] == 2
    # RED metrics still counted every span, evicted or not.
    calls = {}
    for attrs, dp in h.points("mlagent.latency.calls"):
        calls[attrs["span.name"]] = calls.get(attrs["span.name"], 0) + dp.as_double
    assert calls == {"call": 1, "work": 1, "handle": 3}


async def test_span_limit_evicts_oldest_traces() -> None:
    h = Harness(max_spans=3, flush_spans=1)  # each batch processed as it comes
    await h.feed({"api": [sp("a", 1, None, 0, 10, trace_id=b"\x01" * 16),
                          sp("b", 2, 1, 1, 5, trace_id=b"\x01" * 16)]})
    await h.feed({"api": [sp("a", 1, None, 0, 10, trace_id=b"\x02" * 16),
                          sp("b", 2, 1, 1, 5, trace_id=b"\x02" * 16)]})
    assert h.counters()["mlagent_agent_dropped_items_total{reason=max_spans,signal=traces}"] == 2


async def test_rootless_trace_is_analysed_after_root_timeout() -> None:
    h = Harness(decision_wait=1.0, root_timeout=30.0)
    await h.feed({"model": [sp("score", 2, 1, 10, 90, kind=SERVER), sp("infer", 3, 2, 20, 80)]})
    await h.advance(29)
    assert "mlagent_agent_latency_traces_total{outcome=rootless}" not in h.counters()
    await h.advance(1.5)
    assert h.counters()["mlagent_agent_latency_traces_total{outcome=rootless}"] == 1
    await h.advance(h.config.window)
    # The orphan SERVER span stands in for the root.
    ((attrs, dp),) = h.points("mlagent.latency.trace.duration")
    assert attrs["span.name"] == "score" and dp.sum == pytest.approx(0.080)
    assert h.values("mlagent.latency.critical_path.time", "service.name") == approx(
        {"model": 0.080})


async def test_long_request_is_kept_while_its_spans_keep_arriving() -> None:
    # A 90 s generation (defaults: root_timeout 60 s): a child span ends and is
    # exported every 10 s, the root last. The trace is analysed whole, with its root.
    h = Harness()
    await h.feed({"llm": [sp("queue wait", 2, 1, 0, 5000)]})
    for i in range(9):
        await h.advance(10)
        await h.feed({"llm": [sp("generate", 10 + i, 1, 5000 + i * 10_000,
                                 5000 + (i + 1) * 10_000)]})
    await h.advance(1)
    await h.feed({"llm": [sp("POST /generate", 1, None, 0, 96_000, kind=SERVER)]})
    await h.settle()
    c = h.counters()
    assert c["mlagent_agent_latency_traces_total{outcome=complete}"] == 1
    assert not any("rootless" in k or "late_span" in k or "anomalies" in k for k in c)
    ((attrs, dp),) = h.points("mlagent.latency.trace.duration")
    assert attrs["span.name"] == "POST /generate" and dp.sum == pytest.approx(96.0)
    # Without its root, it is analysed root_timeout after its last span, not its first.
    h = Harness(root_timeout=30.0)
    await h.feed({"llm": [sp("queue wait", 2, 1, 0, 5000)]})
    await h.advance(20)
    await h.feed({"llm": [sp("generate", 3, 1, 5000, 25_000)]})
    await h.advance(29)
    assert "mlagent_agent_latency_traces_total{outcome=rootless}" not in h.counters()
    await h.advance(1.5)
    assert h.counters()["mlagent_agent_latency_traces_total{outcome=rootless}"] == 1


# --------------------------------------------------------------------------- SDK flow


async def test_multi_service_flow_from_the_opentelemetry_sdk() -> None:

    exporter = InMemorySpanExporter()
    tracers = {}
    for name in ("gateway", "preprocessor", "model"):
        provider = TracerProvider(resource=Resource.create({"service.name": name}))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        tracers[name] = provider.get_tracer("test")

    def t(ms_: float) -> int:
        return T0 + int(ms_ * MS)

    gw, pre, model = tracers["gateway"], tracers["preprocessor"], tracers["model"]
    root = gw.start_span("POST /v1/score", kind=SpanKind.SERVER, start_time=t(0))
    ctx = trace.set_span_in_context(root)
    c1 = gw.start_span("call preprocessor", context=ctx, kind=SpanKind.CLIENT, start_time=t(5))
    s1 = pre.start_span("POST /preprocess", context=trace.set_span_in_context(c1),
                        kind=SpanKind.SERVER, start_time=t(7))
    tok = pre.start_span("tokenize", context=trace.set_span_in_context(s1), start_time=t(8))
    tok.end(end_time=t(20))
    s1.end(end_time=t(23))
    c1.end(end_time=t(25))
    c2 = gw.start_span("call model", context=ctx, kind=SpanKind.CLIENT, start_time=t(30))
    s2 = model.start_span("POST /predict", context=trace.set_span_in_context(c2),
                          kind=SpanKind.SERVER, start_time=t(32))
    fwd = model.start_span("model.forward", context=trace.set_span_in_context(s2),
                           start_time=t(35))
    fwd.end(end_time=t(80))
    s2.set_status(Status(StatusCode.ERROR))
    s2.end(end_time=t(85))
    c2.end(end_time=t(88))
    root.end(end_time=t(95))

    spans = exporter.get_finished_spans()
    assert len(spans) == 7
    h = Harness()
    await h.conn.consume(TraceBatch(encode_spans(spans)))
    await h.settle()

    # What the test expects, computed from the SDK's own spans: the flow is sequential
    # (no concurrent siblings), so self time = duration - sum of children, and the
    # critical path of each service is its self time.
    by_id = {s.context.span_id: s for s in spans}
    self_time: dict[str, float] = {}
    for s in spans:
        kids = [c for c in spans if c.parent is not None and c.parent.span_id == s.context.span_id]
        own = (s.end_time - s.start_time) - sum(c.end_time - c.start_time for c in kids)
        svc = s.resource.attributes["service.name"]
        self_time[svc] = self_time.get(svc, 0) + own / 1e9
    e2e = (root.end_time - root.start_time) / 1e9
    got_self: dict[str, float] = {}
    for (svc, _), v in h.values("mlagent.latency.self_time", "service.name", "span.name").items():
        got_self[svc] = got_self.get(svc, 0) + v
    assert got_self == approx(self_time)
    assert h.values("mlagent.latency.critical_path.share", "service.name") == approx(
        {svc: v / e2e for svc, v in self_time.items()})

    # Service graph: one edge per CLIENT span with a SERVER child in another service.
    edges = {}
    for s in spans:
        parent = by_id.get(s.parent.span_id) if s.parent else None
        if parent is not None and parent.kind == SpanKind.CLIENT and s.kind == SpanKind.SERVER:
            key = (parent.resource.attributes["service.name"], s.resource.attributes["service.name"])
            edges[key] = ((parent.end_time - parent.start_time) / 1e9,
                          (s.end_time - s.start_time) / 1e9, s.status.status_code == StatusCode.ERROR)
    assert set(edges) == {("gateway", "preprocessor"), ("gateway", "model")}
    requests = h.values("mlagent.service_graph.requests", "client", "server")
    failures = h.values("mlagent.service_graph.failures", "client", "server")
    client = h.values("mlagent.service_graph.client.duration", "client", "server")
    server = h.values("mlagent.service_graph.server.duration", "client", "server")
    for key, (c_dur, s_dur, failed) in edges.items():
        assert requests[key] == 1
        assert failures[key] == (1 if failed else 0)
        assert client[key] == pytest.approx(c_dur)
        assert server[key] == pytest.approx(s_dur)
    # Stages: tokenize (preprocess) and model.forward (inference), internal spans.
    assert h.values("mlagent.latency.stage.duration", "service.name", "stage") == approx(
        {("preprocessor", "preprocess"): 0.012, ("model", "inference"): 0.045})


# --------------------------------------------------------------------------- RED + windows


async def test_red_metrics_with_exemplars_and_cumulative_start_time() -> None:
    h = Harness(buckets=[0.01, 0.1, 1.0])
    fast, slow = b"\xaa" * 16, b"\xbb" * 16
    await h.feed({"api": [sp("GET /x", 1, None, 0, 5, kind=SERVER, trace_id=fast),
                          sp("GET /x", 2, None, 0, 500, kind=SERVER, trace_id=slow)]})
    await h.feed({"api": [sp("GET /x", 3, None, 0, 50, kind=SERVER, status=2,
                             trace_id=fast)]})
    await h.settle()
    first_start = None
    for attrs, dp in h.points("mlagent.latency.duration"):
        if attrs["status.code"] == "STATUS_CODE_UNSET":
            assert list(dp.bucket_counts) == [1, 0, 1, 0]
            assert list(dp.explicit_bounds) == [0.01, 0.1, 1.0]
            assert (dp.min, dp.max) == (pytest.approx(0.005), pytest.approx(0.5))
            # The 0.5 s bucket links to the slow span.
            ex = {e.as_double: (e.trace_id, e.span_id) for e in dp.exemplars}
            assert ex[0.5] == (slow, sid(2))
            first_start = dp.start_time_unix_nano
    assert first_start == WALL
    errors = h.values("mlagent.latency.errors", "span.name", "span.kind")
    assert errors == {("GET /x", "SPAN_KIND_SERVER"): 1}
    calls = h.values("mlagent.latency.calls", "status.code")
    assert calls == {"STATUS_CODE_UNSET": 2, "STATUS_CODE_ERROR": 1}
    # Cumulative: a second window keeps counting from the same start.
    await h.feed({"api": [sp("GET /x", 4, None, 0, 5, kind=SERVER, trace_id=b"\xcc" * 16)]})
    await h.settle()
    calls = h.values("mlagent.latency.calls", "status.code")
    assert calls == {"STATUS_CODE_UNSET": 3, "STATUS_CODE_ERROR": 1}
    assert all(dp.start_time_unix_nano == WALL for _, dp in h.points("mlagent.latency.calls"))


async def test_exemplars_link_the_span_each_histogram_measures() -> None:
    h = Harness(buckets=[0.01, 0.1, 1.0])
    await h.feed({"gw": [sp("handle", 1, None, 0, 100, kind=SERVER),
                         sp("call model", 2, 1, 10, 90, kind=CLIENT)],
                  "model": [sp("POST /predict", 3, 2, 20, 80, kind=SERVER),
                            sp("infer", 4, 3, 25, 35), sp("infer", 5, 3, 40, 75)]})
    await h.settle()

    def exemplars(name: str) -> list[tuple[float, bytes, int]]:
        ((_, dp),) = h.points(name)
        return [(pytest.approx(e.as_double), e.span_id, e.time_unix_nano - T0)
                for e in dp.exemplars]

    assert exemplars("mlagent.service_graph.client.duration") == [(0.080, sid(2), 90 * MS)]
    assert exemplars("mlagent.service_graph.server.duration") == [(0.060, sid(3), 80 * MS)]
    # The stage's time in the trace (10 + 35 ms), linked to its longest span.
    assert exemplars("mlagent.latency.stage.duration") == [(0.045, sid(5), 75 * MS)]


async def test_window_quantiles_reset_each_window() -> None:
    h = Harness()
    await h.feed({"api": [sp("op", i, None, 0, 40) for i in range(1, 11)]})
    await h.settle()
    q = h.values("mlagent.latency.quantile", "span.name", "span.kind", "quantile")
    assert q == approx({("op", "SPAN_KIND_INTERNAL", label): 0.040
                        for label in ("0.5", "0.95", "0.99")})
    await h.feed({"api": [sp("op", i, None, 0, 200) for i in range(11, 21)]})
    await h.settle()
    q = h.values("mlagent.latency.quantile", "span.name", "quantile")
    assert q[("op", "0.5")] == pytest.approx(0.200)  # only this window's spans


def test_histogram_quantiles_within_bucket_resolution() -> None:

    rng = np.random.default_rng(7)
    values = rng.lognormal(mean=np.log(0.08), sigma=1.0, size=100_000)
    hist = Histograms(DEFAULT_BUCKETS, exemplars=False)
    hist.add(np.zeros(len(values), dtype=np.int64), values, 1)
    qs = [0.5, 0.95, 0.99]
    est = hist.quantiles(qs)[0]
    edges = np.concatenate(([values.min()], DEFAULT_BUCKETS, [values.max()]))
    for q, e in zip(qs, est, strict=True):
        exact = np.percentile(values, q * 100)
        b = np.searchsorted(DEFAULT_BUCKETS, exact, side="left")
        width = edges[b + 1] - edges[b]
        assert abs(e - exact) <= width, (q, e, exact, width)


async def test_window_p99_matches_numpy_within_bucket_resolution() -> None:

    rng = np.random.default_rng(11)
    durations_ms = rng.gamma(shape=2.0, scale=30.0, size=100_000)
    h = Harness()
    for chunk in np.array_split(durations_ms, 200):
        await h.feed({"model": [span("predict", trace_id=os.urandom(16), span_id=sid(1),
                                     start=T0, end=T0 + int(d * MS)) for d in chunk]})
    await h.settle()
    p99 = h.values("mlagent.latency.quantile", "quantile")["0.99"]
    exact = np.percentile(np.floor(durations_ms * MS) / 1e9, 99)
    b = np.searchsorted(DEFAULT_BUCKETS, exact, side="left")
    width = DEFAULT_BUCKETS[b] - DEFAULT_BUCKETS[b - 1]
    assert abs(p99 - exact) <= width


# --------------------------------------------------------------------------- limits


async def test_cardinality_overflow_goes_to_one_series_and_is_counted() -> None:
    h = Harness(max_series=3)
    await h.feed({"api": [sp(f"op{c}", i, None, 0, 10) for i, c in enumerate("abcde", 1)]})
    await h.feed({"api": [sp("opa", 9, None, 0, 10)]})  # a known series still has a row
    await h.settle()
    calls = [(attrs, dp.as_double) for attrs, dp in h.points("mlagent.latency.calls")]
    assert len(calls) == 4
    overflow = [v for attrs, v in calls if attrs == {"otel.metric.overflow": "true"}]
    assert overflow == [2]
    assert {a["span.name"]: v for a, v in calls if "span.name" in a} == \
        {"opa": 2, "opb": 1, "opc": 1}
    snap = h.counters()
    assert snap["mlagent_agent_latency_series_overflow_total{metric=mlagent.latency.calls}"] == 2


async def test_overflow_of_trace_metrics_counts_analysed_measurements() -> None:
    # One series per metric: service b's measurements overflow. Per analysed trace,
    # b has 3 spans (self time), 2 of them on the critical path (y2 runs alongside
    # y1), and one stage time (y1 and y2 together); its spans of skipped traces are
    # measured by none of these metrics.
    h = Harness(max_series=1, trace_sample_rate=0.5)
    rnd = random.Random(2)
    for _ in range(40):
        tid = rnd.randbytes(16)
        await h.feed({"a": [sp("root", 1, None, 0, 100, kind=SERVER, trace_id=tid),
                            sp("queue", 2, 1, 0, 10, trace_id=tid)],
                      "b": [sp("x", 3, 1, 10, 90, trace_id=tid),
                            sp("infer y1", 4, 3, 20, 50, trace_id=tid),
                            sp("infer y2", 5, 3, 20, 40, trace_id=tid)]})
    await h.settle()
    c = h.counters()
    n = c["mlagent_agent_latency_traces_total{outcome=complete}"]
    assert 0 < n < 40

    def overflow(metric: str) -> float:
        return c[f"mlagent_agent_latency_series_overflow_total{{metric={metric}}}"]

    assert overflow("mlagent.latency.self_time") == 4 * n  # a's queue and b's 3 spans
    assert overflow("mlagent.latency.critical_path.time") == 2 * n
    assert overflow("mlagent.latency.stage.duration") == n
    assert overflow("mlagent.latency.calls") == 4 * 40  # RED: every span
    assert h.values("mlagent.latency.critical_path.time", "service.name") == approx(
        {"a": 0.020 / 0.5 * n, None: 0.080 / 0.5 * n})


def test_name_normaliser() -> None:
    assert normalize_name("GET /users/12345/orders/9") == "GET /users/{id}/orders/{id}"
    assert normalize_name("GET /items/550e8400-e29b-41d4-a716-446655440000") == \
        "GET /items/{id}"
    assert normalize_name("fetch blob 9f86d081884c7d65") == "fetch blob {id}"
    # Tokens that only contain digits, and words made of hex letters, are kept.
    assert normalize_name("POST /v1/models/resnet50:predict") == "POST /v1/models/resnet50:predict"
    assert normalize_name("decode facade") == "decode facade"


async def test_normalised_names_share_one_series() -> None:
    h = Harness()
    await h.feed({"api": [sp("GET /users/123", 1, None, 0, 10),
                          sp("GET /users/456", 2, None, 0, 10)]})
    await h.settle()
    assert h.values("mlagent.latency.calls", "span.name") == {"GET /users/{id}": 2}
    h2 = Harness(normalize_names=False)
    await h2.feed({"api": [sp("GET /users/123", 1, None, 0, 10)]})
    await h2.settle()
    assert h2.values("mlagent.latency.calls", "span.name") == {"GET /users/123": 1}


async def test_stage_by_attribute() -> None:
    stages = [StageConfig("inference", attributes={"ml.stage": "^infer"}),
              StageConfig("queue", span_names=["queue"])]
    h = Harness(stages=stages)
    await h.feed({"srv": [sp("handle", 1, None, 0, 100, kind=SERVER),
                          sp("step", 2, 1, 10, 70, attributes={"ml.stage": "inference"}),
                          sp("queue", 3, 1, 0, 10)]})
    await h.settle()
    assert h.values("mlagent.latency.stage.duration", "stage") == approx(
        {"inference": 0.060, "queue": 0.010})


async def test_stage_by_attribute_past_the_series_limit() -> None:
    # Once the stage table is full, name-matched stage spans share the overflow row;
    # attribute rules still run on every later batch, and the traces are analysed.
    stages = [StageConfig("inference", attributes={"ml.stage": "^infer"}),
              StageConfig("queue", span_names=["queue"])]
    h = Harness(stages=stages, max_series=2)
    for i in range(4):
        tid = bytes([i + 1]) * 16
        await h.feed({f"svc{i}": [sp("handle", 1, None, 0, 100, kind=SERVER, trace_id=tid),
                                  sp("queue", 2, 1, 0, 10, trace_id=tid),
                                  sp("step", 3, 1, 10, 40, trace_id=tid,
                                     attributes={"ml.stage": "inference"})]})
    await h.settle()
    c = h.counters()
    assert c["mlagent_agent_latency_traces_total{outcome=complete}"] == 4
    assert not any("internal_error" in k for k in c)
    assert h.values("mlagent.latency.stage.duration", "service.name", "stage") == approx(
        {("svc0", "queue"): 0.010, ("svc0", "inference"): 0.030,
         (None, None): 3 * 0.010 + 3 * 0.030})


async def test_messaging_edges() -> None:
    h = Harness()
    await h.feed({"api": [sp("handle", 1, None, 0, 100, kind=SERVER),
                          sp("publish", 2, 1, 10, 12, kind=PRODUCER)],
                  "worker": [sp("consume", 3, 2, 20, 60, kind=CONSUMER)]})
    await h.settle()
    assert h.values("mlagent.service_graph.requests", "client", "server", "connection_type") == \
        {("api", "worker", "messaging_system"): 1}


# --------------------------------------------------------------------------- robustness


async def test_bad_spans_do_not_crash_and_are_counted() -> None:
    h = Harness()
    await h.feed({"api": [
        sp("backwards", 1, None, 100, 50),  # ends before it starts
        span("no trace id", trace_id=b"", span_id=sid(2)),
        span("weird kind", trace_id=TID, span_id=sid(3), parent_span_id=sid(1), kind=42,
             status=9),
        sp("dup", 1, None, 0, 10),  # same span id as the first
        sp("self parent", 5, 5, 0, 10),
    ]})
    await h.settle()
    snap = h.counters()
    assert snap["mlagent_agent_dropped_items_total{reason=invalid_trace_id,signal=traces}"] == 1
    assert snap["mlagent_agent_latency_span_anomalies_total{anomaly=duplicate}"] == 1
    calls = h.values("mlagent.latency.calls", "span.name", "span.kind", "status.code")
    assert calls[("weird kind", "SPAN_KIND_UNSPECIFIED", "STATUS_CODE_UNSET")] == 1
    durations = h.values("mlagent.latency.duration", "span.name")
    assert durations["backwards"] == 0.0


async def test_downstream_failure_is_counted_not_raised() -> None:
    h = Harness()
    await h.feed({"api": [sp("op", 1, None, 0, 10)]})
    h.sink.fail_with = RetryableError("busy")
    await h.settle()
    assert h.counters()[
        "mlagent_agent_dropped_items_total{reason=downstream_refused,signal=metrics}"] > 0
    h.sink.fail_with = ValueError("bug")
    await h.advance(h.config.window)
    assert h.counters()[
        "mlagent_agent_dropped_items_total{reason=downstream_error,signal=metrics}"] > 0
    h.sink.fail_with = None
    await h.advance(h.config.window)  # cumulative state survives the failed sends
    assert h.values("mlagent.latency.calls", "span.name") == {"op": 1}


async def test_shutdown_flushes_pending_traces_and_final_window() -> None:
    h = Harness()
    await h.feed({"a": [sp("handle", 1, None, 0, 100, kind=SERVER)], "b": [sp("call", 2, 1, 10, 90)]})
    await h.conn.shutdown()  # no tick ever ran: the trace is still buffered
    assert h.values("mlagent.latency.critical_path.share", "service.name") == approx(
        {"a": 0.2, "b": 0.8})
    emitted = len(h.sink.batches)
    await h.conn.shutdown()  # idempotent
    assert len(h.sink.batches) == emitted
    with pytest.raises(PermanentError):
        await h.feed({"a": [sp("late", 3, None, 0, 1)]})


async def test_shutdown_without_start_or_data_emits_nothing() -> None:
    h = Harness()
    await h.conn.shutdown()
    assert h.sink.batches == []


async def test_rejects_other_signals() -> None:
    h = Harness()
    with pytest.raises(PermanentError):
        await h.conn.consume(log_batch([log_record()]))


async def test_timer_task_emits_windows(tmp_path: Any) -> None:

    sink = Sink()
    conn = factory.create(settings_for("latency", Kind.CONNECTOR),
                          LatencyConfig(window=0.05, decision_wait=0.01, root_timeout=0.01,
                                        trace_sample_rate=1.0),
                          {Signal.METRICS: sink})
    await conn.start(make_host(tmp_path))
    try:
        await conn.consume(trace_batch({"a": [sp("handle", 1, None, 0, 100)]}))
        await sink.wait_for(lambda s: any(m.name == "mlagent.latency.critical_path.share"
                                          for m in s.metrics()))
    finally:
        await conn.shutdown()
    await asyncio.sleep(0)


# --------------------------------------------------------------------------- config


def test_default_config_is_valid_and_factory_registered() -> None:

    assert LatencyConfig().validate() == []
    assert "agent.connectors.latency:factory" in FACTORIES
    assert factory.kind is Kind.CONNECTOR
    assert factory.signals == {Signal.TRACES} and factory.output_signals == {Signal.METRICS}


def test_config_errors_have_paths() -> None:
    errors: list[str] = []
    cfg = decode_dataclass(LatencyConfig, {"window": "30s", "buckets": [1.0, 0.5]},
                           "connectors.latency", errors)
    assert cfg.window == 30.0
    assert errors == ["connectors.latency.buckets: bounds must be strictly increasing"]
    errors = []
    decode_dataclass(LatencyConfig, {"stages": [{"name": "x", "span_names": ["("],
                                                 "span_kinds": ["sever"]}],
                                     "max_sereis": 5}, "connectors.latency", errors)
    assert any(e.startswith("connectors.latency.max_sereis: unknown key") for e in errors)
    assert any(e.startswith("connectors.latency.stages[0].span_kinds[0]:") for e in errors)
    errors = []
    decode_dataclass(LatencyConfig, {"stages": [{"name": "x", "span_names": ["("]}]},
                     "connectors.latency", errors)
    assert len(errors) == 1 and errors[0].startswith("connectors.latency.stages[0].span_names[0]:")


# --------------------------------------------------------------------------- cross-check


def _union(intervals: list[tuple[int, int]]) -> int:
    total, cur_s, cur_e = 0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return total + (cur_e - cur_s if cur_e is not None else 0)


def _reference(tr: list[dict[str, Any]], out: dict[str, dict[Any, float]]) -> None:
    """Self time, critical path, stages and duration of one trace, the slow, obvious way."""
    spans: dict[int, dict[str, Any]] = {}
    for s in tr:
        spans.setdefault(s["id"], s)  # first copy of a duplicate wins
    kids: dict[int, list[dict[str, Any]]] = {}
    roots, orphans = [], []
    for s in spans.values():
        if s["parent"] is None:
            roots.append(s)
        elif s["parent"] in spans and s["parent"] != s["id"]:
            kids.setdefault(s["parent"], []).append(s)
        else:
            orphans.append(s)

    def interval(s: dict[str, Any]) -> tuple[int, int]:
        return s["start"], max(s["start"], s["end"])

    for s in spans.values():
        lo, hi = interval(s)
        clipped = [(max(c["start"], lo), min(c["end"], hi)) for c in kids.get(s["id"], [])]
        own = (hi - lo) - _union([(a, b) for a, b in clipped if b > a])
        key = (s["svc"], s["name"])
        out["self"][key] = out["self"].get(key, 0.0) + own / 1e9
    candidates = roots or orphans
    root = max(candidates, key=lambda s: interval(s)[1] - interval(s)[0])
    r_lo, r_hi = interval(root)
    out["duration"][root["name"]] = out["duration"].get(root["name"], 0.0) + (r_hi - r_lo) / 1e9

    def walk(s: dict[str, Any], lo: int, hi: int) -> None:
        cur = hi
        children = [(min(c["end"], hi), max(c["start"], lo), c) for c in kids.get(s["id"], [])]
        # Latest end first, then latest start, then the lowest span id.
        for e, st, c in sorted(children, key=lambda x: (x[0], x[1], -x[2]["id"]), reverse=True):
            if e > cur or e <= st:
                continue
            out["path"][s["svc"]] = out["path"].get(s["svc"], 0.0) + (cur - e) / 1e9
            walk(c, st, e)
            cur = st
        out["path"][s["svc"]] = out["path"].get(s["svc"], 0.0) + (cur - lo) / 1e9

    walk(root, r_lo, r_hi)
    stages: dict[Any, list[tuple[int, int]]] = {}
    for s in spans.values():
        if s["stage"]:
            a, b = max(s["start"], r_lo), min(s["end"], r_hi)
            if b > a:
                stages.setdefault((s["svc"], s["stage"]), []).append((a, b))
    for key, ivs in stages.items():
        out["stages"][key] = out["stages"].get(key, 0.0) + _union(ivs) / 1e9


async def test_many_random_traces_match_a_reference_implementation() -> None:
    """Hundreds of random traces analysed together (as one tick does) give, trace for
    trace, what a plain recursive implementation computes: nothing leaks between
    traces, skew, orphans, duplicates and concurrency included."""

    rnd = random.Random(5)
    names = {"preprocess": "preprocess", "model.infer": "inference", "lookup": None,
             "call": None}
    traces = []
    for _ in range(300):
        tid = rnd.randbytes(16)
        root_end = rnd.randint(10**6, 10**9)
        tr = [{"trace": tid, "id": 1, "parent": None, "svc": "gw", "name": "root",
               "kind": SERVER, "start": 0, "end": root_end, "stage": None}]
        for i in range(2, rnd.randint(2, 25)):
            parent = rnd.choice(tr)
            p_lo, p_hi = parent["start"], parent["end"]
            s = rnd.randint(p_lo - 10**6, max(p_lo, p_hi))  # sometimes starts early: skew
            e = s + rnd.randint(0, max(1, (p_hi - p_lo) // 2) + 10**6)
            name = rnd.choice(list(names))
            kind = rnd.choice([INTERNAL, INTERNAL, SERVER, CLIENT])
            pid = parent["id"] if rnd.random() > 0.05 else 10**6 + i  # 5% orphans
            tr.append({"trace": tid, "id": i, "parent": pid, "svc": rnd.choice("abcd"),
                       "name": name, "kind": kind, "start": s, "end": e,
                       "stage": names[name] if kind == INTERNAL else None})
        if rnd.random() < 0.1:
            tr.append(dict(tr[-1], end=tr[-1]["end"] + 5))  # duplicate id
        traces.append(tr)

    expected: dict[str, dict[Any, float]] = {"self": {}, "path": {}, "stages": {},
                                              "duration": {}}
    for tr in traces:
        _reference(tr, expected)

    h = Harness()
    flat = [s for tr in traces for s in tr]
    rnd.shuffle(flat)  # spans of all traces, interleaved, over many batches
    for i in range(0, len(flat), 512):
        group: dict[str, list[Span]] = {}
        for s in flat[i:i + 512]:
            group.setdefault(s["svc"], []).append(span(
                s["name"], trace_id=s["trace"], span_id=sid(s["id"]),
                parent_span_id=sid(s["parent"]) if s["parent"] is not None else b"",
                start=T0 + s["start"], end=T0 + s["end"], kind=s["kind"]))
        await h.feed(group)
    await h.settle()
    assert h.counters()["mlagent_agent_latency_traces_total{outcome=complete}"] == 300
    assert h.values("mlagent.latency.self_time", "service.name", "span.name") == \
        pytest.approx(expected["self"], abs=1e-6)
    assert h.values("mlagent.latency.critical_path.time", "service.name") == \
        pytest.approx(expected["path"], abs=1e-6)
    assert h.values("mlagent.latency.stage.duration", "service.name", "stage") == \
        pytest.approx(expected["stages"], abs=1e-6)
    assert h.values("mlagent.latency.trace.duration", "span.name") == \
        pytest.approx(expected["duration"], abs=1e-6)


async def test_times_beyond_int64_are_clamped_not_fatal() -> None:
    # The batch columns clamp fixed64 times to int64: such a span counts, lasting 0.
    h = Harness()
    await h.feed({"api": [span("huge", start=2**64 - 1, end=2**64 - 1)]})
    await h.feed({"api": [sp("ok", 1, None, 0, 10)]})
    await h.settle()
    assert h.values("mlagent.latency.calls", "span.name") == {"huge": 1, "ok": 1}
    assert h.values("mlagent.latency.duration", "span.name") == approx({"huge": 0.0, "ok": 0.01})


_TIME = hst.one_of(hst.integers(0, 1000), hst.integers(0, 2**62))


@settings(max_examples=300, deadline=None)
@given(hst.lists(hst.tuples(hst.integers(0, 5), _TIME, _TIME), max_size=40))
def test_union_lengths_matches_brute_force(rows: list[tuple[int, int, int]]) -> None:

    rows = [(g, min(a, b), max(a, b)) for g, a, b in rows if a != b]
    expected = [0] * 6
    for g in range(6):
        expected[g] = _union([(s, e) for gg, s, e in rows if gg == g])
    group = np.array([r[0] for r in rows], dtype=np.int64)
    start = np.array([r[1] for r in rows], dtype=np.int64)
    end = np.array([r[2] for r in rows], dtype=np.int64)
    base = np.zeros(len(rows), dtype=np.int64)
    assert union_lengths(group, start, end, base, 6).tolist() == expected


def test_stage_patterns_that_cannot_combine_are_a_config_error() -> None:
    """Validation compiles what the connector compiles: `mlagent validate` and start agree."""
    from agent.connectors.latency.config import StageConfig

    errs = StageConfig("infer", span_names=["(?i)predict"]).validate()
    assert any(e.startswith("span_names: the patterns do not combine") for e in errs)
    assert StageConfig("infer", span_names=["predict", "forward"]).validate() == []
