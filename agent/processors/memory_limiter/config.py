"""Config of the ``memory_limiter`` processor."""

from __future__ import annotations

from dataclasses import dataclass

from agent.config import ByteSize, Duration


@dataclass
class MemoryLimiterConfig:
    """Limits on the telemetry the agent holds and on its resident memory.

    ``data_*`` limits apply to the bytes of batches held by the agent's queues (the
    process-wide ``MemoryAccountant``): above ``data_soft_limit`` new data is refused
    with a retry hint; ``data_hard_limit`` is what queues can never grow past (they
    refuse instead), and the sum of their byte bounds is checked against it at start.
    ``rss_*`` limits apply to the process's resident set size, sampled every
    ``check_interval``: above the soft limit new data is refused, above the hard limit
    it is refused and a garbage collection is forced at each check. ``0`` turns an
    RSS limit off.
    """

    check_interval: Duration = 1.0
    data_soft_limit: ByteSize = 384 * 2**20
    data_hard_limit: ByteSize = 512 * 2**20
    rss_soft_limit: ByteSize = 1024 * 2**20
    rss_hard_limit: ByteSize = 1536 * 2**20
    retry_after: Duration = 5.0  # the hint sent with a refusal (HTTP Retry-After, RetryInfo)

    def validate(self) -> list[str]:
        errs = []
        if self.check_interval <= 0:
            errs.append("check_interval: must be > 0")
        if self.data_soft_limit > self.data_hard_limit:
            errs.append("data_soft_limit: must not exceed data_hard_limit")
        if self.rss_soft_limit and self.rss_hard_limit and self.rss_soft_limit > self.rss_hard_limit:
            errs.append("rss_soft_limit: must not exceed rss_hard_limit")
        return errs
