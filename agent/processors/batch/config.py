"""Config of the ``batch`` processor."""

from __future__ import annotations

from dataclasses import dataclass

from agent.config import ByteSize, Duration


@dataclass
class BatchConfig:
    """Merge small requests into larger ones before the exporters."""

    # Flush once this many items (spans, points, log records) are pending.
    send_batch_size: int = 8192
    # Flush at the latest this long after the first pending item arrived (while
    # max_in_flight flushes are still running; otherwise a batch goes at once).
    timeout: Duration = 0.2
    # Flushes running at once; data arriving meanwhile is merged into the next one.
    max_in_flight: int = 2
    # Refuse (retryable) new data while this many bytes are pending a flush.
    max_pending_bytes: ByteSize = 64 * 2**20

    def validate(self) -> list[str]:
        errs = []
        if self.send_batch_size < 1:
            errs.append("send_batch_size: must be at least 1")
        if self.timeout <= 0:
            errs.append("timeout: must be positive")
        if self.max_in_flight < 1:
            errs.append("max_in_flight: must be at least 1")
        return errs
