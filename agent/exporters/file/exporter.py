"""The ``file`` exporter: OTLP requests appended to a file, one per record.

``format = "json"`` writes OTLP/JSON lines (one export request per line, hex ids),
as the collector's file exporter does; ``format = "proto"`` writes each serialised
request prefixed by its length as a 4-byte big-endian integer (the collector's
length-delimited proto format). Encoding and file I/O run in a worker thread so
that the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

from agent.component import Capabilities, Host, PermanentError, RetryableError, Settings
from agent.exporters.file.config import SIGNAL_PLACEHOLDER, FileConfig
from agent.exporters.file.writer import RotatingFile
from agent.otlpjson import encode_json
from agent.pdata import Batch
from agent.queue import QueuedSender


def encode_json_line(batch: Batch) -> bytes:
    """One OTLP/JSON line for ``batch`` (compact JSON, so the only newline is the last byte)."""
    return encode_json(batch.request) + b"\n"


def encode_length_delimited(batch: Batch) -> bytes:
    """The serialised request after its length (uint32, big-endian)."""
    data = batch.to_bytes()
    return struct.pack(">I", len(data)) + data


class FileExporter:
    """Appends every batch it is handed to a rotated file, through a sending queue."""

    capabilities = Capabilities(mutates_data=False)

    def __init__(self, settings: Settings, config: FileConfig) -> None:
        self.cfg = config
        self.tel = settings.telemetry
        self.sender = QueuedSender(settings, config.sending_queue, config.retry_on_failure,
                                   self._send)
        self._encode = encode_json_line if config.format == "json" else encode_length_delimited
        self._files: dict[Path, RotatingFile] = {}
        # File operations are serialised: RotatingFile is not thread-safe, and one
        # writer at a time keeps records whole and in order.
        self._lock = asyncio.Lock()
        self._base: Path | None = None

    async def start(self, host: Host) -> None:
        self._base = host.state_dir
        await self.sender.start(host)

    async def consume(self, batch: Batch) -> None:
        await self.sender.put(batch)

    def path_for(self, signal: str) -> Path:
        """The file a batch of ``signal`` goes to (relative paths under the state dir)."""
        p = Path(str(self.cfg.path).replace(SIGNAL_PLACEHOLDER, signal))
        if not p.is_absolute() and self._base is not None:
            p = self._base / p
        return p

    async def _send(self, batch: Batch) -> None:
        if self._base is None:
            raise RetryableError("file exporter is not started")
        try:
            record = await asyncio.to_thread(self._encode, batch)
        except Exception as e:  # a batch that cannot be encoded never will be
            raise PermanentError(f"cannot encode batch: {e}") from e
        path = self.path_for(batch.signal)
        async with self._lock:
            f = self._files.get(path)
            if f is None:
                rot = self.cfg.rotation
                f = self._files[path] = RotatingFile(path, rot.max_size, rot.max_backups)
            # A cancelled attempt (the queue's per-attempt timeout) cannot stop the thread:
            # keep the lock until the write really ended, so a retry or a close never
            # touches the file at the same time (torn or interleaved records).
            write = asyncio.ensure_future(asyncio.to_thread(f.write, record))
            try:
                await asyncio.shield(write)
            except asyncio.CancelledError:
                await asyncio.wait([write])
                raise

    async def shutdown(self) -> None:
        """Drain the queue, then flush and fsync every open file. Idempotent."""
        await self.sender.shutdown()
        async with self._lock:
            files, self._files = list(self._files.values()), {}
            for f in files:
                try:
                    await asyncio.to_thread(f.close)
                except OSError as e:
                    self.tel.error("closing file failed", path=str(f.path), error=str(e))
