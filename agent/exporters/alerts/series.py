"""The latest points of the series that rules look at.

``SeriesStore.ingest`` copies, out of each metric batch, the latest data point of
every series whose metric some rule names (other metrics are skipped with one set
lookup each). A series is one metric plus its attribute set: resource attributes
merged with the point's (the point's win). Values are copied out, never references
into the batch, so the batch can move on. The store is bounded by ``max_series``;
series that no longer report are pruned once stale.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality, DataPointFlags

from agent.pdata import MetricBatch, anyvalue_to_python, attributes_to_dict
from agent.telemetry import ComponentTelemetry

SeriesKey = tuple[tuple[str, str], ...]
_DELTA = AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA
_NO_VALUE = DataPointFlags.DATA_POINT_FLAGS_NO_RECORDED_VALUE_MASK


def attr_str(value: Any) -> str:
    """An attribute value as the string that matchers and labels see."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        return json.dumps(value, sort_keys=True, default=str)
    return "" if value is None else str(value)


@dataclass(slots=True)
class Point:
    """What a rule can read from one data point.

    Number points set ``value``; histograms set ``count``, ``sum`` and the buckets;
    summaries set ``count``, ``sum`` and ``quantiles``. Unset numbers are NaN.
    ``arrived`` is the evaluation clock's time when the point came in (staleness is
    judged on it, so hosts with skewed clocks still count); ``time_ns`` and
    ``start_ns`` are the point's own timestamps (rates are computed on them).
    """

    arrived: float
    time_ns: int
    start_ns: int
    delta: bool
    value: float = math.nan
    count: float = math.nan
    sum: float = math.nan
    bounds: tuple[float, ...] = ()
    bucket_counts: tuple[int, ...] = ()
    quantiles: dict[float, float] | None = None


@dataclass(slots=True)
class Series:
    """One series: its attributes, latest and previous point, and recent exemplars.

    ``exemplars`` are ``(trace_id_hex, span_id_hex)``, newest first; a point without
    exemplars keeps the series' earlier ones, so an alert can still link a trace.
    """

    attrs: dict[str, str]
    latest: Point
    previous: Point | None = None
    exemplars: tuple[tuple[str, str], ...] = ()


def bucket_quantile(q: float, bounds: tuple[float, ...], counts: tuple[int, ...]) -> float:
    """The ``q`` quantile of an explicit-bucket histogram, as Prometheus estimates it.

    Linear interpolation inside the bucket holding rank ``q * total``; the first
    bucket's lower bound is 0 when its upper bound is positive; a rank in the
    overflow bucket answers the highest finite bound. NaN for an empty histogram.
    """
    if not bounds or len(counts) != len(bounds) + 1:
        return math.nan
    cum = np.cumsum(np.asarray(counts, dtype=np.float64))
    total = float(cum[-1])
    if total <= 0:
        return math.nan
    rank = q * total
    i = int(np.searchsorted(cum, rank, side="left"))
    if i >= len(bounds):
        return float(bounds[-1])
    upper = float(bounds[i])
    if i == 0:
        if upper <= 0:
            return upper
        lower, below = 0.0, 0.0
    else:
        lower, below = float(bounds[i - 1]), float(cum[i - 1])
    in_bucket = float(counts[i])
    if in_bucket <= 0:
        return upper
    return lower + (upper - lower) * (rank - below) / in_bucket


class SeriesStore:
    """Latest points per series, for the metrics in ``metrics`` only."""

    def __init__(self, metrics: set[str], *, max_series: int, max_exemplars: int,
                 telemetry: ComponentTelemetry) -> None:
        self.metrics = set(metrics)
        self.max_series = max_series
        self.max_exemplars = max_exemplars
        self.tel = telemetry
        self._series: dict[str, dict[SeriesKey, Series]] = {m: {} for m in self.metrics}
        self._count = 0

    def watch(self, metrics: set[str]) -> None:
        """Keep series of ``metrics`` from now on (and forget those of any other metric)."""
        self.metrics = set(metrics)
        self._series = {m: self._series.get(m, {}) for m in self.metrics}
        self._count = sum(len(t) for t in self._series.values())

    def __len__(self) -> int:
        return self._count

    def ingest(self, batch: MetricBatch, now: float) -> None:
        """Keep the latest point of every wanted series in ``batch`` (arrival time ``now``)."""
        wanted = self.metrics
        for rm in batch.request.resource_metrics:
            res: dict[str, str] | None = None  # read once per resource, only if needed
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    kind = metric.WhichOneof("data")
                    if metric.name not in wanted or kind is None:
                        continue
                    if res is None:
                        res = {k: attr_str(v) for k, v in
                               attributes_to_dict(rm.resource.attributes).items()}
                    data = getattr(metric, kind)
                    delta = getattr(data, "aggregation_temporality", 0) == _DELTA
                    table = self._series[metric.name]
                    for dp in data.data_points:
                        if dp.flags & _NO_VALUE:
                            continue
                        point = _point(kind, dp, now, delta)
                        if point is not None:
                            self._put(table, res, dp, point)

    def _put(self, table: dict[SeriesKey, Series], res: dict[str, str], dp: Any,
             point: Point) -> None:
        attrs = dict(res)
        for kv in dp.attributes:
            attrs[kv.key] = attr_str(anyvalue_to_python(kv.value))
        key = tuple(sorted(attrs.items()))
        exemplars = tuple((e.trace_id.hex(), e.span_id.hex()) for e in
                          sorted(dp.exemplars, key=lambda e: e.time_unix_nano, reverse=True)
                          if e.trace_id)
        s = table.get(key)
        if s is None:
            if self._count >= self.max_series:
                self.tel.dropped("metrics", 1, "alerts_series_limit")
                return
            table[key] = Series(attrs, point, None, exemplars[: self.max_exemplars])
            self._count += 1
            return
        if point.time_ns < s.latest.time_ns:
            self.tel.dropped("metrics", 1, "out_of_order")
            return
        s.previous, s.latest = s.latest, point
        if exemplars:
            merged = dict.fromkeys(exemplars + s.exemplars)
            s.exemplars = tuple(merged)[: self.max_exemplars]

    def fresh(self, metric: str, now: float, staleness: float) -> list[Series]:
        """Series of ``metric`` whose latest point arrived within ``staleness`` of ``now``."""
        cutoff = now - staleness
        return [s for s in self._series.get(metric, {}).values() if s.latest.arrived >= cutoff]

    def prune(self, now: float, staleness: float) -> None:
        """Forget stale series, which frees room under ``max_series``."""
        cutoff = now - staleness
        for table in self._series.values():
            stale = [k for k, s in table.items() if s.latest.arrived < cutoff]
            for k in stale:
                del table[k]
            self._count -= len(stale)


def _point(kind: str, dp: Any, now: float, delta: bool) -> Point | None:
    p = Point(now, dp.time_unix_nano, dp.start_time_unix_nano, delta)
    if kind in ("gauge", "sum"):
        which = dp.WhichOneof("value")
        if which is None:
            return None
        p.value = float(getattr(dp, which))
    elif kind == "histogram":
        p.count, p.sum = float(dp.count), dp.sum if dp.HasField("sum") else math.nan
        p.bounds, p.bucket_counts = tuple(dp.explicit_bounds), tuple(dp.bucket_counts)
    elif kind == "exponential_histogram":
        p.count, p.sum = float(dp.count), dp.sum if dp.HasField("sum") else math.nan
    elif kind == "summary":
        p.count, p.sum = float(dp.count), dp.sum
        p.quantiles = {q.quantile: q.value for q in dp.quantile_values}
    else:
        return None
    return p
