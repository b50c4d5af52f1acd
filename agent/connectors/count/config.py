"""Config of the ``count`` connector."""

from __future__ import annotations

from dataclasses import dataclass

from agent.config import Duration


@dataclass
class CountConfig:
    """Count items per service and emit the counts as metrics."""

    interval: Duration = 10.0
    # Distinct service names kept; items of further services count under "_other".
    max_services: int = 1000

    def validate(self) -> list[str]:
        errs = []
        if self.interval <= 0:
            errs.append("interval: must be positive")
        if self.max_services < 1:
            errs.append("max_services: must be at least 1")
        return errs
