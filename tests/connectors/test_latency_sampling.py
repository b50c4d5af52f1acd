"""Trace sampling in the latency connector: which traces are analysed whole, and how
the metrics derived from them stay unbiased (RED metrics always count every span)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from agent.connectors.latency import LatencyConfig, StageConfig
from agent.connectors.latency.spans import sample_mask, trace_keys
from tests.connectors.test_latency import CLIENT, SERVER, Harness, sp

N_TRACES = 2000


def workload(seed: int = 7, n: int = N_TRACES) -> list[tuple[bytes, dict[str, list[Span]]]]:
    """``n`` traces of the same shape and varying inference time, per trace its id and
    spans by service: gw ``POST /predict`` [0,100] -> gw ``call model`` (CLIENT)
    [10,90] -> model ``serve`` (SERVER) [20,80] -> model ``inference`` [25, 25+d]."""
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        tid = rnd.randbytes(16)
        d = rnd.choice([5, 10, 50])  # a skewed mix: shares differ trace by trace
        out.append((tid, {
            "gw": [sp("POST /predict", 1, None, 0, 100, kind=SERVER, trace_id=tid),
                   sp("call model", 2, 1, 10, 90, kind=CLIENT, trace_id=tid)],
            "model": [sp("serve", 3, 2, 20, 80, kind=SERVER, trace_id=tid),
                      sp("inference", 4, 3, 25, 25 + d, trace_id=tid)],
        }))
    return out


async def feed_split(h: Harness, traces: list[tuple[bytes, dict[str, list[Span]]]],
                     seed: int = 1) -> None:
    """Every trace's gw spans in one batch and its model spans in a later one (children
    before parents), batches of 50 traces' worth, order shuffled within a batch."""
    rnd = random.Random(seed)
    for i in range(0, len(traces), 50):
        chunk = traces[i:i + 50]
        for svc in ("model", "gw"):
            spans = [s for _, by_svc in chunk for s in by_svc[svc]]
            rnd.shuffle(spans)
            await h.feed({svc: spans})


def analysed(h: Harness) -> int:
    return int(h.counters().get("mlagent_agent_latency_traces_total{outcome=complete}", 0))


def test_sample_mask_is_a_function_of_the_trace_id() -> None:
    rnd = random.Random(3)
    ids = [rnd.randbytes(16) for _ in range(20000)]
    key, _ = trace_keys(ids)
    mask = sample_mask(key, 0.1)
    assert mask is not None
    # The same id gets the same decision in any batch, in any order.
    perm = np.asarray(rnd.sample(range(len(ids)), len(ids)))
    key2, _ = trace_keys([ids[i] for i in perm])
    assert (sample_mask(key2, 0.1) == mask[perm]).all()
    # About the rate, and nested: a trace kept at 0.05 is kept at 0.1.
    assert 0.09 < mask.mean() < 0.11
    assert (sample_mask(key, 0.05) <= mask).all()
    assert sample_mask(key, 1.0) is None
    # Structured ids (a constant half, a counter) still sample at the rate.
    counter = [bytes(8) + i.to_bytes(8, "big") for i in range(20000)]
    assert 0.09 < sample_mask(trace_keys(counter)[0], 0.1).mean() < 0.11  # type: ignore[union-attr]


async def test_whole_traces_are_kept_across_batches_and_services() -> None:
    h = Harness(trace_sample_rate=0.2)
    traces = workload()
    await feed_split(h, traces)
    await h.settle()
    c = h.counters()
    n = analysed(h)
    assert 300 < n < 500  # ~20% of 2000
    # A trace cut in pieces would leave children without their parent or root.
    assert "mlagent_agent_latency_traces_total{outcome=rootless}" not in c
    assert not any(k.startswith("mlagent_agent_latency_span_anomalies") for k in c)
    assert c["mlagent_agent_latency_sampled_spans_total{decision=analysed}"] == 4 * n
    assert c["mlagent_agent_latency_sampled_spans_total{decision=skipped}"] == 4 * (N_TRACES - n)

    # The same traces, batched differently, give the same sample.
    h2 = Harness(trace_sample_rate=0.2)
    for _, by_svc in reversed(traces):
        await h2.feed(by_svc)
    await h2.settle()
    assert analysed(h2) == n
    assert h2.values("mlagent.latency.stage.duration", "stage") == \
        pytest.approx(h.values("mlagent.latency.stage.duration", "stage"))


async def test_red_metrics_count_every_span_at_any_rate() -> None:
    h = Harness(trace_sample_rate=0.05)
    await feed_split(h, workload(n=400))
    await h.settle()
    assert h.values("mlagent.latency.calls", "span.name") == {
        "POST /predict": 400, "call model": 400, "serve": 400, "inference": 400}
    inference_s = sum(int(by["model"][1].end_time_unix_nano - by["model"][1].start_time_unix_nano)
                      for _, by in workload(n=400)) * 1e-9
    assert h.values("mlagent.latency.duration", "span.name")["inference"] == \
        pytest.approx(inference_s)


async def test_shares_and_quantiles_are_unbiased_under_sampling() -> None:
    traces = workload()
    exact, sampled = Harness(), Harness(trace_sample_rate=0.2)
    for h in (exact, sampled):
        await feed_split(h, traces)
        await h.settle()
    assert analysed(exact) == N_TRACES
    share = exact.values("mlagent.latency.stage.share", "stage")["inference"]
    # ~400 of the traces: the share of a 5/10/50 ms mix over 100 ms traces.
    assert sampled.values("mlagent.latency.stage.share", "stage")["inference"] == \
        pytest.approx(share, abs=0.02)
    critical = exact.values("mlagent.latency.critical_path.share", "service.name")
    assert sampled.values("mlagent.latency.critical_path.share", "service.name") == \
        pytest.approx(critical, abs=0.02)

    def median(h: Harness) -> float:
        return next(dp.as_double for attrs, dp in h.points("mlagent.latency.stage.quantile")
                    if attrs["stage"] == "inference" and attrs["quantile"] == "0.5")

    # A third of the traces take 10 ms: both medians fall in that bucket's 10 ms bound.
    assert median(sampled) == pytest.approx(median(exact), abs=0.0025)


async def test_sums_over_traces_are_scaled_to_every_trace() -> None:
    rate = 0.25
    h = Harness(trace_sample_rate=rate)
    await feed_split(h, workload())
    await h.settle()
    n = analysed(h)
    assert n < N_TRACES
    # Each analysed trace stands for 1/rate traces: exact in n, unbiased over all.
    assert h.values("mlagent.service_graph.requests", "client", "server") == \
        {("gw", "model"): pytest.approx(n / rate)}
    assert n / rate == pytest.approx(N_TRACES, rel=0.15)
    # gw is on the critical path for 40 ms of each trace ([0,20] and [80,100]).
    assert h.values("mlagent.latency.critical_path.time", "service.name")["gw"] == \
        pytest.approx(n / rate * 0.040)
    # "call model" has self time 20 ms per trace ([10,20] and [80,90]).
    assert h.values("mlagent.latency.self_time", "span.name")["call model"] == \
        pytest.approx(n / rate * 0.020)
    # Histograms count the analysed traces themselves.
    hist = {attrs["span.name"]: dp for attrs, dp in h.points("mlagent.latency.trace.duration")}
    assert hist["POST /predict"].count == n


def test_sample_rate_is_validated() -> None:
    assert LatencyConfig().validate() == []
    for bad in (0.0, -0.1, 1.5):
        assert LatencyConfig(trace_sample_rate=bad).validate() == \
            ["trace_sample_rate: must be in (0, 1]"]


async def test_attribute_matched_stages_of_sampled_traces() -> None:
    # Attribute rules read the attributes of the sampled spans only, by their index
    # in the batch.
    stages = [StageConfig("model", attributes={"ml.stage": "^inference$"})]
    h = Harness(trace_sample_rate=0.3, stages=stages)
    rnd = random.Random(5)
    for _ in range(20):
        batch = []
        for _ in range(10):
            tid = rnd.randbytes(16)
            batch += [sp("handle", 1, None, 0, 100, kind=SERVER, trace_id=tid),
                      sp("step", 2, 1, 10, 40, trace_id=tid, attributes={"ml.stage": "inference"}),
                      sp("step", 3, 1, 40, 50, trace_id=tid, attributes={"ml.stage": "other"})]
        await h.feed({"api": batch})
    await h.settle()
    n = analysed(h)
    assert 0 < n < 200
    hist = {a["stage"]: dp for a, dp in h.points("mlagent.latency.stage.duration")}
    assert hist["model"].count == n
    assert hist["model"].sum == pytest.approx(n * 0.030)
    assert not any("internal_error" in k for k in h.counters())


async def test_stage_spans_of_unsampled_traces_do_not_break_emission() -> None:
    # A stage span creates its stage row when consumed; the stage histogram grows only
    # when a trace with the stage is analysed. With the default rate and no sampled
    # trace yet, every window must still emit (RED metrics first of all).
    h = Harness(trace_sample_rate=LatencyConfig().trace_sample_rate)
    rnd = random.Random(0)
    ids = [rnd.randbytes(16) for _ in range(200)]
    keep = sample_mask(trace_keys(ids)[0], h.config.trace_sample_rate)
    assert keep is not None
    unsampled = [t for t, k in zip(ids, keep.tolist(), strict=True) if not k][:20]
    for tid in unsampled:
        await h.feed({"api": [sp("handle", 1, None, 0, 100, kind=SERVER, trace_id=tid),
                              sp("model.infer", 2, 1, 10, 90, trace_id=tid)]})
    for window in range(1, 3):
        await h.settle()
        assert len(h.sink.batches) == window
        assert h.values("mlagent.latency.calls", "span.name") == \
            {"handle": 20, "model.infer": 20}
        assert h.points("mlagent.latency.stage.duration") == []


async def test_spans_without_a_valid_trace_id_are_not_counted_as_analysed() -> None:
    h = Harness(trace_sample_rate=0.5)
    await h.feed({"a": [sp("x", 1, None, 0, 10, trace_id=b""),
                        sp("y", 2, None, 0, 10, trace_id=bytes(16)),
                        sp("z", 3, None, 0, 10, trace_id=b"\x01" * 5)]})
    await h.settle()
    c = h.counters()
    assert c["mlagent_agent_dropped_items_total{reason=invalid_trace_id,signal=traces}"] == 3
    assert c.get("mlagent_agent_latency_sampled_spans_total{decision=analysed}", 0) == 0
    assert h.values("mlagent.latency.calls", "span.name") == {"x": 1, "y": 1, "z": 1}
