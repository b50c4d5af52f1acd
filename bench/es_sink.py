"""A counting Elasticsearch bulk sink in its own process, for benchmarks.

    python bench/es_sink.py --port 19200

Accepts every document of every ``/_bulk`` request (``created``), counts documents and
bytes (on the wire and decompressed); on SIGTERM prints
{"spans": N, "wire_bytes": W, "body_bytes": B, "requests": R} and exits. The strict
contract server that tests use is tests/es_contract.py; this one only keeps up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

from aiohttp import web

PRODUCT = {"X-Elastic-Product": "Elasticsearch"}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    a = ap.parse_args()
    stats = {"spans": 0, "wire_bytes": 0, "body_bytes": 0, "requests": 0}

    async def bulk(request: web.Request) -> web.Response:
        # aiohttp has already undone Content-Encoding; Content-Length is the wire size.
        body = await request.read()
        docs = body.count(b"\n") // 2
        stats["requests"] += 1
        stats["spans"] += docs
        stats["wire_bytes"] += request.content_length or len(body)
        stats["body_bytes"] += len(body)
        items = [{"create": {"status": 201, "result": "created"}}] * docs
        return web.json_response({"took": 1, "errors": False, "items": items}, headers=PRODUCT)

    async def info(_: web.Request) -> web.Response:
        return web.json_response({"version": {"number": "8.13.0"}, "tagline": "You Know, for Search"},
                                 headers=PRODUCT)

    app = web.Application(client_max_size=256 << 20)
    for method in ("POST", "PUT"):
        app.router.add_route(method, "/_bulk", bulk)
        app.router.add_route(method, "/{index}/_bulk", bulk)
    app.router.add_get("/", info)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", a.port).start()
    print(json.dumps({"listening": a.port}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await runner.cleanup()
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
