"""Enrich processor throughput: decode + enrich + encode vs decode + encode, in one run.

    python bench/bench_enrich.py [--seconds 2] [--rounds 5]

Payloads are ``bench/payloads.py``'s realistic requests (512 spans of ~250 bytes with
6 attributes, 4 resources with ``process.pid``). The processor runs with everything
on: host identity, model versions (two services from ``model_versions``, one from a
manifest file, one falling back to ``unknown``), and a hardware snapshot in which the
senders' pids hold memory on GPUs, so every resource gets GPU attributes.

Rounds alternate off/on so both see the same machine load; the best round of each is
reported (this 2-core machine is shared and noisy) with the ratio on/off (target ≥ 0.9).
The snapshot does not change during the run; in the agent it changes every host
``interval``, and each resource's enrichment is then worked out again once.
A second "on" figure uses payloads whose spans carry ``ml.model.version`` themselves on
half of the spans, the case where the version fallback has to be written per span.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from payloads import make_request

from agent.component import Capabilities, Signal
from agent.hardware import GpuReading, HardwareSnapshot, HostReading
from agent.pdata import Batch, TraceBatch
from agent.processors.enrich import EnrichConfig, factory
from agent.testing import make_host, settings_for


class EncodingSink:
    """The next consumer: encodes the batch as an exporter would, and counts spans."""

    capabilities = Capabilities()

    def __init__(self) -> None:
        self.last: Batch | None = None

    async def consume(self, batch: Batch) -> None:
        batch.to_bytes()
        self.last = batch


def payloads(n: int, versioned_spans: bool) -> list[bytes]:
    out = []
    for i in range(n):
        req = make_request(i)
        if versioned_spans:
            for rs in req.resource_spans:
                for j, s in enumerate(rs.scope_spans[0].spans):
                    if j % 2 == 0:
                        s.attributes.add(key="ml.model.version").value.string_value = "v7"
        out.append(req.SerializeToString())
    return out


async def measure(data: list[bytes], step: Callable[[TraceBatch], Awaitable[None]],
                  seconds: float) -> float:
    """Spans per second through ``step`` over ``seconds``, cycling over ``data``."""
    spans, i = 0, 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for _ in range(16):
            batch = TraceBatch.from_bytes(data[i % len(data)])
            await step(batch)
            spans += batch.item_count
            i += 1
    return spans / (time.perf_counter() - start)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=2.0, help="per round and variant")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "models.json"
        manifest.write_text(json.dumps({"services": {"svc-2": {"ml.model.version": "v4"}}}))
        host = make_host(tmp)
        HardwareSnapshot.of(host).publish(HostReading(
            time.time_ns(), 0.35, 0.52,
            (GpuReading(0, "GPU-0", "H100", utilization=0.7, memory_used=40 * 2**30,
                        processes={4000: 20 * 2**30, 4001: 10 * 2**30}),
             GpuReading(1, "GPU-1", "H100", utilization=0.4, memory_used=30 * 2**30,
                        processes={4002: 20 * 2**30, 4003: 9 * 2**30}))))
        sink = EncodingSink()
        proc = factory.create(settings_for("enrich"), EnrichConfig(
            model_versions={"svc-0": "v3", "svc-1": "v2"}, manifest=manifest),
            {Signal.TRACES: sink})
        await proc.start(host)

        async def off(batch: TraceBatch) -> None:
            await sink.consume(batch)

        plain, versioned = payloads(16, False), payloads(16, True)
        best = {"off": 0.0, "on": 0.0, "on, versions on half the spans": 0.0}
        try:
            for _ in range(args.rounds):
                best["off"] = max(best["off"], await measure(plain, off, args.seconds))
                best["on"] = max(best["on"], await measure(plain, proc.consume, args.seconds))
                best["on, versions on half the spans"] = max(
                    best["on, versions on half the spans"],
                    await measure(versioned, proc.consume, args.seconds))
            # The figures mean nothing unless enrichment really happened.
            last = sink.last.request.resource_spans  # type: ignore[union-attr]
            keys = {kv.key for rs in last for kv in rs.resource.attributes}
            assert {"host.name", "ml.model.version", "gpu.utilization"} <= keys, keys
        finally:
            await proc.shutdown()

    for name, rate in best.items():
        print(f"enrich {name:<32} {rate:>12,.0f} spans/s   ratio {rate / best['off']:.3f}")


if __name__ == "__main__":
    asyncio.run(main())
