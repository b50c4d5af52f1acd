"""Load generator: sends pre-serialised OTLP trace requests over gRPC, counts acknowledged spans.

    python bench/loadgen.py --target 127.0.0.1:4317 --duration 20 --concurrency 8

Prints one JSON line: {"sent_requests", "acked_spans", "refused", "errors", "seconds"}.
Runs in its own process so the agent is measured with a real sender beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).parent))
from payloads import SPANS_PER_REQUEST, make_payloads

METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


async def run(target: str, duration: float, concurrency: int, payloads: list[bytes],
              spans_per_request: int) -> dict[str, float]:
    stats = {"sent_requests": 0, "acked_spans": 0, "refused": 0, "errors": 0}
    async with grpc.aio.insecure_channel(target, options=[
            ("grpc.max_send_message_length", 64 << 20)]) as ch:
        call = ch.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
        await asyncio.wait_for(ch.channel_ready(), 30)
        start = time.perf_counter()
        end = start + duration

        async def worker(k: int) -> None:
            i = k
            while time.perf_counter() < end:
                p = payloads[i % len(payloads)]
                i += concurrency
                stats["sent_requests"] += 1
                try:
                    await call(p, timeout=30)
                    stats["acked_spans"] += spans_per_request
                except grpc.aio.AioRpcError as e:
                    if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
                        stats["refused"] += 1
                        await asyncio.sleep(0.05)
                    else:
                        stats["errors"] += 1

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        stats["seconds"] = time.perf_counter() - start
    return stats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="127.0.0.1:4317")
    ap.add_argument("--duration", type=float, default=20)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--predictions", action="store_true")
    ap.add_argument("--features", type=int, default=0)
    a = ap.parse_args()
    payloads = make_payloads(16, predictions=a.predictions, features=a.features)
    print(json.dumps(asyncio.run(run(a.target, a.duration, a.concurrency, payloads,
                                     SPANS_PER_REQUEST))), flush=True)


if __name__ == "__main__":
    main()
