"""Building OTLP metric messages from series tables (the connector's only output path)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality, Metric

from agent.connectors.latency.series import Histograms, Series
from agent.pdata import python_to_anyvalue

CUMULATIVE = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE


def _attrs(target: Any, attrs: Mapping[str, Any]) -> None:
    for k, v in attrs.items():
        python_to_anyvalue(v, target.add(key=k).value)


def sum_metric(name: str, unit: str, description: str,
               points: Iterable[tuple[Mapping[str, Any], int, float]], now_ns: int) -> Metric | None:
    """A cumulative monotonic sum from ``(attributes, start_ns, value)`` points."""
    m = Metric(name=name, unit=unit, description=description)
    m.sum.is_monotonic = True
    m.sum.aggregation_temporality = CUMULATIVE
    for attrs, start_ns, value in points:
        dp = m.sum.data_points.add(start_time_unix_nano=start_ns, time_unix_nano=now_ns,
                                   as_double=float(value))
        _attrs(dp.attributes, attrs)
    return m if m.sum.data_points else None


def series_points(series: Series, values: np.ndarray) -> list[tuple[dict[str, Any], int, float]]:
    """``(attributes, start_ns, value)`` for every row of ``series``."""
    vals = values.tolist()
    return [(series.attributes(row), series.start_ns[row], vals[row] if row < len(vals) else 0.0)
            for row in range(len(series))]


def histogram_metric(name: str, unit: str, description: str, series: Series, hist: Histograms,
                     now_ns: int) -> Metric | None:
    """A cumulative explicit-bucket histogram with exemplars; ``None`` without points.

    Rows without observations emit no point. That includes rows the histogram has not
    grown to: a series row may exist before anything was recorded in it (a stage row
    is created when a span of the stage is consumed, its histogram row only when a
    trace containing it is analysed).
    """
    n = min(len(series), len(hist.counts))
    if not n:
        return None
    m = Metric(name=name, unit=unit, description=description)
    m.histogram.aggregation_temporality = CUMULATIVE
    bounds = hist.bounds.tolist()
    counts = hist.counts[:n]
    totals = counts.sum(axis=1).tolist()
    for row in range(n):
        if not totals[row]:
            continue
        dp = m.histogram.data_points.add(
            start_time_unix_nano=series.start_ns[row], time_unix_nano=now_ns,
            count=totals[row], sum=float(hist.sums[row]),
            min=float(hist.mins[row]), max=float(hist.maxs[row]),
            explicit_bounds=bounds, bucket_counts=counts[row].tolist())
        _attrs(dp.attributes, series.attributes(row))
        for trace_id, span_id, t, value in hist.exemplars_of(row):
            dp.exemplars.add(time_unix_nano=t, as_double=value, trace_id=trace_id,
                             span_id=span_id)
    return m if m.histogram.data_points else None


def gauge_metric(name: str, unit: str, description: str,
                 points: Iterable[tuple[Mapping[str, Any], float]], start_ns: int,
                 now_ns: int) -> Metric | None:
    """A gauge from ``(attributes, value)`` pairs (NaN values skipped); ``None`` if empty."""
    m = Metric(name=name, unit=unit, description=description)
    for attrs, value in points:
        if value != value:  # NaN: nothing observed for this point
            continue
        dp = m.gauge.data_points.add(start_time_unix_nano=start_ns, time_unix_nano=now_ns,
                                     as_double=float(value))
        _attrs(dp.attributes, attrs)
    return m if m.gauge.data_points else None
