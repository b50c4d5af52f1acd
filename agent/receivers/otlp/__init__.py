"""The ``otlp`` receiver: OTLP/gRPC (4317) and OTLP/HTTP (4318) in.

See ``receiver.py`` for how answers map to OTLP status codes and README.md for the
config keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent.component import ComponentFactory, Consumer, Kind, Settings, Signal
from agent.receivers.otlp.config import OtlpReceiverConfig


def _make(settings: Settings, config: OtlpReceiverConfig, next: Mapping[Signal, Consumer]) -> Any:
    # Imported here so that loading the registry (``mlagent validate``) does not pull
    # in grpc and aiohttp.
    from agent.receivers.otlp.receiver import OtlpReceiver

    return OtlpReceiver(settings, config, next)


def _preflight(config: OtlpReceiverConfig) -> list[str]:
    """The listeners' TLS files load (checked before a reload stops the running agent)."""
    from agent.receivers.otlp.common import load_server_tls

    errors = []
    for name, listener in (("grpc", config.grpc), ("http", config.http)):
        if listener.enabled and listener.tls.enabled:
            try:
                load_server_tls(f"{name} on {listener.endpoint}", listener.tls)
            except OSError as e:
                errors.append(str(e))
    return errors


# One instance for every pipeline that lists it.
factory = ComponentFactory("otlp", Kind.RECEIVER, OtlpReceiverConfig, frozenset(Signal), _make,
                           preflight=_preflight)

__all__ = ["OtlpReceiverConfig", "factory"]
