"""Latency connector throughput against a decode-only passthrough, in one process and run.

    python bench/bench_latency.py [--batches 400] [--rounds 3] [--merge 1] [--sample-rate R]

Feeds the same serialised OTLP requests (bench/payloads.py: 512 spans per request,
traces of 8 spans, 4 services), ``--merge`` of them concatenated into one batch (the
batch processor merges only while its flushes are busy; under bench_passthrough.py's
load the connector sees the 512-span requests as they came), through

- ``passthrough``: decode (``TraceBatch.from_bytes``) and hand to a no-op consumer;
- ``columns``:     decode and extract the shared per-batch columns (``batch.columns``,
                   done once per batch for every reader, DESIGN.md §2);
- ``latency``:     decode and ``LatencyConnector.consume``. The connector's clock
                   advances 10 ms per request (~50k spans/s arriving) and ``tick``
                   runs every 100 ms of it (processing the pending spans), so traces
                   are assembled and analysed (decision_wait 0.3 s) and windows closed
                   (1 s) as in steady state; the final flush is included. ``trace_sample_rate`` is the
                   default's unless ``--sample-rate`` says otherwise.

and prints spans per CPU second of this process for each (best of ``--rounds``;
CPU time rather than wall time, so other load on a shared machine matters less)
and the ratios latency/passthrough and latency/columns. Each batch's trace ids are unique, so every sampled trace is
analysed once. The metrics are handed to a no-op consumer.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from payloads import SPANS_PER_REQUEST, make_payloads

from agent.component import Capabilities, Kind
from agent.connectors.latency import LatencyConfig, LatencyConnector
from agent.pdata import Batch, TraceBatch
from agent.testing import settings_for

BATCH_INTERVAL = 0.01  # clock seconds between batches
BATCHES_PER_TICK = 10  # the timer's period, in batches


class NullConsumer:
    """Accepts and forgets (the cheapest possible next hop)."""

    capabilities = Capabilities()

    async def consume(self, batch: Batch) -> None:
        return None


class StepClock:
    """A monotonic clock the benchmark moves as batches arrive."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


async def passthrough(payloads: list[bytes]) -> float:
    sink = NullConsumer()
    t0 = time.process_time()
    for data in payloads:
        await sink.consume(TraceBatch.from_bytes(data))
    return time.process_time() - t0


async def columns(payloads: list[bytes]) -> float:
    sink = NullConsumer()
    t0 = time.process_time()
    for data in payloads:
        batch = TraceBatch.from_bytes(data)
        batch.columns  # noqa: B018 - the extraction is what is measured
        await sink.consume(batch)
    return time.process_time() - t0


async def latency(payloads: list[bytes], merge: int,
                  sample_rate: float | None) -> tuple[float, float, float]:
    """Seconds in total, in ``consume`` and in ``tick``/``shutdown`` (trace analysis)."""
    clock = StepClock()
    config = LatencyConfig(window=1.0, decision_wait=0.3, root_timeout=1.0)
    if sample_rate is not None:
        config.trace_sample_rate = sample_rate
    ticks_every = max(1, BATCHES_PER_TICK // merge)
    conn = LatencyConnector(settings_for("latency", Kind.CONNECTOR), config, NullConsumer(),
                            clock=clock)
    in_consume = in_tick = 0.0
    t0 = time.process_time()
    for i, data in enumerate(payloads, 1):
        t1 = time.process_time()
        await conn.consume(TraceBatch.from_bytes(data))
        t2 = time.process_time()
        in_consume += t2 - t1
        clock.t = i * merge * BATCH_INTERVAL
        if i % ticks_every == 0:
            await conn.tick()
            in_tick += time.process_time() - t2
    t2 = time.process_time()
    await conn.shutdown()
    in_tick += time.process_time() - t2
    return time.process_time() - t0, in_consume, in_tick


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=400, help="requests of 512 spans")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--merge", type=int, default=1, help="requests per batch")
    ap.add_argument("--sample-rate", type=float, default=None,
                    help="trace_sample_rate (default: the connector's default)")
    args = ap.parse_args()
    requests = make_payloads(args.batches)
    # Repeated protobuf fields concatenate: joined requests decode as one.
    payloads = [b"".join(requests[i:i + args.merge])
                for i in range(0, len(requests), args.merge)]
    spans = args.batches * SPANS_PER_REQUEST
    best = {"passthrough": float("inf"), "columns": float("inf"), "latency": float("inf")}
    split = (0.0, 0.0)
    for _ in range(args.rounds):  # interleaved, so drift on a shared machine hits all
        best["passthrough"] = min(best["passthrough"], await passthrough(payloads))
        best["columns"] = min(best["columns"], await columns(payloads))
        total, in_consume, in_tick = await latency(payloads, args.merge, args.sample_rate)
        if total < best["latency"]:
            best["latency"], split = total, (in_consume, in_tick)
    rate = {k: spans / v for k, v in best.items()}
    print(f"{spans} spans in {len(payloads)} batches of {args.merge} x {SPANS_PER_REQUEST}, "
          f"best of {args.rounds}")
    for k, v in rate.items():
        print(f"  {k:<12} {v:>12,.0f} spans/s")
    print(f"  latency time: consume {split[0]:.3f} s (decode included), "
          f"trace analysis + windows {split[1]:.3f} s")
    print(f"  ratio latency/passthrough {rate['latency'] / rate['passthrough']:.2f}")
    print(f"  ratio latency/columns     {rate['latency'] / rate['columns']:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
