"""A counting OTLP/gRPC sink in its own process: spans received (and unique span ids).

    python bench/sink.py --port 14317 [--unique]

Serves trace Export; on SIGTERM prints {"spans": N, "unique": M, "requests": R} and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

import grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

OK = ExportTraceServiceResponse().SerializeToString()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--unique", action="store_true", help="track unique span ids (slower)")
    a = ap.parse_args()
    stats = {"spans": 0, "requests": 0}
    seen: set[bytes] = set()

    async def export(data: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        req = ExportTraceServiceRequest.FromString(data)
        stats["requests"] += 1
        for rs in req.resource_spans:
            for ss in rs.scope_spans:
                stats["spans"] += len(ss.spans)
                if a.unique:
                    seen.update(s.span_id for s in ss.spans)
        return OK

    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
    handler = grpc.method_handlers_generic_handler(
        "opentelemetry.proto.collector.trace.v1.TraceService",
        {"Export": grpc.unary_unary_rpc_method_handler(export)})
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{a.port}")
    await server.start()
    print(json.dumps({"listening": a.port}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await server.stop(1)
    print(json.dumps({**stats, "unique": len(seen)}), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
