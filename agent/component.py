"""The contracts every component implements: signals, capabilities, errors, factories.

A pipeline is receivers -> processors -> exporters. Data moves as batches
(see ``agent.pdata``); every hop is ``await consumer.consume(batch)``.

Ownership (the collector's ``consumer.Traces`` rule): ``consume(batch)`` hands the
batch over. After it returns or raises, the caller must not touch the batch again.
A consumer that changes batches declares ``Capabilities(mutates_data=True)``; the
graph then hands it its own copy whenever the batch is also going elsewhere.
A consumer that keeps data past ``consume`` (a queue, a window) either keeps the
batch itself (it owns it now) or copies out the values it needs.

Acknowledgement: ``consume`` returning normally means the data is safe downstream
(accepted by every exporter, persisted where the exporter's queue is persistent).
It raises ``RetryableError`` when the sender should try again later (backpressure,
a full queue, a backend outage) and ``PermanentError`` when the data can never be
accepted (it is dropped and counted by whoever raised it).
"""

from __future__ import annotations

import asyncio
import builtins
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

if TYPE_CHECKING:
    from agent.pdata import Batch
    from agent.telemetry import ComponentTelemetry


_S = TypeVar("_S")


class Signal(enum.StrEnum):
    """The three OTLP signals."""

    TRACES = "traces"
    METRICS = "metrics"
    LOGS = "logs"


class Kind(enum.StrEnum):
    """Where a component sits in a pipeline."""

    RECEIVER = "receiver"
    PROCESSOR = "processor"
    EXPORTER = "exporter"
    CONNECTOR = "connector"


class Status(enum.StrEnum):
    """A component's health, as shown on ``/status`` and ``/readyz``."""

    STARTING = "starting"
    OK = "ok"
    DEGRADED = "degraded"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True)
class Capabilities:
    """What a consumer does with the batches it is handed."""

    mutates_data: bool = False


class PipelineError(Exception):
    """Base of the two errors that may cross a component boundary."""


class PermanentError(PipelineError):
    """The data can never be accepted: drop it (the raiser counts it) and do not retry.

    ``rejected`` is how many items (spans, points, log records) were refused, when
    only part of a batch was; ``None`` means the whole batch.
    """

    def __init__(self, message: str, *, rejected: int | None = None) -> None:
        super().__init__(message)
        self.rejected = rejected


class RetryableError(PipelineError):
    """Try again later. ``retry_after`` (seconds) is the peer's or our own hint."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@runtime_checkable
class Consumer(Protocol):
    """Something that accepts batches. See the module docstring for the contract."""

    capabilities: Capabilities

    async def consume(self, batch: Batch) -> None: ...


class Component(Protocol):
    """A running part of the graph.

    ``start`` returns promptly once the component is ready (listeners bound, files
    open); background work runs in tasks the component owns. ``shutdown`` is
    idempotent, safe to call without ``start``, and flushes what the component
    holds into its next consumers (which are still running when it is called).
    """

    async def start(self, host: Host) -> None: ...

    async def shutdown(self) -> None: ...


@dataclass
class Host:
    """What the running agent offers its components at start.

    ``services`` holds shared in-process services by name (for example the hardware
    snapshot that the ``host`` receiver fills and the ``enrich`` processor reads);
    components reach one with ``service`` in ``start``.

    ``shutdown_timeout`` is ``service.shutdown_timeout``: the drain deadline of the whole
    graph, and so the longest a component's own ``shutdown`` may usefully wait (a
    sending queue drains into its backend for that long).
    """

    state_dir: Path
    services: dict[str, Any] = field(default_factory=dict)
    shutdown_timeout: float = 10.0  # service.shutdown_timeout's default
    # The agent's self-metrics registry (agent.telemetry.Telemetry), for components
    # that report on the agent itself.
    telemetry: Any = None
    report_status: Callable[[str, Status, str | None], None] = lambda _id, _s, _e: None

    def service(self, name: str, cls: type[_S]) -> _S:
        """The shared service ``name``, created (``cls()``) by whichever component asks
        first: components start downstream-first, so a consumer may ask before the
        component that fills it."""
        svc = self.services.get(name)
        if not isinstance(svc, cls):
            svc = self.services[name] = cls()
        return svc


@dataclass(frozen=True)
class Settings:
    """Identity and instruments handed to a factory's ``create``."""

    id: str  # "type" or "type/name"
    kind: Kind
    telemetry: ComponentTelemetry

    @property
    def type(self) -> str:
        return self.id.split("/", 1)[0]


class Factory(Protocol):
    """Creates one kind of component from its typed config.

    ``config_class`` is a dataclass whose field defaults are the component's defaults
    (see ``agent.config`` for the field types it understands); it may define
    ``validate(self) -> list[str]`` returning errors as ``"key: message"`` strings.
    Validation is pure: no I/O.

    ``create`` is called once per component id (once per pipeline for processors).
    ``next`` maps each signal the component emits to the consumer that receives it:
    empty for exporters, one signal for processors, the receiver's or connector's
    output signals otherwise. Receivers and exporters used in several pipelines are
    one instance; an exporter or connector's ``consume`` sees batches of every
    signal it was wired for and dispatches on ``batch.signal``. ``create`` does no
    I/O: that belongs to ``start``.

    ``signals`` are the signals accepted (exporters, processors, connectors) or
    emitted (receivers); a connector emits ``output_signals``.

    A factory may also have ``preflight(config) -> list[str]``: the checks of a config
    that need I/O (TLS files that must load). A reload runs them, in a thread, before
    it stops the running graph, and any error refuses the reload: the running config
    stays instead of a restore that would read the same files again.
    """

    @property
    def type(self) -> str: ...
    @property
    def kind(self) -> Kind: ...
    @property
    def config_class(self) -> builtins.type: ...
    @property
    def signals(self) -> frozenset[Signal]: ...
    @property
    def output_signals(self) -> frozenset[Signal]: ...

    def create(self, settings: Settings, config: Any, next: Mapping[Signal, Consumer]) -> Any: ...


@dataclass(frozen=True)
class ComponentFactory:
    """The ``Factory`` of a component whose constructor is all ``create`` needs.

    ``make(settings, config, next)`` builds the component; most folders register
    ``factory = ComponentFactory("type", Kind..., Config, signals, make)``.
    """

    type: str
    kind: Kind
    config_class: builtins.type
    signals: frozenset[Signal]
    make: Callable[[Settings, Any, Mapping[Signal, Consumer]], Any]
    output_signals: frozenset[Signal] = frozenset()
    preflight: Callable[[Any], list[str]] | None = None  # see Factory

    def create(self, settings: Settings, config: Any, next: Mapping[Signal, Consumer]) -> Any:
        return self.make(settings, config, next)


async def cancel_tasks(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel background tasks a component owns and wait until they ended (None: skipped).

    Their errors are dropped (a timer's failures were counted as they happened); a
    cancellation of the caller itself still propagates.
    """
    live = [t for t in tasks if t is not None]
    for t in live:
        t.cancel()
    if live:
        await asyncio.gather(*live, return_exceptions=True)


async def emit(next: Consumer, batch: Batch, telemetry: ComponentTelemetry) -> bool:
    """Hand a batch a component produced itself (a connector's metrics, a receiver's
    samples) to its next consumer. Returns whether it was taken.

    Nobody upstream can retry such a batch, so a refusal is a drop, counted with the
    reason ``downstream_refused`` (retryable), ``downstream_rejected`` (permanent) or
    ``downstream_error``; the next emission carries fresh values. Never raises.
    """
    try:
        await next.consume(batch)
    except RetryableError as e:
        telemetry.dropped(batch.signal, batch.item_count, "downstream_refused", e)
        return False
    except PermanentError as e:
        telemetry.dropped(batch.signal, batch.item_count, "downstream_rejected", e)
        return False
    except Exception as e:  # outside a graph nothing converts bugs; a timer must survive
        telemetry.dropped(batch.signal, batch.item_count, "downstream_error", repr(e))
        return False
    return True
