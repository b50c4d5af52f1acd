"""Batches and their columns: extracted once, robust to any value the wire allows."""

from __future__ import annotations

import numpy as np

from agent.testing import log_batch, log_record, span, trace_batch


def test_out_of_range_enums_and_times_do_not_break_columns() -> None:
    b = trace_batch([span(start=2**64 - 1, end=2**64 - 1, kind=300, status=7)])
    c = b.columns
    assert c.kind.tolist() == [300] and c.status_code.tolist() == [7]
    assert c.start.tolist() == [np.iinfo(np.int64).max]
    logs = log_batch([log_record(severity=300, time=2**64 - 1)])
    assert logs.columns.severity.tolist() == [300]
    assert logs.columns.time.tolist() == [np.iinfo(np.int64).max]


def test_columns_are_cached_until_invalidated() -> None:
    b = trace_batch({"a": [span("x")]})
    first = b.columns
    assert b.columns is first
    b.extend(trace_batch({"b": [span("y", span_id=b"\x03" * 8)]}))
    assert b.columns is not first and b.columns.name == ["x", "y"]
    assert b.columns.service == ["a", "b"] and b.item_count == 2


def test_ml_attributes_merge_resource_under_span() -> None:
    b = trace_batch([span(attributes={"ml.model.version": "v2", "ml.prediction.score": 0.5,
                                      "http.method": "GET"})],
                    resource={"service.name": "s", "ml.model.name": "m", "ml.model.version": "v1"})
    assert b.columns.ml == [{"ml.model.name": "m", "ml.model.version": "v2",
                             "ml.prediction.score": 0.5}]
