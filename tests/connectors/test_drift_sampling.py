"""Adaptive sampling in the drift connector: when it engages, what it costs the
statistics, and that the volumes it reports stay right (agent/connectors/drift/sampling.py)."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from agent.component import Kind, Signal
from agent.connectors.drift import DriftConfig, DriftConnector
from agent.connectors.drift.sampling import (
    ADAPT_INTERVAL_S,
    MAX_RISE,
    AdaptiveSampler,
    read_sample,
)
from agent.pdata import TraceBatch, attributes_to_dict
from agent.telemetry import Telemetry
from agent.testing import Sink, make_host, settings_for, span, trace_batch

WINDOW = 60.0
TARGET = 2000


class Clock:
    """The connector's clock, moved by the test: rates follow simulated seconds."""

    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def payloads(seed: int, count: int, n: int, *, shift: float = 0.0,
             service: str = "svc") -> list[bytes]:
    """``count`` serialised requests of ``n`` prediction spans (x ~ N(shift, 1)).

    Serialised once and decoded per use, so a test can stream hundreds of thousands
    of spans through the connector in well under a second.
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        xs, scores = rng.normal(shift, 1.0, n), rng.beta(8, 2, n)
        labels = rng.choice(["cat", "dog"], size=n, p=[0.6, 0.4])
        spans = [span("predict", trace_id=rng.bytes(16), span_id=rng.bytes(8), attributes={
            "ml.model.name": "m", "ml.model.version": "1", "http.route": "/predict",
            "ml.prediction.label": str(labels[i]), "ml.prediction.score": float(scores[i]),
            "ml.feature.x": float(xs[i])}) for i in range(n)]
        out.append(trace_batch({service: spans}).to_bytes())
    return out


class Stream:
    """A connector on a simulated clock, fed ``per_second`` predictions a second."""

    def __init__(self, tmp_path: Any, **cfg: Any) -> None:
        self.clock = Clock()
        self.metrics = Sink()
        self.telemetry = Telemetry()
        config = replace(DriftConfig(), **{"window": WINDOW, "target_window_predictions": TARGET,
                                           **cfg})
        assert config.validate() == []
        self.conn = DriftConnector(settings_for("drift", Kind.CONNECTOR, self.telemetry),
                                   config, {Signal.METRICS: self.metrics}, clock=self.clock)
        self.host = make_host(tmp_path / "state")
        self.fed = 0

    async def __aenter__(self) -> Stream:
        await self.conn.start(self.host)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.conn.shutdown()

    async def feed(self, data: list[bytes], seconds: int, per_second: int = 1) -> None:
        """``per_second`` requests every simulated second, cycling through ``data``."""
        for i in range(seconds * per_second):
            self.clock.t += 1.0 / per_second
            batch = TraceBatch.from_bytes(data[i % len(data)])
            self.fed += batch.item_count
            await self.conn.consume(batch)

    def rate(self, service: str = "svc") -> float:
        return self.conn.sampler.service(service).rate

    def gauge(self, name: str, **where: str) -> float:
        """The value of gauge ``name`` (against the reference) in the last window."""
        [value] = [dp.as_double for m in self.metrics.batches[-1].request.resource_metrics[0]
                   .scope_metrics[0].metrics if m.name == name for dp in m.gauge.data_points
                   if "baseline.version" not in (a := attributes_to_dict(dp.attributes))
                   and all(a.get(k) == v for k, v in where.items())]
        return value

    def histogram_count(self, signal: str) -> int:
        """Total of the cumulative counts of ``signal`` (a histogram, or category sums)."""
        total = 0
        for m in self.metrics.batches[-1].request.resource_metrics[0].scope_metrics[0].metrics:
            if m.name == "mlagent.drift.histogram":
                total += sum(dp.count for dp in m.histogram.data_points
                             if attributes_to_dict(dp.attributes)["signal"] == signal)
            elif m.name == "mlagent.drift.category.count":
                total += sum(dp.as_int for dp in m.sum.data_points
                             if attributes_to_dict(dp.attributes)["signal"] == signal)
        assert total, f"no counts for {signal}"
        return total


# --------------------------------------------------------------------------- through the connector


async def test_below_the_target_every_prediction_is_read_however_fast(tmp_path) -> None:
    data = payloads(1, 4, 50)
    async with Stream(tmp_path) as s:
        await s.feed(data, 30, per_second=1)  # 1,500 predictions in the window < 2,000
        await s.conn.evaluate_now()
        assert s.rate() == 1.0
        assert s.gauge("mlagent.prediction.count") == 1500
        assert s.gauge("mlagent.drift.sample_rate") == 1.0
        # The same volume, two thirds of it in a burst: still nothing sampled.
        await s.feed(data, 2, per_second=10)
        await s.feed(data, 10, per_second=1)
        await s.conn.evaluate_now()
        assert s.rate() == 1.0 and s.gauge("mlagent.prediction.count") == 1500


async def test_above_the_target_about_the_target_is_read_and_the_volume_is_scaled(
        tmp_path) -> None:
    data = payloads(2, 8, 2000)  # 2,000 predictions a second: 120,000 a window
    async with Stream(tmp_path) as s:
        # A new service is read in full until its window passes the target: the
        # baseline comes from there; a few seconds later the rate is set.
        await s.feed(data, 3)
        assert s.rate() == pytest.approx(TARGET / 120_000, rel=0.5)
        await s.conn.evaluate_now()
        before = {sig: s.histogram_count(sig) for sig in ("feature:x", "label", "score")}
        await s.feed(data, int(WINDOW))  # a whole window at the rate carried over
        win = s.conn.subjects[next(iter(s.conn.subjects))].window
        assert win is not None and 0.8 * TARGET <= win.n <= 1.25 * TARGET  # what tests run on
        await s.conn.evaluate_now()
        assert s.gauge("mlagent.prediction.count") == pytest.approx(120_000, rel=0.05)
        assert s.gauge("mlagent.drift.sample_rate") == pytest.approx(win.n / 120_000, rel=0.05)
        # The cumulative histograms are scaled too, so fleet-wide sums stay volumes.
        for sig, count in before.items():
            assert s.histogram_count(sig) - count == pytest.approx(120_000, rel=0.05)


async def test_a_sampled_window_is_unbiased_and_detects_a_shift(tmp_path) -> None:
    async with Stream(tmp_path) as s:
        await s.feed(payloads(3, 3, 2000), 3)  # the baseline, and the rate is set
        await s.conn.evaluate_now()
        await s.feed(payloads(4, 8, 2000), int(WINDOW))
        await s.conn.evaluate_now()
        assert s.rate() < 0.05  # sampling is on
        assert s.gauge("mlagent.drift.detected", kind="data") == 0.0
        assert abs(s.gauge("mlagent.feature.mean", feature="x")) < 0.1
        await s.feed(payloads(5, 8, 2000, shift=0.5), int(WINDOW))
        await s.conn.evaluate_now()
        assert s.gauge("mlagent.drift.detected", kind="data") == 1.0
        assert s.gauge("mlagent.feature.mean", feature="x") == pytest.approx(0.5, abs=0.1)
        assert s.gauge("mlagent.prediction.count") == pytest.approx(120_000, rel=0.05)


async def test_the_rate_follows_the_volume(tmp_path) -> None:
    async with Stream(tmp_path) as s:
        await s.feed(payloads(6, 4, 2000), 5)
        high = s.rate()
        assert high == pytest.approx(TARGET / 120_000, rel=0.5)
        await s.feed(payloads(7, 8, 200), 10)  # ten times less: the rate rises ...
        assert s.rate() == pytest.approx(TARGET / 12_000, rel=0.5)
        assert s.rate() > 3 * high
        await s.conn.evaluate_now()
        await s.feed(payloads(8, 4, 20), 10)  # ... and below the target it is 1 again
        assert s.rate() == 1.0


async def test_a_service_without_predictions_is_not_read_in_full(tmp_path) -> None:
    plain = [trace_batch({"gateway": [span("GET /", attributes={"http.route": "/"})
                                      for _ in range(5000)]}).to_bytes()]
    async with Stream(tmp_path, max_window_examined=30_000) as s:
        await s.feed(plain, 10)  # 300,000 spans a window, none a prediction
        assert s.rate("gateway") == pytest.approx(30_000 / 300_000, rel=0.01)
        await s.conn.evaluate_now()
        assert s.metrics.batches == []


async def test_services_are_sampled_separately(tmp_path) -> None:
    busy, quiet = payloads(9, 4, 2000, service="busy"), payloads(10, 4, 20, service="quiet")
    async with Stream(tmp_path) as s:
        for _ in range(10):
            await s.feed(busy, 1)
            await s.feed(quiet, 1)
        assert s.rate("busy") < 0.05 and s.rate("quiet") == 1.0


async def test_adaptation_off_reads_everything(tmp_path) -> None:
    async with Stream(tmp_path, target_window_predictions=0) as s:
        await s.feed(payloads(11, 4, 2000), 5)
        assert s.rate() == 1.0
        await s.conn.evaluate_now()
        assert s.gauge("mlagent.prediction.count") == 10_000
        assert s.gauge("mlagent.drift.sample_rate") == 1.0


def test_config_bounds_are_validated() -> None:
    errs = replace(DriftConfig(), target_window_predictions=50).validate()
    assert [e.split(":")[0] for e in errs] == ["target_window_predictions"]
    errs = replace(DriftConfig(), max_window_examined=10).validate()
    assert [e.split(":")[0] for e in errs] == ["max_window_examined"]
    assert replace(DriftConfig(), target_window_predictions=0).validate() == []


# --------------------------------------------------------------------------- the sampler alone


def sampler(**kw: Any) -> AdaptiveSampler:
    args: dict[str, Any] = dict(window=WINDOW, target=TARGET, max_examined=10 * TARGET,
                                ceiling=1.0, max_services=10, now=0.0)
    return AdaptiveSampler(**{**args, **kw})


def second(sm: AdaptiveSampler, now: float, volumes: dict[str, int]) -> None:
    """One simulated second: ``volumes`` predictions per service, each examined at its rate."""
    sm.tick(now)
    for name, n in volumes.items():
        s = sm.service(name)
        sm.count_items(s, n)
        sm.count_predictions(s, round(n * s.rate))


def test_sampler_never_samples_at_or_below_the_target() -> None:
    for volume, sampled in ((TARGET, False), (TARGET + 1, True)):
        sm = sampler()
        second(sm, 0.0, {"a": volume})  # a burst: all of the window's predictions at once
        second(sm, 0.5, {})
        assert (sm.service("a").rate < 1.0) is sampled
        for t in range(1, int(WINDOW)):  # silence: the rate rises back
            second(sm, t + 0.5, {})
        assert sm.service("a").rate == 1.0


def test_sampler_rises_at_most_max_rise_per_interval_and_falls_at_once() -> None:
    sm = sampler()
    second(sm, 0.0, {"a": 3000})  # 180,000 a window: over the target in the first second,
    sm.tick(0.5)  # so adapted at the next batch, not after a whole second
    rates = [sm.service("a").rate]
    assert rates[0] < 1.0
    for t in range(1, 8):
        second(sm, t + 0.5, {"a": 3000})
        rates.append(sm.service("a").rate)
    assert max(b / a for a, b in itertools.pairwise(rates)) <= MAX_RISE
    assert rates[-1] == pytest.approx(TARGET / 180_000, rel=0.05)
    second(sm, 8.5, {"a": 300_000})
    second(sm, 9.5, {"a": 300_000})
    assert sm.service("a").rate == pytest.approx(TARGET / 18_000_000, rel=0.05)


def test_sampler_survives_the_clock_stepping_back() -> None:
    sm = sampler()
    for t in range(6):
        second(sm, float(t), {"a": 1000})
    rate = sm.service("a").rate
    assert rate == pytest.approx(TARGET / 60_000, rel=0.05)
    second(sm, -100.0, {"a": 1000})
    assert sm.service("a").rate == rate
    for t in range(3):
        second(sm, -100.0 + ADAPT_INTERVAL_S * (t + 1), {"a": 1000})
    assert sm.service("a").rate == pytest.approx(rate, rel=0.05)


def test_sampler_bounds_its_services() -> None:
    sm = sampler(max_services=2)
    entries = {name: sm.service(name) for name in ("a", "b", "c", "d")}
    assert entries["c"] is entries["d"] and entries["a"] is not entries["c"]
    for t in range(6):
        second(sm, float(t), {"c": 500, "d": 500})  # they share one rate: their sum sets it
    assert sm.service("d").rate == pytest.approx(TARGET / 60_000, rel=0.05)
    sm.close_window()  # "a" and "b" were silent for a whole window: forgotten
    assert sm.service("e") is not entries["c"] and sm.service("e").rate == 1.0
    assert sm.service("d") is entries["c"]


def test_bernoulli_sampling_is_uniform_over_positions() -> None:
    """The geometric gaps choose each item with the same probability, wherever it is."""
    batch = trace_batch({"svc": [span(attributes={"ml.prediction.score": float(i)})
                                 for i in range(100)]})
    sm = sampler(target=0, ceiling=0.3)
    rng = random.Random(1)
    hits = np.zeros(100)
    runs = 2000
    for _ in range(runs):
        for d in read_sample(batch, sm, rng).ml:
            hits[int(d["ml.prediction.score"])] += 1
    share = hits / runs
    assert abs(share.mean() - 0.3) < 0.01
    # Each position's share is binomial(2000, 0.3): within 5 standard errors.
    assert np.all(np.abs(share - 0.3) < 5 * math.sqrt(0.3 * 0.7 / runs))
    assert abs(share[:50].mean() - share[50:].mean()) < 0.02


# --------------------------------------------------------------------------- the fast reader


