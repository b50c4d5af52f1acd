"""The ``prometheus_remote_write`` exporter against a strict test receiver (wire format,
headers, retry rules) and against a real Prometheus 2.42 (values, exemplars, and no
loss while Prometheus is down and restarted)."""

from __future__ import annotations

import asyncio
import math
import struct
import time

import cramjam
import pytest
from aiohttp import web
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality, Metric

from agent.component import Kind
from agent.exporters.prometheus_remote_write import RemoteWriteConfig, factory
from agent.exporters.prometheus_remote_write.remote_pb2 import WriteRequest
from agent.queue import QueueConfig, RetryConfig
from agent.telemetry import Telemetry
from agent.testing import gauge, make_host, metric_batch, monotonic_sum, settings_for
from tests.prom_server import PromServer

DELTA = AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA
RES = {"service.name": "infer", "service.instance.id": "pod-1"}
FAST_RETRY = RetryConfig(initial_interval=0.05, max_interval=0.2, max_elapsed_time=60,
                         randomization_factor=0)


class Receiver:
    """A remote write receiver that checks the protocol and answers as programmed."""

    def __init__(self) -> None:
        self.requests: list[WriteRequest] = []
        self.headers: list[dict[str, str]] = []
        self.answers: list[tuple[int, dict[str, str], str]] = []  # popped per request
        self.gate: asyncio.Event | None = None  # when set, requests wait for it
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/api/v1/write", self._write)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/api/v1/write"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()

    async def _write(self, request: web.Request) -> web.Response:
        raw = await request.read()
        # Block format (decompress_raw fails on the framed format Prometheus rejects).
        req = WriteRequest.FromString(bytes(cramjam.snappy.decompress_raw(raw)))
        self.headers.append(dict(request.headers))
        if self.gate is not None:
            await self.gate.wait()
        if self.answers:
            status, headers, text = self.answers.pop(0)
            if status >= 300:
                return web.Response(status=status, headers=headers, text=text)
        self.requests.append(req)
        return web.Response(status=204)

    def series(self) -> dict[tuple[tuple[str, str], ...], list[tuple[int, float]]]:
        out: dict[tuple[tuple[str, str], ...], list[tuple[int, float]]] = {}
        for req in self.requests:
            for ts in req.timeseries:
                key = tuple((lb.name, lb.value) for lb in ts.labels)
                out.setdefault(key, []).extend((s.timestamp, s.value) for s in ts.samples)
        return out

    def values(self, name: str) -> dict[frozenset[tuple[str, str]], list[float]]:
        return {frozenset(k): [v for _, v in samples] for k, samples in self.series().items()
                if dict(k)["__name__"] == name}


def make(url: str, tmp_path=None, **kw):
    telemetry = Telemetry()
    cfg = RemoteWriteConfig(endpoint=url, retry_on_failure=kw.pop("retry", FAST_RETRY),
                            sending_queue=kw.pop("queue", QueueConfig(timeout=5)), **kw)
    exp = factory.create(settings_for("prometheus_remote_write", Kind.EXPORTER, telemetry),
                         cfg, {})
    exp.telemetry = telemetry
    return exp


async def drain(exp) -> None:
    await exp.shutdown()


def now_ns() -> int:
    return time.time_ns()


# ----------------------------------------------------------------------------- wire format


async def test_wire_format_headers_and_labels(tmp_path):
    async with Receiver() as rx:
        exp = make(rx.url, shards=1)
        await exp.start(make_host(tmp_path))
        t = now_ns()
        await exp.consume(metric_batch([
            gauge("gpu.temp", [({"gpu": "0", "Zone": "a", "empty": ""}, 61.5)], unit="Cel",
                  time=t),
            monotonic_sum("requests", [({"model": "m"}, 9)], time=t),
        ], resource=RES))
        await drain(exp)
    (h,) = rx.headers
    assert h["Content-Encoding"] == "snappy"
    assert h["Content-Type"] == "application/x-protobuf"
    assert h["X-Prometheus-Remote-Write-Version"] == "0.1.0"
    assert h["User-Agent"].startswith("mlagent/")
    series = rx.series()
    for labels in series:
        names = [k for k, _ in labels]
        assert names == sorted(names) and "__name__" in names
        assert all(v for _, v in labels)  # no empty values
    assert rx.values("gpu_temp_celsius") == {frozenset({
        ("__name__", "gpu_temp_celsius"), ("Zone", "a"), ("gpu", "0"), ("instance", "pod-1"),
        ("job", "infer")}): [61.5]}
    assert list(rx.values("requests_total").values()) == [[9.0]]
    assert list(rx.values("target_info").values()) == [[1.0]]


async def test_histogram_as_classic_series_with_exemplar(tmp_path):
    async with Receiver() as rx:
        exp = make(rx.url)
        await exp.start(make_host(tmp_path))
        t = now_ns()
        m = Metric(name="latency", unit="s")
        dp = m.histogram.data_points.add(time_unix_nano=t, explicit_bounds=[0.1, 1.0],
                                         bucket_counts=[2, 3, 1], count=6, sum=2.5)
        dp.exemplars.add(as_double=0.4, trace_id=b"\x0a" * 16, span_id=b"\x0b" * 8,
                         time_unix_nano=t)
        await exp.consume(metric_batch([m], resource=RES))
        await drain(exp)
    buckets = {dict(k)["le"]: v for k, v in rx.values("latency_seconds_bucket").items()}
    assert buckets == {"0.1": [2.0], "1.0": [5.0], "+Inf": [6.0]}
    assert list(rx.values("latency_seconds_count").values()) == [[6.0]]
    assert list(rx.values("latency_seconds_sum").values()) == [[2.5]]
    (ex_series,) = [ts for r in rx.requests for ts in r.timeseries if ts.exemplars]
    assert ("le", "1.0") in [(lb.name, lb.value) for lb in ex_series.labels]
    (ex,) = ex_series.exemplars
    assert {lb.name: lb.value for lb in ex.labels} == {"trace_id": "0a" * 16,
                                                       "span_id": "0b" * 8}
    assert ex.value == 0.4 and ex.timestamp == t // 1_000_000


async def test_samples_of_a_series_are_in_time_order_and_delta_is_cumulative(tmp_path):
    async with Receiver() as rx:
        exp = make(rx.url, shards=3, target_info=False)
        await exp.start(make_host(tmp_path))
        t0 = now_ns()
        batch = metric_batch([])
        sm = batch.request.resource_metrics[0].scope_metrics[0]
        # One batch holding three deltas of the same series, newest first.
        for i in (2, 1, 0):
            sm.metrics.append(monotonic_sum("tokens", [({}, 10 + i)], start=t0 + i * 10**9,
                                            time=t0 + (i + 1) * 10**9, temporality=DELTA))
        await exp.consume(batch)
        await drain(exp)
    (samples,) = rx.series().values()
    times = [t for t, _ in samples]
    assert times == sorted(times)
    # Only the newest-first order's first point can start the series: the two older
    # ones overlap it and are dropped, as a reordered delta would double count.
    assert [v for _, v in samples] == [12.0]
    assert exp.telemetry.snapshot("prometheus_remote_write")[
        "mlagent_agent_dropped_items_total{reason=out_of_order,signal=metrics}"] == 2


async def test_each_series_keeps_one_shard_and_order_across_batches(tmp_path):
    async with Receiver() as rx:
        exp = make(rx.url, shards=4, target_info=False, max_samples_per_send=7)
        await exp.start(make_host(tmp_path))
        t0 = now_ns()
        for step in range(5):
            await exp.consume(metric_batch([gauge(
                "load", [({"cpu": str(c)}, step) for c in range(20)],
                time=t0 + step * 10**6)]))
        await drain(exp)
    series = rx.series()
    assert len(series) == 20
    for samples in series.values():
        assert [v for _, v in samples] == [0, 1, 2, 3, 4]
    assert all(sum(len(ts.samples) for ts in r.timeseries) <= 7 for r in rx.requests)


@pytest.mark.parametrize(("status", "retried"), [(500, True), (503, True), (429, True),
                                                 (400, False), (404, False)])
async def test_retry_rules(tmp_path, status, retried):
    async with Receiver() as rx:
        rx.answers.append((status, {"Retry-After": "0"}, "out of order sample"))
        exp = make(rx.url, shards=1, target_info=False)
        await exp.start(make_host(tmp_path))
        await exp.consume(metric_batch([gauge("g", [({}, 1)], time=now_ns())]))
        await drain(exp)
    snap = exp.telemetry.snapshot("prometheus_remote_write")
    assert len(rx.headers) == (2 if retried else 1)
    assert len(rx.requests) == (1 if retried else 0)
    dropped = snap.get(
        "mlagent_agent_dropped_items_total{reason=permanent_error,signal=metrics}", 0)
    assert dropped == (0 if retried else 1)


async def test_queue_gauges_add_up_over_shards(tmp_path):
    async with Receiver() as rx:
        rx.gate = asyncio.Event()
        exp = make(rx.url, shards=4, target_info=False)
        await exp.start(make_host(tmp_path))
        await exp.consume(metric_batch([gauge("g", [({"i": str(i)}, i) for i in range(20)],
                                              time=now_ns())]))
        # Queued or in flight (the receiver holds them): all 20 samples count.
        size = "mlagent_agent_queue_size{signal=metrics}"
        assert exp.telemetry.snapshot("prometheus_remote_write")[size] == 20
        rx.gate.set()
        await drain(exp)
    assert exp.telemetry.snapshot("prometheus_remote_write")[size] == 0
    assert len(rx.series()) == 20


async def test_stale_marker_for_ended_series(tmp_path):
    async with Receiver() as rx:
        exp = make(rx.url, target_info=False)
        await exp.start(make_host(tmp_path))
        m = gauge("g", [({}, 0)], time=now_ns())
        m.gauge.data_points[0].flags = 1  # no recorded value: the series ended
        await exp.consume(metric_batch([m]))
        await drain(exp)
    ((_, v),) = next(iter(rx.series().values()))
    assert math.isnan(v) and struct.pack("<d", v) == struct.pack("<Q", 0x7FF0000000000002)


async def test_suffixes_off_sends_counter_names_as_they_are(tmp_path):
    """``add_metric_suffixes = false``: ``requests_total`` is sent (and ended) under its
    own name, not ``requests_total_total``; ``tokens`` gets no ``_total``."""
    async with Receiver() as rx:
        exp = make(rx.url, add_metric_suffixes=False, target_info=False)
        await exp.start(make_host(tmp_path))
        t = now_ns()
        await exp.consume(metric_batch([monotonic_sum("requests_total", [({}, 3)], time=t),
                                        monotonic_sum("tokens", [({}, 5)], time=t)]))
        ended = monotonic_sum("requests_total", [({}, 0)], time=t + 10**9)
        ended.sum.data_points[0].flags = 1
        await exp.consume(metric_batch([ended]))
        await drain(exp)
    names = {dict(k)["__name__"] for k in rx.series()}
    assert names == {"requests_total", "tokens"}
    ((value, stale),) = rx.values("requests_total").values()
    assert value == 3.0 and math.isnan(stale)
    assert list(rx.values("tokens").values()) == [[5.0]]


def _ended_histogram_and_summary(t: int, *, ended: bool, bounds=(0.1, 1.0)) -> list[Metric]:
    h = Metric(name="latency", unit="s")
    dp = h.histogram.data_points.add(time_unix_nano=t, explicit_bounds=bounds,
                                     bucket_counts=[1] * (len(bounds) + 1),
                                     count=len(bounds) + 1, sum=2.5)
    s = Metric(name="wait", unit="s")
    sdp = s.summary.data_points.add(time_unix_nano=t, count=4, sum=1.0)
    sdp.quantile_values.add(quantile=0.5, value=0.2)
    sdp.quantile_values.add(quantile=0.99, value=0.9)
    if ended:
        dp.flags = sdp.flags = 1
    return [h, s]


async def test_ended_histogram_and_summary_mark_every_series_stale(tmp_path):
    """When a histogram or summary series ends, each of its bucket and quantile series
    gets a stale marker too, not only ``_sum`` and ``_count``: otherwise they stay live
    for 5 minutes and ``histogram_quantile`` keeps answering."""
    async with Receiver() as rx:
        exp = make(rx.url, target_info=False)
        await exp.start(make_host(tmp_path))
        t = now_ns()
        await exp.consume(metric_batch(_ended_histogram_and_summary(t, ended=False)))
        await exp.consume(metric_batch(_ended_histogram_and_summary(t + 10**9, ended=True)))
        await drain(exp)
    got = {(dict(k)["__name__"], dict(k).get("le") or dict(k).get("quantile")): samples
           for k, samples in rx.series().items()}
    assert set(got) == {
        ("latency_seconds_bucket", "0.1"), ("latency_seconds_bucket", "1.0"),
        ("latency_seconds_bucket", "+Inf"), ("latency_seconds_sum", None),
        ("latency_seconds_count", None), ("wait_seconds", "0.5"), ("wait_seconds", "0.99"),
        ("wait_seconds_sum", None), ("wait_seconds_count", None)}
    t_ms = t // 1_000_000
    for series, samples in got.items():
        (t0, live), (t1, end) = samples
        assert (t0, t1) == (t_ms, t_ms + 1000) and not math.isnan(live), series
        assert struct.pack("<d", end) == struct.pack("<Q", 0x7FF0000000000002), series


async def test_buckets_a_histogram_stops_sending_are_marked_stale(tmp_path):
    """A changed layout (here ``le`` 0.1 and 1.0 -> 0.5) ends the buckets no longer sent."""
    async with Receiver() as rx:
        exp = make(rx.url, target_info=False)
        await exp.start(make_host(tmp_path))
        t = now_ns()
        await exp.consume(metric_batch(_ended_histogram_and_summary(t, ended=False)[:1]))
        await exp.consume(metric_batch(_ended_histogram_and_summary(
            t + 10**9, ended=False, bounds=(0.5,))[:1]))
        await drain(exp)
    buckets = {dict(k)["le"]: [v for _, v in s]
               for k, s in rx.series().items() if dict(k)["__name__"] == "latency_seconds_bucket"}
    assert buckets["0.5"] == [1.0] and buckets["+Inf"] == [3.0, 2.0]
    for le in ("0.1", "1.0"):
        live, end = buckets[le]
        assert not math.isnan(live) and math.isnan(end)


async def test_stale_markers_for_buckets_are_remembered_for_max_series(tmp_path):
    """The remembered bucket layouts are bounded by ``max_series``: the most recently
    sent series are ended bucket by bucket, older ones only by ``_sum``/``_count``."""
    async with Receiver() as rx:
        exp = make(rx.url, target_info=False, max_series=1)
        await exp.start(make_host(tmp_path))
        t = now_ns()
        for i, when in enumerate((t, t + 1)):
            m = _ended_histogram_and_summary(when, ended=False)[0]
            m.histogram.data_points[0].attributes.add(key="i").value.string_value = str(i)
            await exp.consume(metric_batch([m]))
        ended = []
        for i in range(2):
            m = _ended_histogram_and_summary(t + 10**9, ended=True)[0]
            m.histogram.data_points[0].attributes.add(key="i").value.string_value = str(i)
            ended.append(m)
        await exp.consume(metric_batch(ended))
        await drain(exp)
    stale = {(dict(k)["i"], dict(k)["__name__"]) for k, s in rx.series().items()
             if math.isnan(s[-1][1])}
    assert stale == {("0", "latency_seconds_sum"), ("0", "latency_seconds_count"),
                     ("1", "latency_seconds_sum"), ("1", "latency_seconds_count"),
                     ("1", "latency_seconds_bucket")}


def test_config_validation():
    errs = RemoteWriteConfig(endpoint="localhost:9090", shards=0, max_samples_per_send=0,
                             sending_queue=QueueConfig(persistent=True)).validate()
    assert [e.split(":")[0] for e in errs] == ["endpoint", "shards", "max_samples_per_send"]
    assert RemoteWriteConfig().validate() == []


async def test_persistent_shards_survive_a_restart_while_the_receiver_is_down(tmp_path):
    """Samples queued on disk while the receiver is down are sent by the next agent run."""
    host = make_host(tmp_path)
    persistent = QueueConfig(timeout=1, persistent=True)
    down = make("http://127.0.0.1:9/api/v1/write", shards=2, queue=persistent)
    await down.start(host)
    t = now_ns()
    await down.consume(metric_batch([
        gauge("queue.depth", [({"q": str(i)}, float(i)) for i in range(6)], time=t)],
        resource=RES))
    await down.shutdown()
    async with Receiver() as rx:
        up = make(rx.url, shards=2, queue=persistent)
        await up.start(host)
        await asyncio.sleep(0)
        for _ in range(200):
            if len(rx.values("queue_depth")) == 6:
                break
            await asyncio.sleep(0.05)
        await up.shutdown()
    values = rx.values("queue_depth")
    assert sorted(v[0] for v in values.values()) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


async def test_shutdown_without_start():
    exp = make("http://127.0.0.1:1/api/v1/write")
    await exp.shutdown()
    await exp.shutdown()


# ----------------------------------------------------------------------------- real Prometheus


@pytest.mark.integration
async def test_real_prometheus_values_exemplars_and_no_loss_across_restart(tmp_path):
    prom = PromServer(tmp_path / "prom")
    await prom.start()
    exp = make(prom.remote_write_url, shards=2)
    await exp.start(make_host(tmp_path / "state"))
    try:
        t0 = now_ns() - 60 * 10**9
        sent = 0

        async def send(step: int) -> None:
            nonlocal sent
            t = t0 + step * 10**9
            m = Metric(name="infer.latency", unit="s")
            m.histogram.aggregation_temporality = DELTA
            dp = m.histogram.data_points.add(
                start_time_unix_nano=t - 10**9, time_unix_nano=t, explicit_bounds=[0.5],
                bucket_counts=[1, 1], count=2, sum=1.0)
            dp.exemplars.add(as_double=0.2, trace_id=step.to_bytes(16, "big"),
                             span_id=b"\x01" * 8, time_unix_nano=t)
            await exp.consume(metric_batch([
                monotonic_sum("infer.requests", [({"model": "m"}, 1)], start=t - 10**9,
                              time=t, temporality=DELTA),
                m], resource=RES))
            sent += 1

        for step in range(5):
            await send(step)
        await prom.wait_for('infer_requests_total{job="infer"}',
                            lambda v: list(v.values()) == [5.0])

        await prom.stop()  # backend outage: the shard queues hold and retry
        for step in range(5, 15):
            await send(step)
        await asyncio.sleep(0.5)  # let the queues try (and fail) meanwhile
        await prom.start()

        # Every sample arrived: the cumulative total and one sample per step.
        await prom.wait_for('infer_requests_total{job="infer"}',
                            lambda v: list(v.values()) == [15.0])
        await prom.wait_for('count_over_time(infer_requests_total{job="infer"}[1h])',
                            lambda v: list(v.values()) == [15.0])
        got = await prom.values('infer_latency_seconds_bucket{le="0.5"}')
        assert list(got.values()) == [15.0]
        got = await prom.values('infer_latency_seconds_count')
        assert list(got.values()) == [30.0]
        exemplars = await prom.exemplars('infer_latency_seconds_bucket{le="0.5"}')
        trace_ids = {e["labels"]["trace_id"] for s in exemplars for e in s["exemplars"]}
        assert trace_ids == {step.to_bytes(16, "big").hex() for step in range(15)}
        snap = exp.telemetry.snapshot("prometheus_remote_write")
        assert not any(k.startswith("mlagent_agent_dropped") for k in snap)
        assert snap["mlagent_agent_retries_total{signal=metrics}"] >= 1
    finally:
        await exp.shutdown()
        await prom.stop()


@pytest.mark.integration
async def test_real_prometheus_forgets_ended_histogram_and_summary(tmp_path):
    """After the end of a histogram and a summary, a real Prometheus answers neither
    ``histogram_quantile`` over the buckets nor the quantile series."""
    async with PromServer(tmp_path / "prom") as prom:
        exp = make(prom.remote_write_url, target_info=False)
        await exp.start(make_host(tmp_path / "state"))
        try:
            t = now_ns() - 10 * 10**9
            await exp.consume(metric_batch(_ended_histogram_and_summary(t, ended=False)))
            quantile = "histogram_quantile(0.5, latency_seconds_bucket)"
            await prom.wait_for(quantile, lambda v: len(v) == 1)
            assert len(await prom.values("wait_seconds")) == 2
            await exp.consume(metric_batch(_ended_histogram_and_summary(t + 10**9, ended=True)))
            await prom.wait_for("latency_seconds_count", lambda v: not v)
            await prom.wait_for(quantile, lambda v: not v)
            assert await prom.values("wait_seconds") == {}
        finally:
            await exp.shutdown()
