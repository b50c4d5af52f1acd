"""Benchmark of the Prometheus exporters: consume throughput and scrape render time.

    python bench/bench_prometheus.py [--series 10000] [--rounds 10]

Measures, on one core, with batches of ``--series`` series (80% gauges/counters,
20% histograms with 10 buckets):

- ``prometheus`` consume: data points per second folded into the series store;
- ``prometheus`` render: milliseconds per scrape, text 0.0.4 and OpenMetrics;
- ``prometheus_remote_write`` consume + send: data points per second through
  translation, sharding, protobuf + snappy encoding and HTTP to an in-process
  receiver on 127.0.0.1 that answers 204.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time

from aiohttp import web
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality, Metric

from agent.component import Kind
from agent.exporters.prometheus import PrometheusConfig
from agent.exporters.prometheus import factory as pull_factory
from agent.exporters.prometheus_remote_write import RemoteWriteConfig
from agent.exporters.prometheus_remote_write import factory as rw_factory
from agent.pdata import MetricBatch
from agent.queue import QueueConfig
from agent.testing import make_host, metric_batch, settings_for

RESOURCE = {"service.name": "infer", "service.instance.id": "pod-1", "host.name": "gpu-01"}
BOUNDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]


def make_batch(series: int, t_ns: int) -> MetricBatch:
    """``series`` series: 40% gauge, 40% counter, 20% histogram, 10 models x N routes."""
    per_kind = [int(series * 0.4), int(series * 0.4)]
    per_kind.append(series - sum(per_kind))
    g = Metric(name="gpu.memory.used", unit="By")
    for i in range(per_kind[0]):
        dp = g.gauge.data_points.add(time_unix_nano=t_ns, as_double=float(i))
        dp.attributes.add(key="gpu").value.string_value = str(i)
    c = Metric(name="model.requests")
    c.sum.is_monotonic = True
    c.sum.aggregation_temporality = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
    for i in range(per_kind[1]):
        dp = c.sum.data_points.add(time_unix_nano=t_ns, start_time_unix_nano=1, as_int=i)
        dp.attributes.add(key="model").value.string_value = f"m{i % 10}"
        dp.attributes.add(key="route").value.string_value = f"/r{i}"
    h = Metric(name="inference.latency", unit="s")
    h.histogram.aggregation_temporality = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
    for i in range(per_kind[2]):
        dp = h.histogram.data_points.add(time_unix_nano=t_ns, start_time_unix_nano=1,
                                         explicit_bounds=BOUNDS, bucket_counts=[1] * 10,
                                         count=10, sum=1.5)
        dp.attributes.add(key="route").value.string_value = f"/r{i}"
    return metric_batch([g, c, h], resource=RESOURCE)


async def bench_pull(series: int, rounds: int) -> None:
    exp = pull_factory.create(settings_for("prometheus", Kind.EXPORTER),
                              PrometheusConfig(endpoint="127.0.0.1:0"), {})
    t0 = time.time_ns()
    batches = [make_batch(series, t0 + i * 10**9) for i in range(rounds)]
    points = batches[0].item_count
    times = []
    for b in batches:
        start = time.perf_counter()
        await exp.consume(b)
        times.append(time.perf_counter() - start)
    best = min(times[1:] or times)  # the first round also creates the series
    print(f"prometheus consume: {points} points/batch, first {times[0] * 1e3:.1f} ms, "
          f"then median {statistics.median(times[1:] or times) * 1e3:.1f} ms "
          f"-> {points / best:,.0f} points/s (best)")
    for om in (False, True):
        rt = []
        for _ in range(rounds):
            start = time.perf_counter()
            body = exp.store.render(openmetrics=om)
            rt.append(time.perf_counter() - start)
        print(f"prometheus render {'openmetrics' if om else 'text 0.0.4'}: "
              f"{exp.store.series_count} series, {len(body) / 1e6:.2f} MB, "
              f"median {statistics.median(rt) * 1e3:.1f} ms per scrape")
    await exp.shutdown()


async def bench_remote_write(series: int, rounds: int) -> None:
    received = 0

    async def write(request: web.Request) -> web.Response:
        nonlocal received
        received += len(await request.read())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/api/v1/write", write)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    cfg = RemoteWriteConfig(endpoint=f"http://127.0.0.1:{port}/api/v1/write",
                            sending_queue=QueueConfig(max_items=10**8))
    exp = rw_factory.create(settings_for("prometheus_remote_write", Kind.EXPORTER), cfg, {})
    with tempfile.TemporaryDirectory() as d:
        await exp.start(make_host(d))
        t0 = time.time_ns()
        batches = [make_batch(series, t0 + i * 10**9) for i in range(rounds)]
        points = sum(b.item_count for b in batches)
        start = time.perf_counter()
        for b in batches:
            await exp.consume(b)
        queued = time.perf_counter() - start
        await exp.shutdown()  # drains every shard
        total = time.perf_counter() - start
    await runner.cleanup()
    print(f"prometheus_remote_write: {points} points in {rounds} batches: consume "
          f"{points / queued:,.0f} points/s, consume+send {points / total:,.0f} points/s, "
          f"{received / 1e6:.1f} MB snappy sent")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    asyncio.run(bench_pull(args.series, args.rounds))
    asyncio.run(bench_remote_write(args.series, args.rounds))


if __name__ == "__main__":
    main()
