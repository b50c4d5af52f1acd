"""Configuration of the ``file`` exporter."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from agent.config import ByteSize
from agent.queue import QueueConfig, RetryConfig

SIGNAL_PLACEHOLDER = "{signal}"


@dataclass
class RotationConfig:
    """``rotation``: size-based rotation with numbered backups (``path.1`` is the newest)."""

    max_size: ByteSize = 100 * 2**20
    max_backups: int = 5


@dataclass
class FileConfig:
    """``[exporters.file]``.

    ``path`` is relative to the agent's state directory unless absolute; a
    ``{signal}`` in it is replaced by ``traces``, ``metrics`` or ``logs`` so each
    signal gets its own file (advisable with ``format = "proto"``, whose records do
    not say which signal they hold).
    """

    path: Path = Path("otlp.jsonl")
    format: Literal["json", "proto"] = "json"
    rotation: RotationConfig = field(default_factory=RotationConfig)
    # One consumer keeps the lines in the order the batches were accepted.
    sending_queue: QueueConfig = field(default_factory=lambda: QueueConfig(consumers=1))
    retry_on_failure: RetryConfig = field(default_factory=RetryConfig)

    def validate(self) -> list[str]:
        errs = []
        if not str(self.path).strip() or str(self.path) == ".":
            errs.append("path: must name a file")
        if self.rotation.max_size < 1:
            errs.append("rotation.max_size: must be at least 1 byte")
        if self.rotation.max_backups < 0:
            errs.append("rotation.max_backups: must be >= 0")
        return errs
