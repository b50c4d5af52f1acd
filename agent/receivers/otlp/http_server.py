"""OTLP/HTTP: ``POST`` of protobuf or JSON requests on an aiohttp low-level server.

aiohttp's own body decompression is switched off: the body is read as it arrives and
gunzipped incrementally with a cap on the output, so ``max_request_size`` bounds the
*decompressed* size and a gzip bomb stops at the cap instead of expanding in memory.
Every status code is chosen here (no router), so that each refusal carries a
``google.rpc.Status`` body in the request's content type and is counted.

With ``tls`` set the site serves HTTPS with an ``ssl.SSLContext`` built from the files
at start-up (``min_version`` applies; ``client_ca_file`` makes client certificates
required). A failed handshake never becomes a request, so it is not counted here.
"""

from __future__ import annotations

import asyncio
import socket
import zlib
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.http_exceptions import PayloadEncodingError
from google.protobuf.message import Message
from google.rpc import code_pb2, status_pb2

from agent.component import Signal
from agent.config import split_endpoint
from agent.otlpjson import encode_json
from agent.receivers.otlp.common import (
    Refusal,
    bind_error,
    load_server_tls,
    os_reason,
    retry_after_seconds,
)
from agent.receivers.otlp.config import HttpConfig

if TYPE_CHECKING:
    from agent.receivers.otlp.receiver import OtlpReceiver

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
_IDENTITY = frozenset({"", "identity"})
_GZIP = frozenset({"gzip", "x-gzip"})
# zlib's window-bits value that makes it expect (only) a gzip header and trailer.
_GZIP_WBITS = 16 + zlib.MAX_WBITS

# HTTP status of each refusal code the shared path raises.
_HTTP_STATUS = {
    code_pb2.INVALID_ARGUMENT: 400,
    code_pb2.UNIMPLEMENTED: 404,
    code_pb2.RESOURCE_EXHAUSTED: 429,
    code_pb2.INTERNAL: 500,
    code_pb2.UNAVAILABLE: 503,
}


class HttpRefusal(Refusal):
    """A refusal with an HTTP-only status (404 path, 405, 413, 415)."""

    def __init__(self, http_status: int, code: int, message: str) -> None:
        super().__init__(code, message)
        self.http_status = http_status


class BodyTooLarge(Exception):
    """The request body, decompressed, is over ``max_request_size``."""


class Body:
    """A request body being received: appended chunk by chunk, gunzipped on the way.

    ``feed`` raises ``BodyTooLarge`` as soon as either the bytes received or the bytes
    they decompress to pass ``limit`` (decompression never produces more than one byte
    past it), and ``zlib.error`` for a corrupt gzip stream; ``finish`` returns the
    decoded body and raises ``zlib.error`` when the gzip stream ended early.
    """

    def __init__(self, limit: int, gzip: bool) -> None:
        self.limit = limit
        self.received = 0
        self.data = bytearray()
        self._inflate = zlib.decompressobj(_GZIP_WBITS) if gzip else None

    def feed(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.received > self.limit:
            raise BodyTooLarge
        if self._inflate is None:
            self.data += chunk
            return
        while chunk:
            if self._inflate.eof:  # RFC 1952 allows several gzip members back to back
                self._inflate = zlib.decompressobj(_GZIP_WBITS)
            self.data += self._inflate.decompress(chunk, self.limit - len(self.data) + 1)
            if len(self.data) > self.limit:
                raise BodyTooLarge
            # Input held back by the output cap, or the start of the next member.
            chunk = self._inflate.unconsumed_tail or self._inflate.unused_data

    def finish(self) -> bytes:
        if self._inflate is not None and not self._inflate.eof:
            raise zlib.error("the gzip stream is truncated")
        return bytes(self.data)


class HttpServer:
    """The HTTP listener of one ``otlp`` receiver."""

    def __init__(self, receiver: OtlpReceiver, config: HttpConfig) -> None:
        self.receiver = receiver
        self.config = config
        # The configured endpoint until bound, then the bound one (port 0 resolved).
        self.endpoint = config.endpoint
        self.paths = {config.traces_url_path: Signal.TRACES,
                      config.metrics_url_path: Signal.METRICS,
                      config.logs_url_path: Signal.LOGS}
        self._server: web.Server | None = None
        self._runner: web.ServerRunner | None = None
        self._site: web.SockSite | None = None
        self._closing: asyncio.Task[None] | None = None
        self._in_flight = 0

    async def start(self) -> None:
        ssl_context = None
        if self.config.tls.enabled:
            ssl_context = (await asyncio.to_thread(
                load_server_tls, f"http on {self.config.endpoint}", self.config.tls)).context
        sock = await self._bind()
        # auto_decompress off: ``Body`` decompresses, bounded (see the module docstring).
        self._server = web.Server(self._handle, auto_decompress=False, access_log=None)
        self._runner = web.ServerRunner(self._server)
        await self._runner.setup()
        self._site = web.SockSite(self._runner, sock, ssl_context=ssl_context)
        await self._site.start()

    async def _bind(self) -> socket.socket:
        """Bind our own socket, so that failures carry the OS reason and port 0 works."""
        host, port = split_endpoint(self.config.endpoint)
        sock = None
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family, _, _, _, address = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            # Rebinding while connections of a previous run sit in TIME_WAIT is fine;
            # this does not allow two listeners (that would be SO_REUSEPORT).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
        except OSError as e:
            if sock is not None:
                sock.close()
            raise bind_error(self.config.endpoint, os_reason(e)) from None
        self.endpoint = f"{self.config.endpoint.rsplit(':', 1)[0]}:{sock.getsockname()[1]}"
        return sock

    async def stop_accepting(self, grace: float) -> None:
        """Stop listening and close idle keep-alive connections; requests in flight get
        ``grace`` seconds to finish before they are cancelled (``wait_closed`` returns
        then), and their connections close after their response."""
        site, self._site = self._site, None
        if site is not None:
            await site.stop()
        if self._server is not None:
            self._server.pre_shutdown()
        if self._runner is not None:
            self._closing = asyncio.create_task(self._close(grace), name="otlp-http-stop")

    async def _close(self, grace: float) -> None:
        server, runner = self._server, self._runner
        self._server = self._runner = None
        if server is not None:
            await server.shutdown(grace)
        if runner is not None:
            await runner.cleanup()

    async def wait_closed(self) -> None:
        if self._closing is not None:
            await self._closing

    # ------------------------------------------------------------------ requests

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        fmt = request.content_type if request.content_type in (PROTOBUF, JSON) else None
        try:
            signal = self._route(request)
            if fmt is None:
                raise self._refuse(415, signal, "unsupported_media_type",
                                   f"unsupported Content-Type {request.content_type!r}; "
                                   f"use {PROTOBUF} or {JSON}")
            limit = self.config.max_concurrent_requests
            if self._in_flight >= limit:
                raise self.receiver.busy("http", signal, limit)
            self._in_flight += 1
            try:
                body = await self._read_body(request, signal)
                batch = await self.receiver.decode("http", signal, body, json=fmt == JSON)
                response = await self.receiver.export("http", batch)
            finally:
                self._in_flight -= 1
        except Refusal as refusal:
            return _error_response(refusal, fmt or JSON)
        return web.Response(body=_encode(response, fmt), content_type=fmt)

    def _route(self, request: web.BaseRequest) -> Signal:
        signal = self.paths.get(request.path)
        if signal is None:
            known = ", ".join(self.paths)
            raise self._refuse(404, None, "unknown_path",
                               f"no OTLP endpoint at {request.path!r}; POST to {known}",
                               code_pb2.NOT_FOUND)
        if request.method != "POST":
            raise self._refuse(405, signal, "method_not_allowed",
                               f"{request.method} is not allowed; OTLP/HTTP uses POST",
                               code_pb2.UNIMPLEMENTED)
        return signal

    async def _read_body(self, request: web.BaseRequest, signal: Signal) -> bytes:
        encoding = request.headers.get("Content-Encoding", "").strip().lower()
        if encoding not in _IDENTITY and encoding not in _GZIP:
            raise self._refuse(415, signal, "unsupported_media_type",
                               f"unsupported Content-Encoding {encoding!r}; use gzip or none")
        limit = self.config.max_request_size
        too_large = (f"request body is over max_request_size ({limit} bytes, "
                     "counted after decompression)")
        if request.content_length is not None and request.content_length > limit:
            raise self._refuse(413, signal, "too_large", too_large)
        body = Body(limit, gzip=encoding in _GZIP)
        try:
            async for chunk in request.content.iter_any():
                body.feed(chunk)
            return body.finish()
        except BodyTooLarge:
            raise self._refuse(413, signal, "too_large", too_large) from None
        except zlib.error as e:
            raise self._refuse(400, signal, "decode_error", f"invalid gzip body: {e}") from None
        except (ConnectionError, PayloadEncodingError) as e:
            # The client went away or broke the body's framing: nothing was accepted, and
            # the answer most likely reaches no one; count it instead of a traceback.
            raise self._refuse(400, signal, "incomplete_body",
                               f"request body not received in full: {e}") from None

    def _refuse(self, http_status: int, signal: Signal | None, reason: str, message: str,
                code: int = code_pb2.INVALID_ARGUMENT) -> HttpRefusal:
        """Count a request refused before decoding (its items are unknown)."""
        self.receiver.count_refused("http", signal, reason, 0, message)
        return HttpRefusal(http_status, code, message)


def _encode(message: Message, fmt: str) -> bytes:
    return encode_json(message) if fmt == JSON else message.SerializeToString()


def _error_response(refusal: Refusal, fmt: str) -> web.Response:
    """An error answer: the status, a ``google.rpc.Status`` body, retry and allow headers."""
    status = getattr(refusal, "http_status", None) or _HTTP_STATUS[refusal.code]
    headers = {}
    if refusal.retry_after is not None:
        headers["Retry-After"] = str(retry_after_seconds(refusal.retry_after))
    if status == 405:
        headers["Allow"] = "POST"
    body = status_pb2.Status(code=refusal.code, message=refusal.message)
    return web.Response(status=status, body=_encode(body, fmt), content_type=fmt,
                        headers=headers)
