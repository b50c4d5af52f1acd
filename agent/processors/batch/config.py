"""Config of the ``batch`` processor."""

from __future__ import annotations

from dataclasses import dataclass

from agent.config import ByteSize, Duration


@dataclass
class BatchConfig:
    """Merge small requests into larger ones before the exporters."""

    # Flush once this many items (spans, points, log records) are pending.
    send_batch_size: int = 8192
    # Flush at the latest this long after the first pending item arrived.
    timeout: Duration = 0.2
    # Refuse (retryable) new data while this many bytes are pending a flush.
    max_pending_bytes: ByteSize = 64 * 2**20

    def validate(self) -> list[str]:
        errs = []
        if self.send_batch_size < 1:
            errs.append("send_batch_size: must be at least 1")
        if self.timeout <= 0:
            errs.append("timeout: must be positive")
        return errs
