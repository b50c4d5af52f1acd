"""A flaky OTLP trace backend for delivery tests: it fails, stalls and goes away on cue.

``FlakyUpstream`` serves OTLP/gRPC (``opentelemetry.proto.collector.trace.v1.
TraceService/Export``, a ``grpc.aio`` generic handler that takes the raw request bytes)
on ``endpoint`` and OTLP/HTTP protobuf (``POST /v1/traces``) on ``http_endpoint``,
both on 127.0.0.1 and sharing one behaviour and one set of counts. It runs on an
event loop in a thread of its own, so that a synchronous test (or the SDK in the
test's thread) can drive it, and its behaviour is set by attributes:

- down / up: ``stop()`` closes the listeners (callers get connection refused, as from
  a backend that is not running); ``start()`` listens again on the same ports;
- ``fail_before``: the fraction of requests answered with an error *before* storing
  anything (a correct sender retries them: no duplicates);
- ``fail_after``: the fraction of requests stored and *then* answered with an error
  (the acknowledgement "was lost": each retry of them is a legitimate duplicate);
- ``codes``: the error codes drawn from for those answers: ``UNAVAILABLE`` (HTTP 503)
  or ``RESOURCE_EXHAUSTED`` (HTTP 429; OTLP lets a gRPC sender retry it only with
  ``RetryInfo``); ``retry_after`` (seconds, or None) goes with each answer as
  ``google.rpc.RetryInfo`` / ``Retry-After`` (whole seconds, rounded down);
- ``spans_per_second``: a throughput limit, requests are taken one at a time and
  each takes ``spans / spans_per_second`` seconds before it is stored;
  ``max_pending``: with a limit, requests that find this many already waiting are
  shed, answered ``RESOURCE_EXHAUSTED`` / 429 before storing, as an overloaded
  collector does.

Decisions come from ``random.Random(seed)``, one draw per request. It counts what it
stored: ``unique`` span ids, ``total_spans`` (with duplicates), and the duplicates the
at-least-once contract allows: ``duplicate_allowance`` = the spans of requests it
stored but answered with an error, plus those it stored after a gRPC caller's
deadline had passed (the caller saw a timeout, and resends them; HTTP carries no
deadline, so a late HTTP store goes unnoticed).

Also runnable alone (``python -m tests.flaky_upstream --port 4317 --fail-before 0.3``):
it prints its endpoints as one JSON line, serves until SIGINT/SIGTERM, then prints
its counts as another.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import random
import signal
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import grpc
from aiohttp import web
from google.protobuf.any_pb2 import Any as AnyMessage
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.conftest import free_port

SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
# An empty ExportTraceServiceResponse: full success.
OK_RESPONSE = b""
GZIP_MAGIC = b"\x1f\x8b"
# The HTTP answers that OTLP/HTTP pairs with the gRPC codes used here.
HTTP_STATUS = {grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.RESOURCE_EXHAUSTED: 429}


def span_ids(request: bytes) -> list[bytes]:
    """The span ids in a serialised ``ExportTraceServiceRequest``, in order."""
    req = ExportTraceServiceRequest.FromString(request)
    return [s.span_id for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]


def retry_info_metadata(code: grpc.StatusCode, message: str,
                        retry_after: float | None) -> tuple[tuple[str, bytes], ...]:
    """Trailing metadata carrying ``RetryInfo`` the way OTLP senders read it.

    ``grpc-status-details-bin`` (a ``google.rpc.Status`` with the ``RetryInfo`` packed)
    is what collectors and the agent's exporter read; the Python SDK reads a bare
    ``RetryInfo`` from ``google.rpc.retryinfo-bin``.
    """
    if retry_after is None:
        return ()
    info = error_details_pb2.RetryInfo()
    info.retry_delay.FromNanoseconds(int(retry_after * 1e9))
    packed = AnyMessage()
    packed.Pack(info)
    status = status_pb2.Status(code=code.value[0], message=message, details=[packed])
    return (("grpc-status-details-bin", status.SerializeToString()),
            ("google.rpc.retryinfo-bin", info.SerializeToString()))


class FlakyUpstream:
    """An OTLP trace server (gRPC and HTTP) with scripted faults, counting what it stored.

    Created down; ``start()`` brings it up. Ports left None are picked free once and
    kept across restarts. Thread-safe: the counters may be read from any thread
    while it serves. The behaviour attributes (``fail_before``, ``fail_after``,
    ``codes``, ``retry_after``, ``spans_per_second``, ``max_pending``) may be changed
    at any time; they apply from the next request. ``close()`` stops the servers and
    the thread (also at the end of a ``with`` block).
    """

    def __init__(self, port: int | None = None, *, http_port: int | None = None,
                 seed: int = 0, fail_before: float = 0.0, fail_after: float = 0.0,
                 codes: Iterable[grpc.StatusCode] = (grpc.StatusCode.UNAVAILABLE,),
                 retry_after: float | None = 0.02,
                 spans_per_second: float | None = None,
                 max_pending: int | None = None) -> None:
        self.port = port if port is not None else free_port()
        self.http_port = http_port if http_port is not None else free_port()
        self.fail_before = fail_before
        self.fail_after = fail_after
        self.codes = tuple(codes)
        self.retry_after = retry_after
        self.spans_per_second = spans_per_second
        self.max_pending = max_pending
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._unique: set[bytes] = set()
        self.total_spans = 0
        self.requests = 0
        self.failed_before = 0  # requests answered with an error, nothing stored
        self.failed_after = 0  # requests stored, then answered with an error
        self.failed_after_spans = 0
        self.late_spans = 0  # stored after the caller's deadline
        self.shed = 0  # requests refused for being over max_pending
        self._pending = 0  # requests waiting for the throughput limit (server loop only)
        self._servers: tuple[grpc.aio.Server, web.AppRunner] | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        name=f"flaky-upstream-{self.port}", daemon=True)
        self._thread.start()
        # Serialises requests under a throughput limit (bound to the loop on first use).
        self._throttle = asyncio.Lock()

    # ------------------------------------------------------------------ control

    @property
    def endpoint(self) -> str:
        """The OTLP/gRPC address, ``host:port`` (the otlp exporter's ``endpoint``)."""
        return f"127.0.0.1:{self.port}"

    @property
    def http_endpoint(self) -> str:
        """The OTLP/HTTP base URL (the exporter posts to ``/v1/traces`` under it)."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def up(self) -> bool:
        """Whether it is listening."""
        return self._servers is not None

    def start(self) -> FlakyUpstream:
        """Listen on both endpoints (the same ports every time); no-op when already up."""
        if self._servers is None:
            self._servers = self._run(self._serve())
        return self

    def stop(self) -> None:
        """Close the listeners and cancel the requests in flight; the counts are kept."""
        servers, self._servers = self._servers, None
        if servers is not None:
            self._run(self._close(servers))

    def close(self) -> None:
        """Stop serving and end the thread. Idempotent."""
        if self._loop.is_closed():
            return
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> FlakyUpstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ what it stored

    @property
    def unique(self) -> set[bytes]:
        """The distinct span ids stored so far (a copy)."""
        with self._lock:
            return set(self._unique)

    @property
    def duplicates(self) -> int:
        """Spans stored more than once (total minus distinct)."""
        with self._lock:
            return self.total_spans - len(self._unique)

    @property
    def duplicate_allowance(self) -> int:
        """The duplicates at-least-once delivery may produce from what happened here."""
        with self._lock:
            return self.failed_after_spans + self.late_spans

    def missing(self, ids: set[bytes]) -> set[bytes]:
        """Those of ``ids`` not stored yet."""
        with self._lock:
            return ids - self._unique

    def wait_for(self, ids: set[bytes], timeout: float) -> set[bytes]:
        """Wait until every id of ``ids`` is stored or ``timeout`` passes; return the missing."""
        end = time.monotonic() + timeout
        while (missing := self.missing(ids)) and time.monotonic() < end:
            time.sleep(0.05)
        return missing

    def stats(self) -> dict[str, int]:
        """The counters, as a JSON-ready dict."""
        with self._lock:
            return {"requests": self.requests, "unique_spans": len(self._unique),
                    "total_spans": self.total_spans, "failed_before": self.failed_before,
                    "failed_after": self.failed_after,
                    "failed_after_spans": self.failed_after_spans,
                    "late_spans": self.late_spans, "shed": self.shed}

    # ------------------------------------------------------------------ server side

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    async def _serve(self) -> tuple[grpc.aio.Server, web.AppRunner]:
        # No SO_REUSEPORT (gRPC's default): a second server on the port must fail,
        # not silently share the traffic of a test running beside this one.
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0),
                                          ("grpc.max_receive_message_length", 64 << 20)])
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {
            "Export": grpc.unary_unary_rpc_method_handler(self._grpc_export)})])
        self.port = server.add_insecure_port(self.endpoint)  # port 0 resolved, then kept
        await server.start()
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/traces", self._http_export)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", self.http_port).start()
        except OSError:  # port taken meanwhile: do not leave the gRPC half serving
            await self._close((server, runner))
            raise
        self.http_port = runner.addresses[0][1]
        return server, runner

    @staticmethod
    async def _close(servers: tuple[grpc.aio.Server, web.AppRunner]) -> None:
        server, runner = servers
        await server.stop(None)
        await runner.cleanup()

    async def _grpc_export(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        def expired() -> bool:
            remaining = context.time_remaining()
            return remaining is not None and remaining <= 0

        try:
            await self._receive(request, expired)
        except _Failure as f:
            await context.abort(f.code, f.message, trailing_metadata=retry_info_metadata(
                f.code, f.message, self.retry_after))
        return OK_RESPONSE

    async def _http_export(self, request: web.Request) -> web.Response:
        body = await request.read()
        if body[:2] == GZIP_MAGIC:  # Content-Encoding: gzip, not undone by aiohttp
            body = gzip.decompress(body)
        try:
            # No deadline in HTTP: a store is never known to be late.
            await self._receive(body, lambda: False)
        except _Failure as f:
            headers = {} if self.retry_after is None else {
                # Whole seconds only; rounded down so that tests can retry at once.
                "Retry-After": str(int(self.retry_after))}
            return web.Response(status=HTTP_STATUS[f.code], text=f.message, headers=headers)
        return web.Response(body=OK_RESPONSE, content_type="application/x-protobuf")

    async def _receive(self, request: bytes, expired: Callable[[], bool]) -> None:
        """Apply the scripted behaviour to one request: store it, fail it, or both.

        Raises ``_Failure`` with the answer to give when the request is to fail;
        ``expired()`` says whether the caller's deadline has passed.
        """
        with self._lock:
            self.requests += 1
            draw = self._rng.random()
            code = self._rng.choice(self.codes)
        ids = span_ids(request)
        if draw < self.fail_before:
            with self._lock:
                self.failed_before += 1
            raise _Failure(code, "flaky upstream: failing before storing")
        rate = self.spans_per_second  # once: a test may lift the limit meanwhile
        if rate:
            if self.max_pending is not None and self._pending >= self.max_pending:
                with self._lock:
                    self.shed += 1
                raise _Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, "flaky upstream: overloaded")
            self._pending += 1
            try:
                async with self._throttle:  # one at a time: the rate is the server's
                    await asyncio.sleep(len(ids) / rate)
            finally:
                self._pending -= 1
        late = expired()
        with self._lock:
            self._unique.update(ids)
            self.total_spans += len(ids)
            if late:
                self.late_spans += len(ids)
            fail_after = draw < self.fail_before + self.fail_after
            if fail_after:
                self.failed_after += 1
                self.failed_after_spans += len(ids)
        if fail_after:
            raise _Failure(code, "flaky upstream: failing after storing")


class _Failure(Exception):
    """The error answer to give to one request (``code`` in gRPC terms)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--port", type=int, default=None, help="OTLP/gRPC port (default: any)")
    ap.add_argument("--http-port", type=int, default=None, help="OTLP/HTTP port (default: any)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fail-before", type=float, default=0.0)
    ap.add_argument("--fail-after", type=float, default=0.0)
    ap.add_argument("--code", action="append", choices=["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
                    help="error code to answer with (repeatable; default UNAVAILABLE)")
    ap.add_argument("--retry-after", type=float, default=0.02,
                    help="RetryInfo delay in seconds sent with errors; negative: none")
    ap.add_argument("--spans-per-second", type=float, default=None)
    ap.add_argument("--max-pending", type=int, default=None)
    a = ap.parse_args()
    codes = [grpc.StatusCode[c] for c in a.code or ["UNAVAILABLE"]]
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    with FlakyUpstream(a.port, http_port=a.http_port, seed=a.seed, fail_before=a.fail_before,
                       fail_after=a.fail_after, codes=codes,
                       retry_after=a.retry_after if a.retry_after >= 0 else None,
                       spans_per_second=a.spans_per_second,
                       max_pending=a.max_pending) as upstream:
        upstream.start()
        print(json.dumps({"grpc": upstream.endpoint, "http": upstream.http_endpoint}),
              flush=True)
        done.wait()
        print(json.dumps(upstream.stats()), flush=True)


if __name__ == "__main__":
    main()
