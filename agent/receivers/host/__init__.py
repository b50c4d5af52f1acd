"""The ``host`` receiver: psutil system/process metrics and NVML GPU metrics."""

from __future__ import annotations

import builtins
from collections.abc import Mapping
from typing import ClassVar

from agent.component import Consumer, Kind, Settings, Signal
from agent.receivers.host.config import HostConfig
from agent.receivers.host.nvml import Nvml, NvmlApi
from agent.receivers.host.receiver import HostReceiver


class HostFactory:
    """Creates ``HostReceiver``s. ``nvml`` overrides the NVML access for every receiver."""

    type: ClassVar[str] = "host"
    kind: ClassVar[Kind] = Kind.RECEIVER
    config_class: ClassVar[builtins.type] = HostConfig
    signals: ClassVar[frozenset[Signal]] = frozenset({Signal.METRICS})
    output_signals: ClassVar[frozenset[Signal]] = frozenset({Signal.METRICS})

    def __init__(self, nvml: NvmlApi | None = None) -> None:
        self.nvml = nvml

    def create(self, settings: Settings, config: HostConfig,
               next: Mapping[Signal, Consumer]) -> HostReceiver:
        return HostReceiver(settings, config, next, nvml=self.nvml)


factory = HostFactory()

__all__ = ["HostConfig", "HostFactory", "HostReceiver", "Nvml", "NvmlApi", "factory"]
