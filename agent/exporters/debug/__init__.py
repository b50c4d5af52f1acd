"""The ``debug`` exporter: one summary log line per batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from agent.component import Capabilities, ComponentFactory, Host, Kind, Settings, Signal
from agent.pdata import Batch, service_name


@dataclass
class DebugConfig:
    """``basic``: counts only; ``normal``: also the services in the batch."""

    verbosity: Literal["basic", "normal"] = "basic"


class DebugExporter:
    """Logs what it is handed; never fails. For trying pipelines out."""

    capabilities = Capabilities(mutates_data=False)

    def __init__(self, settings: Settings, config: DebugConfig) -> None:
        self.tel = settings.telemetry
        self.cfg = config

    async def start(self, host: Host) -> None:
        pass

    async def consume(self, batch: Batch) -> None:
        fields: dict[str, object] = {"signal": str(batch.signal), "resources": len(batch.resources()),
                                     "items": batch.item_count, "bytes": batch.byte_size}
        if self.cfg.verbosity == "normal":
            fields["services"] = sorted({service_name(r.resource) for r in batch.resources()})
        self.tel.info(f"{batch.signal} batch", **fields)
        self.tel.sent(batch.signal, batch.item_count)

    async def shutdown(self) -> None:
        pass


factory = ComponentFactory("debug", Kind.EXPORTER, DebugConfig, frozenset(Signal),
                           lambda settings, config, _next: DebugExporter(settings, config))
