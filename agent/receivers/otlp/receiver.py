"""The ``otlp`` receiver: OTLP/gRPC and OTLP/HTTP in, batches to the pipelines out.

Both transports share one path (``OtlpReceiver.export``): a decoded request becomes a
batch, is handed to the consumer of its signal, and the consumer's verdict becomes the
answer the OTLP specification prescribes, so that SDKs and collectors retry exactly
what is worth retrying:

============================  ==========================  ===============================
outcome of ``consume``        HTTP                        gRPC
============================  ==========================  ===============================
returns                       200, empty response         OK, empty response
``PermanentError``            200 with partial_success    OK with partial_success
``RetryableError``            503 + ``Retry-After``       UNAVAILABLE + ``RetryInfo``
  (``http_status = 429``)     429 + ``Retry-After``       RESOURCE_EXHAUSTED + ``RetryInfo``
any other exception           500                         INTERNAL
no pipeline for the signal    404                         UNIMPLEMENTED
============================  ==========================  ===============================

Bad input never reaches a consumer: it is answered 400 / INVALID_ARGUMENT (413 when
too large, 415 for a content type or encoding we do not speak) and counted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from google.protobuf.message import DecodeError, Message
from google.rpc import code_pb2

from agent.component import Consumer, Host, PermanentError, RetryableError, Settings, Signal
from agent.otlpjson import decode_json
from agent.pdata import BATCH_TYPES, Batch
from agent.receivers.otlp.common import DEFAULT_RETRY_AFTER, Refusal, is_loopback, response_for
from agent.receivers.otlp.config import OtlpReceiverConfig
from agent.receivers.otlp.grpc_server import GrpcServer
from agent.receivers.otlp.http_server import HttpServer


class OtlpReceiver:
    """Listens for OTLP on gRPC and/or HTTP and hands each request to its signal's consumer.

    ``next`` holds only the signals some pipeline wires to this receiver; requests for
    another signal are answered "not found". ``start`` binds both listeners (raising
    ``OSError`` with the endpoint and reason when it cannot); ``shutdown`` stops
    intake and leaves requests in flight ``shutdown_grace`` seconds to finish.
    """

    def __init__(self, settings: Settings, config: OtlpReceiverConfig,
                 next: Mapping[Signal, Consumer]) -> None:
        self.settings = settings
        self.config = config
        self.next = dict(next)
        self.telemetry = settings.telemetry
        self._refused_requests = settings.telemetry.counter(
            "mlagent_agent_receiver_refused_requests",
            "Requests a receiver answered with an error, by transport and reason.",
            ("transport", "signal", "reason"))
        self.grpc = GrpcServer(self, config.grpc) if config.grpc.enabled else None
        self.http = HttpServer(self, config.http) if config.http.enabled else None
        self._servers: list[GrpcServer | HttpServer] = [
            server for server in (self.grpc, self.http) if server is not None]
        self._started = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self, host: Host) -> None:
        try:
            for server in self._servers:
                await server.start()
        except BaseException:
            await self._close(grace=0.0)
            raise
        self._started = True
        listeners = [(name, server) for name, server in (("grpc", self.grpc), ("http", self.http))
                     if server is not None]
        self.telemetry.info(
            "listening: " + ", ".join(f"{name} on {server.endpoint}{_security(server)}"
                                      for name, server in listeners),
            grpc=self.grpc.endpoint if self.grpc else None,
            http=self.http.endpoint if self.http else None)
        for name, server in listeners:
            if not server.config.tls.enabled and not is_loopback(server.endpoint):
                self.telemetry.warn(
                    "listening without TLS", name, endpoint=server.endpoint,
                    hint=f"data arrives unencrypted and anyone who reaches this address can "
                         f"send; set {name}.tls.cert_file and {name}.tls.key_file")

    async def shutdown(self) -> None:
        """Stop intake, and return without waiting for the requests in flight.

        Those are waiting on the pipeline's components (a batch processor acknowledges
        only once it has flushed), which the graph stops after the receivers: waiting
        for them here would hold up the very shutdown that completes them. They finish
        as the pipeline drains, or are cancelled ``shutdown_grace`` seconds from now;
        ``wait_closed`` waits for that.
        """
        if not self._started:
            return
        self._started = False
        for server in self._servers:
            await server.stop_accepting(self.config.shutdown_grace)

    async def wait_closed(self) -> None:
        """Wait until the requests in flight at shutdown are done and the servers closed."""
        await asyncio.gather(*(server.wait_closed() for server in self._servers))

    async def _close(self, grace: float) -> None:
        for server in self._servers:
            await server.stop_accepting(grace)
        await self.wait_closed()

    # ------------------------------------------------------------------ the shared path

    async def decode(self, transport: str, signal: Signal, data: bytes,
                     json: bool = False) -> Batch:
        """Parse a request body into a batch, or refuse it as bad input."""
        try:
            if json:
                # JSON is parsed in Python (~50x slower than upb's protobuf parser): a
                # thread keeps the event loop turning meanwhile (the GIL is handed
                # back every few ms), so one large JSON request does not stall the rest.
                return BATCH_TYPES[signal](await asyncio.to_thread(decode_json, signal, data))
            return BATCH_TYPES[signal].from_bytes(data)
        except (DecodeError, ValueError) as e:
            message = str(e) if json else f"cannot decode OTLP protobuf: {e}"
            raise self.refuse(transport, signal, "decode_error", 0, code_pb2.INVALID_ARGUMENT,
                              message) from None

    async def export(self, transport: str, batch: Batch) -> Message:
        """Hand ``batch`` to its signal's consumer; return the response or raise ``Refusal``."""
        signal = batch.signal
        n = batch.item_count
        consumer = self.next.get(signal)
        if consumer is None:
            raise self.refuse(transport, signal, "no_pipeline", n, code_pb2.UNIMPLEMENTED,
                              f"{self.settings.id}: no {signal} pipeline uses this receiver")
        try:
            await consumer.consume(batch)
        except RetryableError as e:
            code = (code_pb2.RESOURCE_EXHAUSTED if getattr(e, "http_status", None) == 429
                    else code_pb2.UNAVAILABLE)
            retry_after = e.retry_after if e.retry_after is not None else DEFAULT_RETRY_AFTER
            raise self.refuse(transport, signal, "retryable", n, code, str(e) or "try again later",
                              error=e, retry_after=retry_after) from None
        except PermanentError as e:
            rejected = n if e.rejected is None else max(0, min(e.rejected, n))
            self.count_refused(transport, signal, "permanent", rejected, e)
            if n - rejected:
                self.telemetry.accepted(signal, n - rejected)
            # Partial success: still a success to the client, which must not retry it.
            return response_for(signal, rejected, str(e) or "rejected")
        except asyncio.CancelledError as e:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise  # this request's own handler is cancelled (client gone, grace over)
            # A cancellation from further down (a flush cut by the drain deadline) that
            # is not ours: the data was not taken, so the sender must hear "retry".
            raise self.refuse(transport, signal, "retryable", n, code_pb2.UNAVAILABLE,
                              "agent is shutting down", error=e,
                              retry_after=DEFAULT_RETRY_AFTER) from None
        except Exception as e:
            self.telemetry.error("consumer failed unexpectedly", signal=str(signal),
                                 error=f"{type(e).__name__}: {e}")
            raise self.refuse(transport, signal, "internal", n, code_pb2.INTERNAL,
                              "internal error; the data was not accepted", error=e) from None
        self.telemetry.accepted(signal, n)
        return response_for(signal)

    def busy(self, transport: str, signal: Signal, limit: int) -> Refusal:
        """The refusal of a request over a listener's ``max_concurrent_requests``."""
        return self.refuse(transport, signal, "too_many_requests", 0, code_pb2.UNAVAILABLE,
                           f"over {limit} concurrent requests; retry later",
                           retry_after=DEFAULT_RETRY_AFTER)

    def refuse(self, transport: str, signal: Signal | None, reason: str, items: int, code: int,
               message: str, *, error: object = None, retry_after: float | None = None
               ) -> Refusal:
        """Count one refused request (and its items, when known); return what to raise."""
        self.count_refused(transport, signal, reason, items, error or message)
        return Refusal(code, message, retry_after)

    def count_refused(self, transport: str, signal: Signal | None, reason: str, items: int,
                      error: object) -> None:
        """One refused request: the request counter, and the item counter with its
        rate-limited log line (a warning alone when the signal is unknown)."""
        self._refused_requests.labels(transport, str(signal or ""), reason).inc()
        if signal is not None:
            self.telemetry.refused(signal, items, reason, error)
        else:
            self.telemetry.warn("refused", reason, transport=transport, error=error)


def _security(server: GrpcServer | HttpServer) -> str:
    """`` (TLS)`` / `` (mutual TLS)`` after a listener's endpoint; nothing for plaintext."""
    tls = server.config.tls
    if not tls.enabled:
        return ""
    return " (mutual TLS)" if tls.client_ca_file is not None else " (TLS)"
