"""Sending queue throughput: persistent (SQLite) vs memory queue, in one run.

    python bench/bench_queue.py [--batches 600] [--rounds 3] [--producers 8]

What one item of work is, in every mode: a producer decodes a ~512-span OTLP request
from its wire bytes (what the OTLP receiver does) and ``put``s it; a worker hands it
to ``send``, which encodes it again (what every exporter does before the network).
Between the two sits the queue under test:

- ``memory``: the in-memory queue;
- ``persistent/normal``: SQLite WAL, ``synchronous = "normal"`` (the default);
- ``persistent/full``: SQLite WAL, ``synchronous = "full"`` (fsync per group commit);
- ``persistent/off``: SQLite WAL, ``synchronous = "off"`` (no fsync at all), for scale.

Payloads are built with ``agent.testing``'s builders: 4 resources x 128 spans, 6
attributes per span (~100 KB per request). Rounds alternate the modes so that all
see the same load on this shared machine; the best round of each is reported, with
the ratio to ``memory`` (target: persistent/normal >= 0.75).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))

from agent.component import Kind
from agent.pdata import Batch, TraceBatch
from agent.queue import QueueConfig, QueuedSender, RetryConfig
from agent.testing import make_host, settings_for, span, trace_batch

SPANS = 512
SERVICES = 4


def make_payload(seed: int) -> bytes:
    """One realistic request: ``SERVICES`` resources, ``SPANS`` spans, 6 attributes each."""
    rnd = random.Random(seed)
    groups = {}
    for s in range(SERVICES):
        spans = []
        trace_id = b""
        for i in range(SPANS // SERVICES):
            if i % 8 == 0:
                trace_id = rnd.randbytes(16)
            start = 1_700_000_000_000_000_000 + rnd.randrange(10**12)
            spans.append(span(
                f"POST /v1/models/m{s}:predict" if i % 8 == 0 else f"stage-{i % 8}",
                trace_id=trace_id, span_id=rnd.randbytes(8), start=start,
                end=start + rnd.randrange(10**6, 10**9), kind=2 if i % 8 == 0 else 1,
                attributes={"http.request.method": "POST", "http.route": "/v1/models/{m}",
                            "http.response.status_code": 200, "ml.model.name": f"m{s}",
                            "ml.prediction.score": rnd.random(),
                            "net.peer.name": f"client-{rnd.randrange(50)}.internal"}))
        groups[f"svc-{s}"] = spans
    return trace_batch(groups, resource={"host.name": "inference-7",
                                         "service.version": "1.4.2"}).to_bytes()


async def run_mode(queue: QueueConfig, payloads: list[bytes], batches: int,
                   producers: int) -> float:
    """Spans per second through put -> queue -> send, for ``batches`` requests."""
    delivered = 0
    done = asyncio.Event()

    async def send(batch: Batch) -> None:
        nonlocal delivered
        batch.to_bytes()
        delivered += 1
        if delivered == batches:
            done.set()

    with tempfile.TemporaryDirectory(prefix="bench-queue-") as state:
        sender = QueuedSender(settings_for("otlp/bench", Kind.EXPORTER), queue,
                              RetryConfig(), send)
        await sender.start(make_host(state))
        todo = iter(range(batches))

        async def producer() -> None:
            for i in todo:
                await sender.put(TraceBatch.from_bytes(payloads[i % len(payloads)]))

        t0 = time.perf_counter()
        await asyncio.gather(*(producer() for _ in range(producers)))
        await done.wait()
        elapsed = time.perf_counter() - t0
        await sender.shutdown()
    return batches * SPANS / elapsed


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=600, help="requests per round and mode")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--producers", type=int, default=8, help="concurrent putters")
    ap.add_argument("--consumers", type=int, default=4, help="queue workers")
    args = ap.parse_args()

    payloads = [make_payload(i) for i in range(16)]
    modes = {
        "memory": QueueConfig(consumers=args.consumers),
        "persistent/normal": QueueConfig(persistent=True, synchronous="normal",
                                         consumers=args.consumers),
        "persistent/full": QueueConfig(persistent=True, synchronous="full",
                                       consumers=args.consumers),
        "persistent/off": QueueConfig(persistent=True, synchronous="off",
                                      consumers=args.consumers),
    }
    print(f"{args.batches} requests x {SPANS} spans (~{len(payloads[0]) // 1024} KiB each), "
          f"{args.producers} producers, {args.consumers} consumers, best of {args.rounds}")
    best = dict.fromkeys(modes, 0.0)
    for _ in range(args.rounds):
        for name, qc in modes.items():
            best[name] = max(best[name], await run_mode(qc, payloads, args.batches,
                                                        args.producers))
    base = best["memory"]
    for name, rate in best.items():
        print(f"{name:>18}: {rate:>12,.0f} spans/s   ratio to memory {rate / base:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
