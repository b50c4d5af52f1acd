"""Process-wide accounting of the telemetry bytes the agent holds.

Every component that keeps batches past ``consume`` (sending queues first of all)
adds their serialised size when it takes them and removes it when it lets them go,
and declares the most it will ever hold (its bound). The ``memory_limiter`` processor
reads the total to refuse new data above its soft limit, and sets ``hard_limit``:
a holder that would push the total past it is refused (``try_add`` returns False),
so the hard limit holds by construction rather than by reaction.

One instance lives in ``host.services["memory"]``; ``MemoryAccountant.of(host)``
creates it on first use, whichever component starts first. All methods are called
from the event loop thread.
"""

from __future__ import annotations

from agent.component import Host

SERVICE_NAME = "memory"


class MemoryAccountant:
    """Bytes held by the agent's queues and windows, against an optional hard limit."""

    def __init__(self, hard_limit: int | None = None) -> None:
        self.hard_limit = hard_limit
        self._held = 0
        self._bounds: dict[str, int] = {}

    @classmethod
    def of(cls, host: Host) -> MemoryAccountant:
        """The accountant registered on ``host`` (registered now if none is)."""
        return host.service(SERVICE_NAME, cls)

    @property
    def held(self) -> int:
        """Bytes currently held, summed over every holder."""
        return self._held

    def try_add(self, nbytes: int) -> bool:
        """Account ``nbytes`` more, unless that would pass the hard limit (then False).

        While nothing at all is held, one item is taken however large, so that a single
        batch larger than the limit cannot wedge every pipeline forever.
        """
        limit = self.hard_limit
        if limit is not None and self._held + nbytes > limit and self._held > 0:
            return False
        self._held += nbytes
        return True

    def add(self, nbytes: int) -> None:
        """Account ``nbytes`` that the holder already has (e.g. restored from disk)."""
        self._held += nbytes

    def remove(self, nbytes: int) -> None:
        """Release ``nbytes`` previously added."""
        self._held = max(0, self._held - nbytes)

    def declare_bound(self, holder: str, nbytes: int) -> None:
        """Record that ``holder`` never holds more than ``nbytes`` (replaces an earlier value)."""
        self._bounds[holder] = nbytes

    def forget_bound(self, holder: str) -> None:
        """``holder`` stopped; it holds nothing any more."""
        self._bounds.pop(holder, None)

    @property
    def bounds(self) -> dict[str, int]:
        """Declared bounds by holder (a copy)."""
        return dict(self._bounds)

    @property
    def bounds_total(self) -> int:
        """The most all declared holders together may hold."""
        return sum(self._bounds.values())
