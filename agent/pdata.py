"""Batches: the OTLP request message is the in-memory model.

A batch wraps the protobuf request it arrived as (``ExportTraceServiceRequest`` and
friends). Decode once at the edge, encode once at the edge. Fields the windowed
connectors need are extracted once per batch into columns (``TraceBatch.columns``),
cached on the batch and shared by every reader, as are the bytes it was received as
(``to_bytes``); a component that mutates the batch must call ``invalidate()``
afterwards, or exporters would send the batch as it was before.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from agent.component import Signal

if TYPE_CHECKING:
    from agent.columns import LogColumns, SpanColumns

ML_PREFIX = "ml."


def cached(fn: Any) -> Any:
    """A per-instance cached property without ``functools.cached_property``'s lock.

    On Python 3.11 ``cached_property`` holds one lock per class attribute, shared by
    every instance: a batch whose columns are extracted in a worker thread would stall
    ``batch.columns`` of every other batch on the event loop. Extraction is pure, so a
    rare duplicate computation is harmless. ``Batch.invalidate`` forgets the value.
    """
    name = fn.__name__

    def get(self: Any) -> Any:
        d = self.__dict__
        try:
            return d[name]
        except KeyError:
            value = d[name] = fn(self)
            return value

    get.__doc__ = fn.__doc__
    return property(get)


GENAI_MODEL = "gen_ai.request.model"


# --------------------------------------------------------------------------- values


def anyvalue_to_python(v: AnyValue) -> Any:
    """Convert an OTLP ``AnyValue`` into a plain Python value (None when unset)."""
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [anyvalue_to_python(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: anyvalue_to_python(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, which)


def python_to_anyvalue(value: Any, out: AnyValue | None = None) -> AnyValue:
    """Fill (or create) an ``AnyValue`` from a Python value."""
    out = out if out is not None else AnyValue()
    if isinstance(value, bool):
        out.bool_value = value
    elif isinstance(value, int):
        out.int_value = value
    elif isinstance(value, float):
        out.double_value = value
    elif isinstance(value, str):
        out.string_value = value
    elif isinstance(value, bytes):
        out.bytes_value = value
    elif isinstance(value, Mapping):
        out.kvlist_value.SetInParent()
        for k, item in value.items():
            python_to_anyvalue(item, out.kvlist_value.values.add(key=str(k)).value)
    elif isinstance(value, Iterable):
        out.array_value.SetInParent()
        for item in value:
            python_to_anyvalue(item, out.array_value.values.add())
    elif value is None:
        out.Clear()
    else:
        out.string_value = str(value)
    return out


def attributes_to_dict(attrs: Iterable[KeyValue]) -> dict[str, Any]:
    """Repeated ``KeyValue`` -> dict (last key wins, as in the SDKs)."""
    return {kv.key: anyvalue_to_python(kv.value) for kv in attrs}


def get_attribute(attrs: Iterable[KeyValue], key: str, default: Any = None) -> Any:
    """The value of one attribute, without building a dict."""
    for kv in attrs:
        if kv.key == key:
            return anyvalue_to_python(kv.value)
    return default


def set_attribute(attrs: Any, key: str, value: Any, *, overwrite: bool = True) -> bool:
    """Set ``key`` in a repeated ``KeyValue`` field. Returns True when it wrote."""
    for kv in attrs:
        if kv.key == key:
            if not overwrite:
                return False
            python_to_anyvalue(value, kv.value)
            return True
    python_to_anyvalue(value, attrs.add(key=key).value)
    return True


_SCORE = "ml.prediction.score"


def ml_attributes(attrs: Iterable[KeyValue]) -> dict[str, Any]:
    """The ``ml.*`` attributes (and ``gen_ai.request.model``) of one item.

    On the hot path of every reader of predictions, so it does the least Python work
    that gives the same values as ``anyvalue_to_python``: a key is skipped on a
    3-character slice, and a value is read from the field its key usually has (a
    double for scores and features, a string otherwise) -- one field read instead of
    ``WhichOneof`` and ``getattr``. A value that is not there (another type, or a
    zero / empty one) falls back to the general conversion.
    """
    out: dict[str, Any] = {}
    for kv in attrs:
        k = kv.key
        if k[:3] == ML_PREFIX or k == GENAI_MODEL:
            v = kv.value
            # "ml.f..." is the ml.feature. prefix: the one check that separates it cheaply.
            x = v.double_value if (k[3:4] == "f" or k == _SCORE) else v.string_value
            out[k] = x or anyvalue_to_python(v)
    return out


# --------------------------------------------------------------------------- batches


class Batch:
    """One OTLP export request of one signal. Subclasses fix the message type."""

    signal: ClassVar[Signal]
    message_type: ClassVar[type]

    def __init__(self, request: Any = None, *, byte_size: int | None = None,
                 raw: bytes | None = None) -> None:
        self._request = request if request is not None or raw is not None else self.message_type()
        self._byte_size = byte_size
        # The bytes the request was parsed from, while it is unchanged: an exporter or a
        # persistent queue sends or stores them instead of serialising again.
        self._raw = raw

    @property
    def request(self) -> Any:
        """The protobuf request. A merged batch parses its bytes only when read."""
        if self._request is None:
            msg = self.message_type()
            msg.ParseFromString(self._raw)
            self._request = msg
        return self._request

    @property
    def received_bytes(self) -> bytes | None:
        """The bytes the batch arrived as, while it is unchanged (else None)."""
        return self._raw

    @property
    def parsed_request(self) -> Any:
        """The request if it is parsed already (else None: a merged batch until read)."""
        return self._request

    @classmethod
    def from_bytes(cls, data: bytes) -> Batch:
        """Parse a serialised request (raises ``google.protobuf.message.DecodeError``)."""
        msg = cls.message_type()
        msg.ParseFromString(data)
        raw = data if isinstance(data, bytes) else bytes(data)
        return cls(msg, byte_size=len(raw), raw=raw)

    def to_bytes(self) -> bytes:
        """The serialised request: the received bytes while the batch is unchanged."""
        if self._raw is None:
            self._raw = self.request.SerializeToString()
        return self._raw

    @property
    def byte_size(self) -> int:
        """Serialised size in bytes (computed once unless the batch changes)."""
        if self._byte_size is None:
            self._byte_size = self.request.ByteSize()
        return self._byte_size

    @property
    def item_count(self) -> int:
        raise NotImplementedError

    def resources(self) -> Any:
        """The repeated ``Resource*`` field (resource_spans / resource_metrics / ...)."""
        raise NotImplementedError

    def copy(self) -> Batch:
        """A deep copy, for a consumer that mutates while others read."""
        msg = self.message_type()
        msg.CopyFrom(self.request)
        return type(self)(msg, byte_size=self._byte_size, raw=self._raw)

    def invalidate(self) -> None:
        """Forget cached columns, size and bytes after a mutation. Every mutation must
        call it: until then ``to_bytes`` returns what the batch was before."""
        self._byte_size = None
        self._raw = None
        for name in ("columns", "item_count_cached"):
            self.__dict__.pop(name, None)

    def extend(self, other: Batch) -> None:
        """Append ``other``'s resources to this batch (the batch processor merges)."""
        if self._raw is not None and other._raw is not None:
            # A request is one repeated field, so the concatenated encodings encode the
            # merged request. Copying protobuf messages would cost as much as parsing;
            # exporters and queues only need the bytes, so parse only if one reads it.
            items = self.item_count + other.item_count
            raw = self._raw + other._raw
            self.invalidate()
            self._request = None
            self._raw = raw
            self._byte_size = len(raw)
            self.__dict__["item_count_cached"] = items
            return
        self.resources().extend(other.resources())
        self.invalidate()

    def resources_replaced(self, new: list[bytes | None]) -> None:
        """Say that only resources changed: ``new[i]`` is the i-th resource's new
        encoding (None: unchanged). Like ``invalidate``, but the received bytes are kept
        with those resources spliced in, so the batch is not serialised again."""
        raw = self._raw
        self.invalidate()
        if raw is not None:
            self._raw = splice_resources(raw, new) if any(n is not None for n in new) else raw
            self._byte_size = len(self._raw)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} items={self.item_count} bytes={self.byte_size}>"


# --------------------------------------------------------------------------- wire splicing
# Every Export*ServiceRequest is one repeated field 1 (Resource{Spans,Metrics,Logs}) whose
# own field 1 is the Resource. Replacing a resource in the encoded request only needs
# the top-level framing walked, a few varints per resource, not the items re-encoded.

_RESOURCE_TAG = 0x0A  # field 1, length-delimited


def read_varint(buf: Any, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field_end(buf: Any, pos: int, tag: int) -> int:
    wire = tag & 7
    if wire == 2:
        length, pos = read_varint(buf, pos)
        return pos + length
    if wire == 0:
        return read_varint(buf, pos)[1]
    if wire == 1:
        return pos + 8
    if wire == 5:
        return pos + 4
    raise ValueError(f"unsupported wire type {wire}")


def splice_resources(raw: bytes, new: list[bytes | None]) -> bytes:
    """``raw`` (an encoded export request) with its i-th Resource replaced by ``new[i]``."""
    mv = memoryview(raw)
    out: list[Any] = []
    pos, i, n = 0, 0, len(raw)
    while pos < n:
        tag, body_start = read_varint(mv, pos)
        end = field_end(mv, body_start, tag)
        if tag != _RESOURCE_TAG or i >= len(new) or new[i] is None:
            out.append(mv[pos:end])
        else:
            _, start = read_varint(mv, body_start)
            parts: list[Any] = [bytes([_RESOURCE_TAG]), _varint(len(new[i])), new[i]]  # type: ignore[arg-type]
            p = start
            while p < end:  # every field but the old resource, as it was
                t, q = read_varint(mv, p)
                e = field_end(mv, q, t)
                if t != _RESOURCE_TAG:
                    parts.append(mv[p:e])
                p = e
            inner = b"".join(parts)
            out.append(bytes([_RESOURCE_TAG]) + _varint(len(inner)) + inner)
        if tag == _RESOURCE_TAG:
            i += 1
        pos = end
    return b"".join(out)


class TraceBatch(Batch):
    signal = Signal.TRACES
    message_type = ExportTraceServiceRequest

    def resources(self) -> Any:
        return self.request.resource_spans

    @property
    def item_count(self) -> int:
        return self.item_count_cached

    @cached
    def item_count_cached(self) -> int:
        return sum(len(ss.spans) for rs in self.request.resource_spans for ss in rs.scope_spans)

    @cached
    def columns(self) -> SpanColumns:
        from agent.columns import SpanColumns

        return SpanColumns.of(self)


class MetricBatch(Batch):
    signal = Signal.METRICS
    message_type = ExportMetricsServiceRequest

    def resources(self) -> Any:
        return self.request.resource_metrics

    @property
    def item_count(self) -> int:
        return self.item_count_cached

    @cached
    def item_count_cached(self) -> int:
        return sum(data_point_count(m) for _, _, m in iter_metrics(self.request))


class LogBatch(Batch):
    signal = Signal.LOGS
    message_type = ExportLogsServiceRequest

    def resources(self) -> Any:
        return self.request.resource_logs

    @property
    def item_count(self) -> int:
        return self.item_count_cached

    @cached
    def item_count_cached(self) -> int:
        return sum(len(sl.log_records) for rl in self.request.resource_logs for sl in rl.scope_logs)

    @cached
    def columns(self) -> LogColumns:
        from agent.columns import LogColumns

        return LogColumns.extract(self.request)


BATCH_TYPES: dict[Signal, type[Batch]] = {
    Signal.TRACES: TraceBatch,
    Signal.METRICS: MetricBatch,
    Signal.LOGS: LogBatch,
}


def batch_from_bytes(signal: Signal, data: bytes) -> Batch:
    return BATCH_TYPES[signal].from_bytes(data)


# --------------------------------------------------------------------------- metrics helpers

_POINT_FIELDS = {
    "gauge": "data_points",
    "sum": "data_points",
    "histogram": "data_points",
    "exponential_histogram": "data_points",
    "summary": "data_points",
}


def iter_metrics(request: ExportMetricsServiceRequest) -> Iterator[tuple[Any, Any, Any]]:
    """Yield ``(resource_metrics, scope_metrics, metric)`` for every metric."""
    for rm in request.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                yield rm, sm, m


def data_points(metric: Any) -> Any:
    """The repeated data point field of a metric, whatever its type (empty if unset)."""
    which = metric.WhichOneof("data")
    if which is None:
        return ()
    return getattr(metric, which).data_points


def data_point_count(metric: Any) -> int:
    return len(data_points(metric))


# --------------------------------------------------------------------------- columns


def service_name(resource: Any) -> str:
    """``service.name`` of a resource, or ``unknown_service`` as the SDKs default."""
    return get_attribute(resource.attributes, "service.name") or "unknown_service"
