"""OTLP/JSON codec: hex ids, round trips, hand-written JSON, the SDK's own protobuf."""

from __future__ import annotations

import base64
import contextlib
import json
import math

import pytest
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from agent.component import Signal
from agent.otlpjson import decode_json, encode_json
from agent.pdata import BATCH_TYPES

TRACE_ID = bytes.fromhex("5b8efff798038103d269b633813fc60c")
SPAN_ID = bytes.fromhex("eee19b7ec3c1b174")
PARENT_ID = bytes.fromhex("eee19b7ec3c1b173")


# --------------------------------------------------------------------------- hand-written JSON


HAND_TRACES = """{
  "resourceSpans": [{
    "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "my.service"}}]},
    "scopeSpans": [{
      "scope": {"name": "my.library", "version": "1.0.0"},
      "spans": [{
        "traceId": "5B8EFFF798038103D269B633813FC60C",
        "spanId": "EEE19B7EC3C1B174",
        "parentSpanId": "EEE19B7EC3C1B173",
        "name": "I'm a server span",
        "startTimeUnixNano": "1544712660000000000",
        "endTimeUnixNano": 1544712661000000000,
        "kind": 2,
        "attributes": [
          {"key": "my.span.attr", "value": {"intValue": "42"}},
          {"key": "blob", "value": {"bytesValue": "AAEC"}}
        ],
        "links": [{"traceId": "5b8efff798038103d269b633813fc60c", "spanId": "0000000000000001"}],
        "status": {"code": 2, "message": "boom"},
        "aFieldFromTheFuture": {"x": 1}
      }]
    }]
  }]
}"""


def test_hand_written_traces_decode_with_hex_ids():
    req = decode_json(Signal.TRACES, HAND_TRACES.encode())
    rs = req.resource_spans[0]
    assert rs.resource.attributes[0].value.string_value == "my.service"
    assert rs.scope_spans[0].scope.version == "1.0.0"
    span = rs.scope_spans[0].spans[0]
    assert span.trace_id == TRACE_ID
    assert span.span_id == SPAN_ID
    assert span.parent_span_id == PARENT_ID
    assert span.start_time_unix_nano == 1544712660000000000
    assert span.end_time_unix_nano == 1544712661000000000
    assert span.kind == Span.SPAN_KIND_SERVER
    assert span.status.code == 2 and span.status.message == "boom"
    assert span.attributes[0].value.int_value == 42
    # Other bytes stay base64, as in protobuf's JSON mapping.
    assert span.attributes[1].value.bytes_value == b"\x00\x01\x02"
    assert span.links[0].trace_id == TRACE_ID
    assert span.links[0].span_id == b"\x00" * 7 + b"\x01"


def test_hand_written_logs_and_exemplars_decode_with_hex_ids():
    logs = decode_json(Signal.LOGS, json.dumps({"resourceLogs": [{"scopeLogs": [{"logRecords": [{
        "timeUnixNano": "1", "severityNumber": 17, "body": {"stringValue": "oops"},
        "traceId": TRACE_ID.hex(), "spanId": SPAN_ID.hex()}]}]}]}).encode())
    rec = logs.resource_logs[0].scope_logs[0].log_records[0]
    assert (rec.trace_id, rec.span_id, rec.severity_number, rec.body.string_value) == (
        TRACE_ID, SPAN_ID, 17, "oops")

    exemplar = {"asDouble": 0.5, "timeUnixNano": "3", "traceId": TRACE_ID.hex(),
                "spanId": SPAN_ID.hex()}
    metrics = decode_json(Signal.METRICS, json.dumps({"resourceMetrics": [{"scopeMetrics": [{
        "metrics": [
            {"name": "h", "histogram": {"aggregationTemporality": 2, "dataPoints": [
                {"count": "1", "bucketCounts": ["0", "1"], "explicitBounds": [1.0],
                 "exemplars": [exemplar]}]}},
            {"name": "g", "gauge": {"dataPoints": [{"asInt": "7", "exemplars": [exemplar]}]}},
        ]}]}]}).encode())
    h, g = metrics.resource_metrics[0].scope_metrics[0].metrics
    assert h.histogram.aggregation_temporality == 2
    assert list(h.histogram.data_points[0].bucket_counts) == [0, 1]
    for point in (h.histogram.data_points[0], g.gauge.data_points[0]):
        assert point.exemplars[0].trace_id == TRACE_ID
        assert point.exemplars[0].span_id == SPAN_ID
    assert g.gauge.data_points[0].as_int == 7


def test_snake_case_keys_are_accepted_and_their_ids_converted():
    req = decode_json(Signal.TRACES, json.dumps({"resource_spans": [{"scope_spans": [{"spans": [
        {"trace_id": TRACE_ID.hex(), "span_id": SPAN_ID.hex(), "parent_span_id": ""}]}]}]}))
    span = req.resource_spans[0].scope_spans[0].spans[0]
    assert (span.trace_id, span.span_id, span.parent_span_id) == (TRACE_ID, SPAN_ID, b"")


def test_encoded_json_is_compact_camel_case_with_hex_ids_and_integer_enums():
    req = ExportTraceServiceRequest()
    span = req.resource_spans.add().scope_spans.add().spans.add(
        trace_id=TRACE_ID, span_id=SPAN_ID, parent_span_id=PARENT_ID, name="op",
        kind=Span.SPAN_KIND_CLIENT, start_time_unix_nano=2**63 - 1)
    span.links.add(trace_id=TRACE_ID, span_id=PARENT_ID)
    out = encode_json(req)
    assert b" " not in out and b"\n" not in out
    obj = json.loads(out)
    s = obj["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert s["traceId"] == TRACE_ID.hex()
    assert s["spanId"] == SPAN_ID.hex()
    assert s["parentSpanId"] == PARENT_ID.hex()
    assert s["kind"] == 3
    assert s["startTimeUnixNano"] == str(2**63 - 1)
    assert s["links"][0] == {"traceId": TRACE_ID.hex(), "spanId": PARENT_ID.hex()}


def test_responses_encode_like_any_message():
    resp = ExportTraceServiceResponse(
        partial_success=ExportTracePartialSuccess(rejected_spans=3, error_message="no"))
    assert json.loads(encode_json(resp)) == {
        "partialSuccess": {"rejectedSpans": "3", "errorMessage": "no"}}
    assert encode_json(ExportTraceServiceResponse()) == b"{}"


# --------------------------------------------------------------------------- errors


def _one_span(**fields):
    return json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [fields]}]}]}).encode()


@pytest.mark.parametrize("fields, needle", [
    ({"traceId": "5b8efff798038103d269b633813fc6"}, "traceId"),  # 15 bytes
    ({"traceId": TRACE_ID.hex() + "00"}, "traceId"),  # 17 bytes
    ({"spanId": TRACE_ID.hex()}, "spanId"),  # a trace id where a span id goes
    ({"parentSpanId": "zzzzzzzzzzzzzzzz"}, "not hex"),
    ({"spanId": "eee19b7e c3c1b17"}, "not hex"),  # fromhex would skip the space
    # The base64 that json_format would have accepted is refused, not misread.
    ({"traceId": "W47/95gDgQPSabYzgT/GDA=="}, "traceId"),
    ({"spanId": 12345}, "hex string"),
])
def test_bad_ids_are_a_clear_value_error(fields, needle):
    with pytest.raises(ValueError, match=needle):
        decode_json(Signal.TRACES, _one_span(**fields))


def test_bad_link_ids_are_refused_too():
    with pytest.raises(ValueError, match="spanId"):
        decode_json(Signal.TRACES, _one_span(links=[{"traceId": TRACE_ID.hex(), "spanId": "01"}]))


@pytest.mark.parametrize("data, needle", [
    (b"{", "invalid JSON"),
    (b"\xff\xfe", "invalid JSON"),
    (b"[]", "expected an object"),
    (b'{"resourceSpans": {"a": 1}}', "resourceSpans"),
    (_one_span(startTimeUnixNano="soon"), "startTimeUnixNano"),
    (_one_span(name=5), "name"),
    (b"[" * 100_000 + b"]" * 100_000, "invalid JSON"),
])
def test_malformed_input_is_a_value_error(data, needle):
    with pytest.raises(ValueError, match=needle):
        decode_json(Signal.TRACES, data)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.sampled_from(["spans", "traceId", "name", "links", "attributes",
                                       "value", "key", "scopeSpans", "x"]), children, max_size=3),
    max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(JSON)
def test_arbitrary_json_never_raises_anything_but_value_error(value):
    data = json.dumps({"resourceSpans": [{"scopeSpans": [value]}, value]}).encode()
    with contextlib.suppress(ValueError):
        decode_json(Signal.TRACES, data)


# --------------------------------------------------------------------------- round trips

ints64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
uints64 = st.integers(min_value=0, max_value=2**64 - 1)
doubles = st.floats(allow_nan=False)  # NaN != NaN would make equality meaningless
maybe_trace_id = st.just(b"") | st.binary(min_size=16, max_size=16)
maybe_span_id = st.just(b"") | st.binary(min_size=8, max_size=8)
scalars = st.one_of(
    st.text().map(lambda v: AnyValue(string_value=v)),
    ints64.map(lambda v: AnyValue(int_value=v)),
    doubles.map(lambda v: AnyValue(double_value=v)),
    st.booleans().map(lambda v: AnyValue(bool_value=v)),
    st.binary(max_size=16).map(lambda v: AnyValue(bytes_value=v)),
)


def _array(values):
    v = AnyValue()
    v.array_value.values.extend(values)
    return v


any_values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=3).map(_array),
                          max_leaves=6)
attributes = st.lists(st.tuples(st.text(max_size=10), any_values), max_size=4)


def _set_attrs(target, attrs):
    for key, value in attrs:
        target.add(key=key).value.CopyFrom(value)


@st.composite
def trace_requests(draw):
    req = ExportTraceServiceRequest()
    for _ in range(draw(st.integers(0, 2))):
        rs = req.resource_spans.add(schema_url=draw(st.text(max_size=5)))
        _set_attrs(rs.resource.attributes, draw(attributes))
        ss = rs.scope_spans.add()
        ss.scope.name = draw(st.text(max_size=8))
        for _ in range(draw(st.integers(0, 3))):
            span = ss.spans.add(
                trace_id=draw(maybe_trace_id), span_id=draw(maybe_span_id),
                parent_span_id=draw(maybe_span_id), name=draw(st.text(max_size=10)),
                kind=draw(st.integers(0, 5)), start_time_unix_nano=draw(uints64),
                end_time_unix_nano=draw(uints64), flags=draw(st.integers(0, 2**32 - 1)),
                trace_state=draw(st.text(max_size=5)))
            _set_attrs(span.attributes, draw(attributes))
            span.status.code = draw(st.integers(0, 2))
            for _ in range(draw(st.integers(0, 2))):
                link = span.links.add(trace_id=draw(maybe_trace_id), span_id=draw(maybe_span_id))
                _set_attrs(link.attributes, draw(attributes))
            for _ in range(draw(st.integers(0, 1))):
                span.events.add(name=draw(st.text(max_size=5)), time_unix_nano=draw(uints64))
    return req


@st.composite
def log_requests(draw):
    req = ExportLogsServiceRequest()
    rl = req.resource_logs.add()
    _set_attrs(rl.resource.attributes, draw(attributes))
    for _ in range(draw(st.integers(0, 3))):
        rec = rl.scope_logs.add().log_records.add(
            time_unix_nano=draw(uints64), observed_time_unix_nano=draw(uints64),
            severity_number=draw(st.integers(0, 24)), severity_text=draw(st.text(max_size=5)),
            trace_id=draw(maybe_trace_id), span_id=draw(maybe_span_id),
            event_name=draw(st.text(max_size=5)))
        rec.body.CopyFrom(draw(any_values))
        _set_attrs(rec.attributes, draw(attributes))
    return req


@st.composite
def metric_requests(draw):
    req = ExportMetricsServiceRequest()
    sm = req.resource_metrics.add().scope_metrics.add()

    def exemplars(point):
        for _ in range(draw(st.integers(0, 2))):
            point.exemplars.add(as_double=draw(doubles), time_unix_nano=draw(uints64),
                                trace_id=draw(maybe_trace_id), span_id=draw(maybe_span_id))

    for _ in range(draw(st.integers(0, 3))):
        m = sm.metrics.add(name=draw(st.text(max_size=8)), unit=draw(st.text(max_size=3)))
        kind = draw(st.sampled_from(["gauge", "sum", "histogram", "exponential_histogram",
                                     "summary"]))
        if kind in ("gauge", "sum"):
            point = getattr(m, kind).data_points.add(as_int=draw(ints64))
            if kind == "sum":
                m.sum.is_monotonic = draw(st.booleans())
                m.sum.aggregation_temporality = draw(st.integers(0, 2))
        elif kind == "histogram":
            point = m.histogram.data_points.add(count=draw(uints64), sum=draw(doubles))
            point.bucket_counts.extend(draw(st.lists(uints64, max_size=3)))
            point.explicit_bounds.extend(draw(st.lists(doubles, max_size=3)))
        elif kind == "exponential_histogram":
            point = m.exponential_histogram.data_points.add(scale=draw(st.integers(-10, 20)))
            point.positive.bucket_counts.extend(draw(st.lists(uints64, max_size=3)))
        else:
            point = m.summary.data_points.add(count=draw(uints64))
            point.quantile_values.add(quantile=0.5, value=draw(doubles))
        _set_attrs(point.attributes, draw(attributes))
        if kind != "summary":
            exemplars(point)
    return req


def _ids_in(obj, found):
    """Every id value found anywhere in a decoded JSON tree."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("traceId", "spanId", "parentSpanId"):
                found.append(value)
            else:
                _ids_in(value, found)
    elif isinstance(obj, list):
        for value in obj:
            _ids_in(value, found)
    return found


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(trace_requests().map(lambda r: (Signal.TRACES, r)),
                 log_requests().map(lambda r: (Signal.LOGS, r)),
                 metric_requests().map(lambda r: (Signal.METRICS, r))))
def test_round_trip_is_identical_and_ids_are_hex(case):
    signal, req = case
    data = encode_json(req)
    assert decode_json(signal, data) == req
    for value in _ids_in(json.loads(data), []):
        assert len(value) in (16, 32) and bytes.fromhex(value).hex() == value


# --------------------------------------------------------------------------- the SDK's protobuf


def test_sdk_spans_logs_and_metrics_survive_a_json_round_trip():
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import Link

    resource = Resource.create({"service.name": "svc", "ml.model.name": "m"})
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    logs = InMemoryLogRecordExporter()
    logger_provider = LoggerProvider(resource=resource)
    logger_provider.add_log_record_processor(SimpleLogRecordProcessor(logs))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(resource=resource, metric_readers=[reader])

    tracer = tracer_provider.get_tracer("t")
    histogram = meter_provider.get_meter("m").create_histogram("latency", unit="s")
    with tracer.start_as_current_span("parent") as parent:
        link = Link(parent.get_span_context(), {"why": "test"})
        with tracer.start_as_current_span("child", links=[link],
                                          attributes={"ml.prediction.score": 0.9, "n": [1, 2]}):
            logger_provider.get_logger("l").emit(body={"msg": "hi"}, severity_number=None,
                                                 attributes={"k": "v"})
            histogram.record(0.25, {"route": "/predict"})  # sampled span -> an exemplar

    requests = [
        (Signal.TRACES, encode_spans(spans.get_finished_spans())),
        (Signal.LOGS, encode_logs(logs.get_finished_logs())),
        (Signal.METRICS, encode_metrics(reader.get_metrics_data())),
    ]
    span = requests[0][1].resource_spans[0].scope_spans[0].spans[0]
    assert len(span.trace_id) == 16 and len(span.parent_span_id) == 8 and span.links
    record = requests[1][1].resource_logs[0].scope_logs[0].log_records[0]
    assert record.trace_id == span.trace_id
    point = requests[2][1].resource_metrics[0].scope_metrics[0].metrics[0].histogram.data_points[0]
    assert point.exemplars[0].trace_id == span.trace_id

    for signal, req in requests:
        data = encode_json(req)
        assert span.trace_id.hex().encode() in data
        assert decode_json(signal, data) == req
    tracer_provider.shutdown()
    logger_provider.shutdown()
    meter_provider.shutdown()


def test_unknown_enum_values_and_future_fields_are_kept_or_ignored():
    # A kind this build does not know is kept as its number; an unknown key is ignored.
    req = decode_json(Signal.TRACES, _one_span(kind=99, somethingNew=[1, 2]))
    assert req.resource_spans[0].scope_spans[0].spans[0].kind == 99


# --------------------------------------------------------------------------- json_format as the oracle

_ID_KEYS = {"traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id"}


def _ids(obj, convert):
    """Apply ``convert`` to every id anywhere in a JSON tree (ids only exist where OTLP
    puts them, so a blind walk is a fine oracle)."""
    if isinstance(obj, dict):
        return {k: (convert(v) if k in _ID_KEYS and isinstance(v, str) else _ids(v, convert))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [_ids(v, convert) for v in obj]
    return obj


def oracle_encode(message):
    """What protobuf's own JSON printer says, with the ids turned into hex."""
    obj = json_format.MessageToDict(message, use_integers_for_enums=True)
    return _ids(obj, lambda v: base64.b64decode(v).hex())


def oracle_decode(signal, obj):
    """What protobuf's own JSON parser makes of ``obj``, once hex ids are base64."""
    message = BATCH_TYPES[signal].message_type()
    json_format.ParseDict(_ids(obj, lambda v: base64.b64encode(bytes.fromhex(v)).decode()),
                          message, ignore_unknown_fields=True)
    return message


REQUESTS = st.one_of(trace_requests().map(lambda r: (Signal.TRACES, r)),
                     log_requests().map(lambda r: (Signal.LOGS, r)),
                     metric_requests().map(lambda r: (Signal.METRICS, r)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(REQUESTS)
def test_encoding_matches_json_format(case):
    _, req = case
    assert json.loads(encode_json(req)) == oracle_encode(req)


_INT64_KEYS = {"timeUnixNano", "startTimeUnixNano", "endTimeUnixNano", "observedTimeUnixNano",
               "asInt", "intValue", "count", "bucketCounts"}


def _loosen(obj, draw, key=""):
    """The liberties OTLP/JSON senders take: int64 as numbers, snake_case keys."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            name = "".join(f"_{c.lower()}" if c.isupper() else c for c in k)
            out[name if draw(st.booleans()) else k] = _loosen(v, draw, k)
        return out
    if isinstance(obj, list):
        return [_loosen(v, draw, key) for v in obj]
    if key in _INT64_KEYS and isinstance(obj, str) and draw(st.booleans()):
        return int(obj)
    return obj


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(REQUESTS, st.data())
def test_decoding_matches_json_format(case, data):
    signal, req = case
    obj = _loosen(oracle_encode(req), data.draw)
    assert decode_json(signal, json.dumps(obj)) == oracle_decode(signal, obj) == req


@settings(max_examples=300, deadline=None)
@given(JSON)
def test_whatever_json_format_accepts_decodes_the_same(value):
    obj = {"resourceSpans": [{"scopeSpans": [{"spans": [value]}]}]}
    try:
        expected = oracle_decode(Signal.TRACES, obj)
    except (json_format.ParseError, ValueError):
        return  # the oracle refuses it; we may be stricter or as strict
    try:
        got = decode_json(Signal.TRACES, json.dumps(obj))
    except ValueError as e:
        # Our one deliberate strictness: json_format takes a string or a list where a
        # message belongs (iterating it as if it were the object's keys, all unknown).
        assert "expected an object" in str(e)
        return
    assert got == expected


def test_enum_names_special_floats_and_null_are_understood():
    req = decode_json(Signal.METRICS, json.dumps({"resourceMetrics": [{"scopeMetrics": [{
        "metrics": [{"name": None, "sum": {
            "aggregationTemporality": "AGGREGATION_TEMPORALITY_DELTA", "isMonotonic": True,
            "dataPoints": [{"asDouble": "NaN"}, {"asDouble": "-Infinity"}, {"asInt": 3}]}}]}]}]}))
    m = req.resource_metrics[0].scope_metrics[0].metrics[0]
    assert m.name == "" and m.sum.aggregation_temporality == 1
    points = m.sum.data_points
    assert math.isnan(points[0].as_double) and points[1].as_double == -math.inf
    assert points[2].as_int == 3
    out = json.loads(encode_json(req))
    assert out["resourceMetrics"][0]["scopeMetrics"][0]["metrics"][0]["sum"]["dataPoints"][:2] == [
        {"asDouble": "NaN"}, {"asDouble": "-Infinity"}]


@pytest.mark.parametrize("value, needle", [
    ({"intValue": "12x"}, "intValue"),
    ({"intValue": str(2**63)}, "out of range"),
    ({"boolValue": "true"}, "true or false"),
    ({"bytesValue": "!!"}, "base64"),
    ({"stringValue": "a", "intValue": 1}, "oneof"),
])
def test_value_errors_name_the_field_path(value, needle):
    body = json.dumps({"resourceSpans": [{"resource": {"attributes": [
        {"key": "k", "value": value}]}}]})
    with pytest.raises(ValueError, match=needle) as err:
        decode_json(Signal.TRACES, body)
    if needle != "oneof":
        assert "resourceSpans[0].resource.attributes[0].value" in str(err.value)


def _nested_attribute(levels: int) -> bytes:
    """An attribute value that is an array in an array ... ``levels`` deep (written by
    hand: json.dumps itself gives up on deep nesting)."""
    value = '{"arrayValue":{"values":[' * levels + '{"stringValue":"x"}' + "]}}" * levels
    head, tail = '{"resourceSpans":[{"resource":{"attributes":[{"key":"k","value":', "}]}}]}"
    return (head + value + tail).encode()


def test_nesting_is_limited_where_protobuf_parsing_stops():
    # 48 nested arrays are the most that upb parses back from protobuf; JSON accepts
    # exactly as much, so whatever came in as JSON can travel on as protobuf.
    accepted = decode_json(Signal.TRACES, _nested_attribute(48))
    assert ExportTraceServiceRequest.FromString(accepted.SerializeToString()) == accepted
    value = AnyValue(string_value="x")
    for _ in range(49):
        outer = AnyValue()
        outer.array_value.values.add().CopyFrom(value)
        value = outer
    too_deep = ExportTraceServiceRequest()
    too_deep.resource_spans.add().resource.attributes.add(key="k").value.CopyFrom(value)
    with pytest.raises(DecodeError):
        ExportTraceServiceRequest.FromString(too_deep.SerializeToString())
    with pytest.raises(ValueError, match="nested more than"):
        decode_json(Signal.TRACES, _nested_attribute(49))
    with pytest.raises(ValueError, match="nested"):  # json.loads' own limit, here
        decode_json(Signal.TRACES, _nested_attribute(900))
