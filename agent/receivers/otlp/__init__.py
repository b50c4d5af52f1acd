"""The ``otlp`` receiver: OTLP/gRPC (4317) and OTLP/HTTP (4318) in.

See ``receiver.py`` for how answers map to OTLP status codes and README.md for the
config keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from agent.component import Consumer, Kind, Settings, Signal
from agent.receivers.otlp.config import OtlpReceiverConfig

if TYPE_CHECKING:
    from agent.receivers.otlp.receiver import OtlpReceiver


class OtlpReceiverFactory:
    """Creates the ``otlp`` receiver (one instance for every pipeline that lists it)."""

    type = "otlp"
    kind = Kind.RECEIVER
    config_class = OtlpReceiverConfig
    signals = frozenset(Signal)
    output_signals = frozenset(Signal)

    def create(self, settings: Settings, config: OtlpReceiverConfig,
               next: Mapping[Signal, Consumer]) -> OtlpReceiver:
        # Imported here so that loading the registry (``mlagent validate``) does not
        # pull in grpc and aiohttp.
        from agent.receivers.otlp.receiver import OtlpReceiver

        return OtlpReceiver(settings, config, next)


factory = OtlpReceiverFactory()

__all__ = ["OtlpReceiverConfig", "OtlpReceiverFactory", "factory"]
