"""Test doubles that ship with the package (like the collector's ``consumertest``).

``Sink`` is a consumer that records what it is handed; ``span``/``trace_batch``,
``log_record``/``log_batch`` and ``gauge_batch``/``sum_batch`` build OTLP batches
with a few keywords; ``settings_for`` and ``make_host`` give a component what the
graph would.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality, Metric
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from agent.component import Capabilities, Host, Kind, PermanentError, RetryableError, Settings
from agent.pdata import Batch, LogBatch, MetricBatch, TraceBatch, python_to_anyvalue
from agent.telemetry import Telemetry


class Sink:
    """Records every batch it is handed. ``fail_with`` makes ``consume`` raise instead."""

    def __init__(self, *, mutates: bool = False) -> None:
        self.capabilities = Capabilities(mutates_data=mutates)
        self.batches: list[Batch] = []
        self.fail_with: BaseException | None = None
        self._event = asyncio.Event() if _has_loop() else None

    async def consume(self, batch: Batch) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.batches.append(batch)
        if self._event is not None:
            self._event.set()

    @property
    def item_count(self) -> int:
        return sum(b.item_count for b in self.batches)

    def spans(self) -> list[Any]:
        return [s for b in self.batches if isinstance(b, TraceBatch)
                for rs in b.request.resource_spans for ss in rs.scope_spans for s in ss.spans]

    def log_records(self) -> list[Any]:
        return [r for b in self.batches if isinstance(b, LogBatch)
                for rl in b.request.resource_logs for sl in rl.scope_logs for r in sl.log_records]

    def metrics(self) -> list[Any]:
        return [m for b in self.batches if isinstance(b, MetricBatch)
                for rm in b.request.resource_metrics for sm in rm.scope_metrics for m in sm.metrics]

    async def wait_for(self, predicate: Any, timeout: float = 5.0) -> None:
        """Wait until ``predicate(self)`` is true."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate(self):
            if loop.time() > deadline:
                raise TimeoutError(f"sink: condition not met in {timeout}s "
                                   f"({len(self.batches)} batches)")
            await asyncio.sleep(0.01)


def _has_loop() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


def settings_for(component_id: str, kind: Kind = Kind.PROCESSOR,
                 telemetry: Telemetry | None = None) -> Settings:
    return Settings(id=component_id, kind=kind, telemetry=(telemetry or Telemetry()).component(component_id))


def make_host(state_dir: str | os.PathLike[str]) -> Host:
    p = Path(state_dir)
    p.mkdir(parents=True, exist_ok=True)
    return Host(state_dir=p)


# --------------------------------------------------------------------------- builders


def _fill_attrs(target: Any, attrs: Mapping[str, Any] | None) -> None:
    for k, v in (attrs or {}).items():
        python_to_anyvalue(v, target.add(key=k).value)


def span(name: str = "op", *, trace_id: bytes = b"\x01" * 16, span_id: bytes = b"\x02" * 8,
         parent_span_id: bytes = b"", start: int = 1_000_000_000, end: int = 2_000_000_000,
         kind: int = Span.SPAN_KIND_INTERNAL, status: int = 0,
         attributes: Mapping[str, Any] | None = None) -> Span:
    """One span; times in Unix nanoseconds."""
    s = Span(name=name, trace_id=trace_id, span_id=span_id, parent_span_id=parent_span_id,
             start_time_unix_nano=start, end_time_unix_nano=end)
    s.kind = kind  # type: ignore[assignment]  # protobuf enums are ints at run time
    s.status.code = status  # type: ignore[assignment]
    _fill_attrs(s.attributes, attributes)
    return s


def trace_batch(spans: Iterable[Span] | Mapping[str, Iterable[Span]],
                resource: Mapping[str, Any] | None = None) -> TraceBatch:
    """A batch; pass ``{service_name: [spans]}`` for several resources."""
    b = TraceBatch()
    groups = spans.items() if isinstance(spans, Mapping) else [(None, spans)]
    for service, group in groups:
        rs = b.request.resource_spans.add()
        attrs = dict(resource or {})
        if service is not None:
            attrs["service.name"] = service
        _fill_attrs(rs.resource.attributes, attrs)
        ss = rs.scope_spans.add()
        ss.scope.name = "test"
        ss.spans.extend(group)
    return b


def log_record(body: Any = "hello", *, time: int = 1_000_000_000, severity: int = 9,
               trace_id: bytes = b"", span_id: bytes = b"",
               attributes: Mapping[str, Any] | None = None) -> LogRecord:
    r = LogRecord(time_unix_nano=time, trace_id=trace_id, span_id=span_id)
    r.severity_number = severity  # type: ignore[assignment]
    python_to_anyvalue(body, r.body)
    _fill_attrs(r.attributes, attributes)
    return r


def log_batch(records: Iterable[LogRecord], resource: Mapping[str, Any] | None = None) -> LogBatch:
    b = LogBatch()
    rl = b.request.resource_logs.add()
    _fill_attrs(rl.resource.attributes, resource)
    rl.scope_logs.add().log_records.extend(records)
    return b


def metric_batch(metrics: Iterable[Metric], resource: Mapping[str, Any] | None = None) -> MetricBatch:
    b = MetricBatch()
    rm = b.request.resource_metrics.add()
    _fill_attrs(rm.resource.attributes, resource)
    rm.scope_metrics.add().metrics.extend(metrics)
    return b


def gauge(name: str, points: Iterable[tuple[Mapping[str, Any], float]], *, unit: str = "",
          time: int = 1_000_000_000) -> Metric:
    """A gauge metric from ``[(attributes, value), ...]``."""
    m = Metric(name=name, unit=unit)
    for attrs, value in points:
        dp = m.gauge.data_points.add(time_unix_nano=time, as_double=float(value))
        _fill_attrs(dp.attributes, attrs)
    return m


def monotonic_sum(name: str, points: Iterable[tuple[Mapping[str, Any], float]], *, unit: str = "",
                  time: int = 1_000_000_000, start: int = 1,
                  temporality: int = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE) -> Metric:
    m = Metric(name=name, unit=unit)
    m.sum.is_monotonic = True
    m.sum.aggregation_temporality = temporality  # type: ignore[assignment]
    for attrs, value in points:
        dp = m.sum.data_points.add(time_unix_nano=time, start_time_unix_nano=start,
                                   as_double=float(value))
        _fill_attrs(dp.attributes, attrs)
    return m


__all__ = [
    "PermanentError",
    "RetryableError",
    "Sink",
    "gauge",
    "log_batch",
    "log_record",
    "make_host",
    "metric_batch",
    "monotonic_sum",
    "settings_for",
    "span",
    "trace_batch",
]
