"""OTLP/gRPC: the three ``Export`` services on a ``grpc.aio`` server.

The services are registered as generic handlers whose request deserializer keeps the
raw bytes, so that a request that does not parse is counted and answered
INVALID_ARGUMENT with the reason, instead of failing inside gRPC where we cannot see it.
gzip-compressed requests are decompressed by gRPC itself; ``max_request_size`` is its
max receive message length, which gRPC checks on the decompressed message.

With ``tls`` set the port is a secure one: gRPC core does the handshakes (TLS 1.2 or
1.3, its own fixed bounds) and, with ``client_ca_file``, requires and verifies client
certificates; the files are read and checked beforehand so that a bad one fails
start-up with its name rather than gRPC's bare "Failed to bind".
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from agent.component import Signal
from agent.receivers.otlp.common import Refusal, bind_error, load_server_tls, why_bind_fails
from agent.receivers.otlp.config import GrpcConfig

if TYPE_CHECKING:
    from agent.receivers.otlp.receiver import OtlpReceiver

SERVICES: dict[Signal, str] = {
    Signal.TRACES: trace_service_pb2.DESCRIPTOR.services_by_name["TraceService"].full_name,
    Signal.METRICS: metrics_service_pb2.DESCRIPTOR.services_by_name["MetricsService"].full_name,
    Signal.LOGS: logs_service_pb2.DESCRIPTOR.services_by_name["LogsService"].full_name,
}

# google.rpc.Code number -> grpc.StatusCode (the two enumerations share their numbers).
_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


class GrpcServer:
    """The gRPC listener of one ``otlp`` receiver."""

    def __init__(self, receiver: OtlpReceiver, config: GrpcConfig) -> None:
        self.receiver = receiver
        self.config = config
        # The configured endpoint until bound, then the bound one (port 0 resolved).
        self.endpoint = config.endpoint
        self._server: grpc.aio.Server | None = None
        self._closing: asyncio.Task[None] | None = None
        self._in_flight = 0

    async def start(self) -> None:
        credentials = await self._credentials()
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", self.config.max_request_size),
            # gRPC sets SO_REUSEPORT by default, which lets a second agent (or anything
            # else) bind the same port and silently share its traffic. Fail instead.
            ("grpc.so_reuseport", 0),
        ])
        server.add_generic_rpc_handlers([
            grpc.method_handlers_generic_handler(service, {"Export": self._method(signal)})
            for signal, service in SERVICES.items()
        ])
        try:
            if credentials is None:
                port = server.add_insecure_port(self.config.endpoint)
            else:
                port = server.add_secure_port(self.config.endpoint, credentials)
        except RuntimeError:
            await server.stop(None)
            raise bind_error(self.config.endpoint, why_bind_fails(self.config.endpoint)) from None
        self.endpoint = f"{self.config.endpoint.rsplit(':', 1)[0]}:{port}"
        await server.start()
        self._server = server

    async def _credentials(self) -> grpc.ServerCredentials | None:
        """The server credentials of ``tls``; None for plaintext."""
        tls = self.config.tls
        if not tls.enabled:
            return None
        files = await asyncio.to_thread(load_server_tls, f"grpc on {self.config.endpoint}", tls)
        return grpc.ssl_server_credentials(
            [(files.private_key, files.certificate_chain)],
            root_certificates=files.client_ca,
            require_client_auth=files.client_ca is not None)

    async def stop_accepting(self, grace: float) -> None:
        """Refuse new calls from now on; calls in flight get ``grace`` seconds to finish
        before they are cancelled (``wait_closed`` returns then)."""
        server, self._server = self._server, None
        if server is not None:
            self._closing = asyncio.create_task(server.stop(grace), name="otlp-grpc-stop")
            # grpc.aio stops taking calls and closes the listener in the first step of
            # stop(), before its first await: one turn of the loop is enough.
            await asyncio.sleep(0)

    async def wait_closed(self) -> None:
        if self._closing is not None:
            await self._closing

    def _method(self, signal: Signal) -> grpc.RpcMethodHandler:
        async def export(request: bytes, context: grpc.aio.ServicerContext) -> Message:
            limit = self.config.max_concurrent_requests
            try:
                if self._in_flight >= limit:
                    raise self.receiver.busy("grpc", signal, limit)
                self._in_flight += 1
                try:
                    batch = await self.receiver.decode("grpc", signal, request)
                    return await self.receiver.export("grpc", batch)
                finally:
                    self._in_flight -= 1
            except Refusal as refusal:
                await context.abort(_STATUS_CODES[refusal.code], refusal.message,
                                    trailing_metadata=_error_details(refusal))

        return grpc.unary_unary_rpc_method_handler(
            export, request_deserializer=None, response_serializer=_serialize)


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def _error_details(refusal: Refusal) -> tuple[tuple[str, Any], ...]:
    """Trailing metadata carrying a retry hint, in both forms clients read.

    ``grpc-status-details-bin`` (a ``google.rpc.Status`` with ``RetryInfo`` packed in
    its details) is the standard that the collector and the Go SDK read; the Python
    SDK reads a bare ``RetryInfo`` from ``google.rpc.retryinfo-bin`` instead.
    """
    if refusal.retry_after is None:
        return ()
    info = error_details_pb2.RetryInfo()
    info.retry_delay.FromNanoseconds(int(refusal.retry_after * 1e9))
    packed = AnyMessage()
    packed.Pack(info)
    status = status_pb2.Status(code=refusal.code, message=refusal.message, details=[packed])
    return (("grpc-status-details-bin", status.SerializeToString()),
            ("google.rpc.retryinfo-bin", info.SerializeToString()))
