"""The ``otlp`` exporter: batches to an upstream collector or another agent over OTLP."""

from __future__ import annotations

from google.protobuf.message import Message

from agent.component import Capabilities, Host, PermanentError, Settings, Signal
from agent.exporters.otlp.config import OTLPExporterConfig
from agent.exporters.otlp.transport import GrpcTransport, HttpTransport
from agent.pdata import Batch
from agent.queue import QueuedSender

# The partial_success field that counts what the peer refused, per signal.
REJECTED_FIELD: dict[Signal, str] = {
    Signal.TRACES: "rejected_spans",
    Signal.METRICS: "rejected_data_points",
    Signal.LOGS: "rejected_log_records",
}


class OTLPExporter:
    """Sends every batch through a sending queue over gRPC, HTTP/protobuf or HTTP/JSON.

    Retryable failures (see ``transport``) are retried by the queue with backoff,
    honouring the peer's RetryInfo / Retry-After; permanent ones are dropped and
    counted. A ``partial_success`` answer is not retried (the spec forbids it): its
    rejected items are reported to the queue as a partial ``PermanentError``, which
    counts them as dropped and the rest of the batch as sent.
    """

    capabilities = Capabilities(mutates_data=False)

    def __init__(self, settings: Settings, config: OTLPExporterConfig) -> None:
        self.cfg = config
        self.tel = settings.telemetry
        self.transport = (GrpcTransport(config) if config.protocol == "grpc"
                          else HttpTransport(config))
        self.sender = QueuedSender(settings, config.sending_queue, config.retry_on_failure,
                                   self._send)

    async def start(self, host: Host) -> None:
        await self.transport.start()
        await self.sender.start(host)

    async def consume(self, batch: Batch) -> None:
        await self.sender.put(batch)

    async def _send(self, batch: Batch) -> None:
        response = await self.transport.export(batch)
        self._account_partial_success(batch.signal, response)

    def _account_partial_success(self, signal: Signal, response: Message) -> None:
        if not response.HasField("partial_success"):  # type: ignore[attr-defined]
            return
        ps = response.partial_success  # type: ignore[attr-defined]
        rejected = getattr(ps, REJECTED_FIELD[signal])
        if rejected:
            # Not retried; the queue counts the rest of the batch as sent.
            raise PermanentError(f"partial success: the peer rejected {rejected} items: "
                                 f"{ps.error_message or '(no message)'}", rejected=rejected)
        if ps.error_message:  # the spec's "warning" form: all accepted, with a message
            self.tel.warn("partial success", "warning", signal=signal, error=ps.error_message)

    async def shutdown(self) -> None:
        """Drain the queue into the peer, then close the connection. Idempotent."""
        await self.sender.shutdown()
        await self.transport.close()
