"""Consumed spans are processed in bulk (``flush_spans``, timer ticks, windows,
shutdown): the metrics are those of processing every batch as it comes."""

from __future__ import annotations

import pytest

from tests.connectors.test_latency import Harness, sp
from tests.connectors.test_latency_sampling import feed_split, workload

METRICS = [("mlagent.latency.calls", ("service.name", "span.name", "status.code")),
           ("mlagent.latency.duration", ("service.name", "span.name")),
           ("mlagent.latency.self_time", ("service.name", "span.name")),
           ("mlagent.latency.critical_path.time", ("service.name",)),
           ("mlagent.latency.stage.duration", ("service.name", "stage")),
           ("mlagent.latency.stage.share", ("service.name", "stage")),
           ("mlagent.latency.quantile", ("service.name", "span.name", "quantile")),
           ("mlagent.service_graph.requests", ("client", "server"))]


async def test_bulk_processing_gives_the_metrics_of_batch_by_batch() -> None:
    traces = workload(n=600)
    bulk, each = Harness(), Harness(flush_spans=1)
    for h in (bulk, each):
        await feed_split(h, traces)
        await h.settle()
    assert bulk.counters()["mlagent_agent_latency_traces_total{outcome=complete}"] == 600
    for name, keys in METRICS:
        assert bulk.values(name, *keys) == pytest.approx(each.values(name, *keys)), name
    # The exemplars link the same (latest) spans.
    ex = [{tuple(dp.bucket_counts): [(e.trace_id, e.span_id) for e in dp.exemplars]
           for _, dp in h.points("mlagent.latency.duration")} for h in (bulk, each)]
    assert ex[0] == ex[1]


async def test_pending_spans_are_processed_at_the_limit() -> None:
    h = Harness(flush_spans=100, trace_sample_rate=0.5)
    traces = workload(n=25)  # 4 spans each
    for _, by_svc in traces[:24]:
        await h.feed(by_svc)
    assert not any("sampled_spans" in k for k in h.counters())  # 96 spans pending
    await h.feed(traces[24][1])
    c = h.counters()
    assert c["mlagent_agent_latency_sampled_spans_total{decision=analysed}"] + \
        c["mlagent_agent_latency_sampled_spans_total{decision=skipped}"] == 100


async def test_spans_pending_at_a_window_end_count_in_that_window() -> None:
    h = Harness(window=10.0)
    await h.feed({"api": [sp("handle", 1, None, 0, 100)]})
    h.clock.t += 10.0  # no tick in between: the window closes with the span pending
    await h.conn.tick()
    assert h.values("mlagent.latency.calls", "span.name") == {"handle": 1}
    assert {a["quantile"]: dp.as_double for a, dp in h.points("mlagent.latency.quantile")} == \
        {"0.5": 0.1, "0.95": 0.1, "0.99": 0.1}


async def test_shutdown_processes_pending_spans() -> None:
    h = Harness()
    await h.feed({"api": [sp("handle", 1, None, 0, 100)]})
    await h.conn.shutdown()
    assert h.values("mlagent.latency.calls", "span.name") == {"handle": 1}
    assert h.values("mlagent.latency.self_time", "span.name") == {"handle": 0.1}
