"""Batches and their columns: extracted once, robust to any value the wire allows."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as hs
from opentelemetry.proto.common.v1.common_pb2 import KeyValue

from agent.pdata import anyvalue_to_python, ml_attributes, python_to_anyvalue
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


def test_ml_attributes_keeps_only_ml_keys() -> None:
    b = trace_batch([span(attributes={"ml.model.version": "v2", "ml.prediction.score": 0.5,
                                      "http.method": "GET"})],
                    resource={"service.name": "s", "gen_ai.request.model": "m"})
    rs = b.request.resource_spans[0]
    assert ml_attributes(rs.scope_spans[0].spans[0].attributes) == {
        "ml.model.version": "v2", "ml.prediction.score": 0.5}
    assert ml_attributes(rs.resource.attributes) == {"gen_ai.request.model": "m"}


attr_values = hs.one_of(
    hs.none(), hs.booleans(), hs.integers(-(2**63), 2**63 - 1), hs.floats(), hs.text(max_size=8),
    hs.binary(max_size=4), hs.lists(hs.floats(), max_size=2),
    hs.dictionaries(hs.text(max_size=2), hs.integers(0, 9), max_size=2))
attr_keys = hs.sampled_from(["ml.prediction.label", "ml.prediction.score", "ml.feature.a",
                             "ml.model.name", "ml.", "ml.f", "gen_ai.request.model", "other"])


@settings(max_examples=200, deadline=None)
@given(hs.lists(hs.tuples(attr_keys, attr_values), max_size=8))
def test_ml_attributes_reads_what_the_general_conversion_reads(pairs: list[tuple[str, Any]]) -> None:
    attrs = []
    for k, v in pairs:
        kv = KeyValue(key=k)
        python_to_anyvalue(v, kv.value)
        attrs.append(kv)
    fast = ml_attributes(attrs)
    general = {kv.key: anyvalue_to_python(kv.value) for kv in attrs
               if kv.key.startswith("ml.") or kv.key == "gen_ai.request.model"}
    assert fast.keys() == general.keys()
    for k, v in general.items():  # NaN != NaN: compare representations
        assert repr(fast[k]) == repr(v) and type(fast[k]) is type(v)


def test_received_bytes_are_reused_until_a_mutation() -> None:
    from agent.pdata import TraceBatch

    original = trace_batch({"a": [span("x")]})
    data = original.to_bytes()
    b = TraceBatch.from_bytes(data)
    assert b.to_bytes() is data  # no second serialisation
    assert b.copy().to_bytes() is data
    b.request.resource_spans[0].scope_spans[0].spans[0].name = "renamed"
    b.invalidate()
    assert TraceBatch.from_bytes(b.to_bytes()).columns.name == ["renamed"]


def test_merged_batches_encode_as_the_concatenated_requests() -> None:
    from agent.pdata import TraceBatch

    a = TraceBatch.from_bytes(trace_batch({"a": [span("x")]}).to_bytes())
    b = TraceBatch.from_bytes(trace_batch({"b": [span("y", span_id=b"\x03" * 8)]}).to_bytes())
    a.extend(b)
    assert a.item_count == 2 and a._request is None  # merged without parsing or copying
    assert a.to_bytes() == a.request.SerializeToString()
    assert a.byte_size == len(a.to_bytes()) and a.columns.service == ["a", "b"]


@settings(max_examples=60, deadline=None)
@given(hs.lists(hs.tuples(hs.integers(0, 3), hs.booleans()), min_size=1, max_size=5))
def test_spliced_resources_encode_the_mutated_request(shape: list[tuple[int, bool]]) -> None:
    """Replacing resources in the received bytes gives exactly the mutated request."""
    from agent.pdata import TraceBatch, set_attribute

    groups = {f"svc{i}": [span(f"op{j}", span_id=bytes([i, j, 1, 1, 1, 1, 1, 1]))
                          for j in range(n)] for i, (n, _) in enumerate(shape)}
    b = TraceBatch.from_bytes(trace_batch(groups).to_bytes())
    new: list[bytes | None] = []
    for rs, (_, change) in zip(b.request.resource_spans, shape, strict=True):
        if change:
            set_attribute(rs.resource.attributes, "host.name", "h" * 200)  # grows the length
            new.append(rs.resource.SerializeToString())
        else:
            new.append(None)
    b.resources_replaced(new)
    assert TraceBatch.from_bytes(b.to_bytes()).request == b.request


span_shapes = hs.lists(hs.tuples(
    hs.text(max_size=6),  # name
    hs.integers(-(2**31), 2**31 - 1),  # kind: any int32 a sender may put there
    hs.sampled_from([None, 0, 1, 2, 7]),  # status code (None: no status at all)
    hs.text(max_size=12),  # status message
    hs.integers(0, 2**64 - 1), hs.integers(0, 2**64 - 1),  # start, end
    hs.sampled_from([b"", b"\x05" * 8, b"\x05" * 3]),  # parent id, valid or not
), max_size=6)


@settings(max_examples=150, deadline=None)
@given(hs.lists(span_shapes, min_size=0, max_size=3), hs.booleans())
def test_columns_of_received_bytes_equal_columns_of_the_request(
        groups: list[list[tuple]], named: bool) -> None:
    """The columns-only parse of the received bytes reads what the full request holds."""
    from agent.pdata import TraceBatch

    built = TraceBatch()
    for i, shape in enumerate(groups):
        rs = built.request.resource_spans.add()
        if named:  # else unknown_service
            rs.resource.attributes.add(key="service.name").value.string_value = f"svc{i}"
        rs.scope_spans.add()
        for j, (name, kind, code, message, start, end, parent) in enumerate(shape):
            s = rs.scope_spans[0].spans.add(name=name, trace_id=bytes([j]) * 16,
                                            span_id=bytes([j + 1]) * 8, parent_span_id=parent,
                                            start_time_unix_nano=start, end_time_unix_nano=end)
            s.kind = kind  # type: ignore[assignment]
            if code is not None:
                s.status.code = code  # type: ignore[assignment]
                s.status.message = message
    built.invalidate()
    received = TraceBatch.from_bytes(built.to_bytes())
    built.invalidate()  # forget the bytes: read the request
    a, b = received.columns, built.columns
    for field in ("n", "services", "trace_id", "name", "span_id", "parent_span_id"):
        assert getattr(a, field) == getattr(b, field), field
    for field in ("resource_index", "kind", "status_code", "start", "end"):
        assert getattr(a, field).tolist() == getattr(b, field).tolist(), field


def test_columns_survive_empty_spans_several_scopes_and_merged_batches() -> None:
    """An all-default span (no field on the wire) and a scope whose spans leave kind
    or status out take the span-by-span path; a merged batch reads as the parts."""
    from opentelemetry.proto.trace.v1.trace_pb2 import Span

    from agent.pdata import TraceBatch

    full = TraceBatch()
    rs = full.request.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = "a"
    rs.scope_spans.add().spans.extend([span("x", span_id=b"\x01" * 8),
                                       span("y", span_id=b"\x02" * 8, status=2)])
    second = rs.scope_spans.add()  # kind left at 0 by one span, status absent from one
    second.spans.extend([span("k0", kind=0), span("k1", kind=2, status=1)])
    second.spans[1].ClearField("status")
    third = rs.scope_spans.add()  # every field present: the columns path
    third.spans.extend([span("z", parent_span_id=b"\x09" * 8, status=2)])
    other = trace_batch({"b": [span("w", span_id=b"\x07" * 8, status=1)]})
    merged = TraceBatch.from_bytes(full.to_bytes())
    merged.extend(TraceBatch.from_bytes(other.to_bytes()))
    assert merged.parsed_request is None  # merged as bytes

    a = merged.columns
    a_ids = (a.span_id, a.parent_span_id, [s.span_id for s in a.spans_at([5, 0, 1])])
    assert merged.parsed_request is None  # ids read from the bytes too
    b = TraceBatch(merged.request).columns  # the same spans, read from the request
    assert a.n == b.n == 6 and a.services == b.services == ["a", "b"]
    assert a.name == b.name == ["x", "y", "k0", "k1", "z", "w"]
    assert a.status_code.tolist() == b.status_code.tolist() == [0, 2, 0, 0, 2, 1]
    assert a.kind.tolist() == b.kind.tolist() == [1, 1, 0, 2, 1, 1]
    assert a_ids[:2] == (b.span_id, b.parent_span_id) and a.parent_span_id[4] == b"\x09" * 8
    assert a_ids[2] == [b"\x07" * 8, b"\x01" * 8, b"\x02" * 8]
    assert a.resource_index.tolist() == [0, 0, 0, 0, 0, 1]
    assert a.span_ids_at([5, 4, 0]) == [b"\x07" * 8, b"\x02" * 8, b"\x01" * 8]

    # A span with no field at all is in no column: the count tells, and the scope is
    # read span by span.
    with_empty = trace_batch({"c": [span("p"), Span(), span("q", kind=3)]})
    c = TraceBatch.from_bytes(with_empty.to_bytes()).columns
    assert c.name == ["p", "", "q"] and c.kind.tolist() == [1, 0, 3]
    assert c.span_id == [b"\x02" * 8, b"", b"\x02" * 8]
