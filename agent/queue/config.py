"""Typed configs of the sending queue (``sending_queue``) and of retries (``retry_on_failure``).

Exporters embed both in their own config dataclass and hand them to ``QueuedSender``.
An exporter that talks to a remote backend should default ``persistent`` to true
(``field(default_factory=lambda: QueueConfig(persistent=True))``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from agent.config import ByteSize, Duration


@dataclass
class RetryConfig:
    """``retry_on_failure``: exponential backoff with jitter.

    The n-th wait is ``initial_interval * multiplier**n`` capped at ``max_interval``,
    randomised by ``± randomization_factor``; a ``retry_after`` hint from the backend
    (``Retry-After``, gRPC ``RetryInfo``) greater than 0 replaces the computed wait (a hint
    of 0 or a date in the past is ignored: it would retry at once). A batch is retried
    until ``max_elapsed_time`` has passed since its first attempt, then dropped and
    counted; ``max_elapsed_time = 0`` retries forever (sensible with a persistent queue,
    whose bound then turns a long outage into backpressure instead of loss).
    ``enabled = false`` makes the first failure final.
    """

    enabled: bool = True
    initial_interval: Duration = 1.0
    max_interval: Duration = 30.0
    max_elapsed_time: Duration = 300.0
    multiplier: float = 1.5
    randomization_factor: float = 0.5

    def validate(self) -> list[str]:
        errs = []
        if self.initial_interval <= 0:
            errs.append("initial_interval: must be > 0")
        if self.max_interval < self.initial_interval:
            errs.append("max_interval: must be >= initial_interval")
        if self.multiplier < 1:
            errs.append("multiplier: must be >= 1")
        if not 0 <= self.randomization_factor <= 1:
            errs.append("randomization_factor: must be within 0..1")
        return errs


@dataclass
class QueueConfig:
    """``sending_queue``: a queue bounded by items and bytes in front of an exporter's send.

    ``when_full = "block"`` turns a full queue into backpressure: ``put`` waits up to
    ``block_timeout`` for room, then raises ``RetryableError`` (the receiver answers
    503 / UNAVAILABLE). ``"drop_newest"`` drops the new batch and counts it.
    With ``enabled = false`` (no queue) ``put`` retries for at most ``block_timeout``
    (or ``retry_on_failure.max_elapsed_time`` when set and shorter), then refuses.

    ``persistent = true`` keeps the queue in SQLite under the state directory, so what
    was acknowledged survives a crash or restart. ``synchronous`` is SQLite's durability
    setting for it (WAL mode): ``"normal"`` survives the agent being killed (SIGKILL, OOM)
    because every commit is in the OS page cache before ``put`` returns, but a power
    loss or kernel crash may lose the last commits; ``"full"`` fsyncs every commit
    (group-committed across concurrent puts) and survives power loss as well;
    ``"off"`` leaves flushing to the OS entirely (a power loss can corrupt the file,
    which is then quarantined at start).
    """

    enabled: bool = True
    max_items: int = 100_000
    max_bytes: ByteSize = 64 * 2**20
    when_full: Literal["block", "drop_newest"] = "block"
    block_timeout: Duration = 5.0
    consumers: int = 4
    timeout: Duration = 10.0  # per send attempt
    persistent: bool = False
    synchronous: Literal["full", "normal", "off"] = "normal"

    def validate(self) -> list[str]:
        errs = []
        if self.max_items < 1:
            errs.append("max_items: must be >= 1")
        if self.max_bytes < 1:
            errs.append("max_bytes: must be >= 1")
        if self.consumers < 1:
            errs.append("consumers: must be >= 1")
        if self.timeout <= 0:
            errs.append("timeout: must be > 0")
        return errs
