"""Columns: the per-item fields windowed connectors read, extracted once per batch.

``TraceBatch.columns`` and ``LogBatch.columns`` build them on first use and share them
with every later reader (DESIGN.md §2).

Span columns come from the bytes a batch arrived as, parsed with a schema of their own
(``_schema``) that has the span fields the columns need as *repeated* fields of one
*singular* message per scope. The protobuf wire rules do the rest: every occurrence
of a singular message field is merged into the one before, and merging appends
repeated fields, so parsing a scope's spans leaves each column as one array that
upb filled in C — no Python object per span, no field read per span. A scope's
columns are aligned (entry ``i`` of each is span ``i``'s) when every span carried
every field exactly once; a field proto3 left out because it held its default (a
span kind of 0, an empty name) shows as a short column, and that scope is read
span by span instead. Span and parent ids are read only for the spans that need
them (``spans_at``): parent ids cannot be columns, as root spans have none.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from operator import attrgetter
from typing import Any

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Status

from agent.pdata import (
    TraceBatch,
    cached,
    field_end,
    read_varint,
    service_name,
)

_INT64_MAX = np.iinfo(np.int64).max
_DECODED_CACHE = 4096  # distinct encoded statuses / resources remembered


def _times(values: Iterable[int], n: int) -> np.ndarray:
    """Unix-nanosecond times as int64; fixed64 values beyond int64 are clamped, not fatal."""
    return np.minimum(np.fromiter(values, dtype=np.uint64, count=n), _INT64_MAX).astype(np.int64)


# --------------------------------------------------------------------------- schema

_SPAN_FIELDS = (  # (name, number in opentelemetry.proto.trace.v1.Span, type)
    ("trace_id", 1, "BYTES"), ("span_id", 2, "BYTES"), ("parent_span_id", 4, "BYTES"),
    ("name", 5, "STRING"), ("kind", 6, "INT32"), ("start_time_unix_nano", 7, "FIXED64"),
    ("end_time_unix_nano", 8, "FIXED64"),
    # The Status message, kept encoded: decoded once per distinct value (_StatusCodes).
    ("status", 15, "BYTES"))
# The columns of a scope: every Span field but the parent id (absent from root spans).
_COLUMN_FIELDS = tuple(f for f in _SPAN_FIELDS if f[0] != "parent_span_id")


def _schema() -> tuple[Any, Any]:
    """``(Request, SpanList)``: an ExportTraceServiceRequest read as columns (see the
    module docstring), and a ScopeSpans read span by span, both with only the fields
    above; every other field stays unknown bytes. Field numbers are OTLP's."""
    f = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="mlagent/columns.proto",
                                               package="mlagent.columns", syntax="proto3")

    def message(name: str, fields: Iterable[tuple[str, int, str]], label: int) -> None:
        m = proto.message_type.add(name=name)
        for field_name, number, kind in fields:
            fd = m.field.add(name=field_name, number=number, label=label)
            if kind.startswith("."):
                fd.type, fd.type_name = f.TYPE_MESSAGE, kind
            else:
                fd.type = getattr(f, f"TYPE_{kind}")

    optional, repeated = f.LABEL_OPTIONAL, f.LABEL_REPEATED
    message("Span", _SPAN_FIELDS, optional)
    message("SpanList", [("spans", 2, ".mlagent.columns.Span")], repeated)
    message("Columns", _COLUMN_FIELDS, repeated)
    message("ScopeColumns", [("spans", 2, ".mlagent.columns.Columns")], optional)
    m = proto.message_type.add(name="ResourceColumns")
    m.field.add(name="resource", number=1, label=optional, type=f.TYPE_BYTES)
    m.field.add(name="scope_spans", number=2, label=repeated, type=f.TYPE_MESSAGE,
                type_name=".mlagent.columns.ScopeColumns")
    message("Request", [("resource_spans", 1, ".mlagent.columns.ResourceColumns")], repeated)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return tuple(message_factory.GetMessageClass(pool.FindMessageTypeByName(
        f"mlagent.columns.{name}")) for name in ("Request", "SpanList"))  # type: ignore[return-value]


_ColumnsRequest, _SpanList = _schema()


class _StatusCodes(dict):
    """Encoded ``Status`` -> its code. Statuses repeat (empty, OK, ERROR), so nearly
    every span is one C-level dict hit; an unseen one (an error message) is parsed."""

    def __missing__(self, blob: bytes) -> int:
        code = int(Status.FromString(blob).code) if blob else 0
        if len(self) < _DECODED_CACHE:
            self[blob] = code
        return code


class _ServiceNames(dict):
    """Encoded ``Resource`` -> its service name (resources repeat batch after batch)."""

    def __missing__(self, blob: bytes) -> str:
        name = service_name(Resource.FromString(blob))
        if len(self) < _DECODED_CACHE:
            self[blob] = name
        return name


_status_codes = _StatusCodes()
_service_names = _ServiceNames()
_trace_id, _span_id, _parent_span_id = (attrgetter("trace_id"), attrgetter("span_id"),
                                        attrgetter("parent_span_id"))
_name, _kind, _status, _status_code = (attrgetter("name"), attrgetter("kind"),
                                       attrgetter("status"), attrgetter("status.code"))
_start, _end = attrgetter("start_time_unix_nano"), attrgetter("end_time_unix_nano")


# --------------------------------------------------------------------------- wire framing


def _scope_ranges(raw: bytes) -> list[tuple[int, int]]:
    """Where each ScopeSpans of an encoded request lies in ``raw``, in order: a walk
    of the framing of resources and scopes only (a few varints each)."""
    mv = memoryview(raw)
    out: list[tuple[int, int]] = []
    pos, n = 0, len(raw)
    while pos < n:
        tag, pos = read_varint(mv, pos)
        if tag != 0x0A:  # resource_spans (1, length-delimited)
            pos = field_end(mv, pos, tag)
            continue
        length, pos = read_varint(mv, pos)
        end = pos + length
        while pos < end:
            tag, pos = read_varint(mv, pos)
            if tag == 0x12:  # scope_spans (2, length-delimited)
                length, pos = read_varint(mv, pos)
                out.append((pos, pos + length))
                pos += length
            else:
                pos = field_end(mv, pos, tag)
    return out


# --------------------------------------------------------------------------- spans


@dataclass
class SpanColumns:
    """Per-span fields of one trace batch, extracted once, in batch order.

    ``resource_index`` maps each span to its ResourceSpans; per-resource values
    (``services``) are looked up through it. Times are Unix nanoseconds. Ids beyond
    the trace id are read on demand: ``spans_at`` for a few spans, ``span_id`` and
    ``parent_span_id`` for all of them.
    """

    n: int
    resource_index: np.ndarray  # int32
    services: list[str]  # per resource
    trace_id: list[bytes]
    name: list[str]
    kind: np.ndarray  # int32, SpanKind
    status_code: np.ndarray  # int32, 0 unset, 1 ok, 2 error
    start: np.ndarray  # int64 ns
    end: np.ndarray  # int64 ns
    # Index of each scope's first span (and n at the end), and a loader of one
    # scope's spans as messages with at least the three ids.
    _scope_start: np.ndarray
    _load_scope: _ScopeLoader
    _span_ids: list[Sequence[bytes] | None]  # per scope, when its columns were aligned

    @classmethod
    def of(cls, batch: TraceBatch) -> SpanColumns:
        """The columns of a trace batch: from the bytes it arrived as while it is
        unchanged, from its request otherwise."""
        raw, parsed = batch.received_bytes, batch.parsed_request
        if raw is None:
            return cls._of_request(batch.request)
        req = _ColumnsRequest.FromString(raw)
        services = [_service_names[rs.resource] for rs in req.resource_spans]
        scopes = [(i, ss.spans) for i, rs in enumerate(req.resource_spans)
                  for ss in rs.scope_spans]
        load = _ScopeLoader(raw, parsed)
        parts = [_aligned(c) or _per_span(load.raw_scope(k), True)
                 for k, (_, c) in enumerate(scopes)]
        if sum(len(p.trace_id) for p in parts) != batch.item_count:
            # A span with no column field at all (an empty message) hides in every
            # column of its scope: read them all span by span.
            parts = [_per_span(load.raw_scope(k), True) for k in range(len(scopes))]
        return cls._assemble(services, [i for i, _ in scopes], parts, load)

    @classmethod
    def _of_request(cls, request: Any) -> SpanColumns:
        """The columns of a parsed (full) request, span by span."""
        services = [service_name(rs.resource) for rs in request.resource_spans]
        load = _ScopeLoader(None, request)
        scopes = [i for i, rs in enumerate(request.resource_spans) for _ in rs.scope_spans]
        parts = [_per_span(load(k), False) for k in range(len(scopes))]
        return cls._assemble(services, scopes, parts, load)

    @classmethod
    def _assemble(cls, services: list[str], scope_resource: list[int],
                  parts: list[_Part], load: _ScopeLoader) -> SpanColumns:
        counts = np.fromiter((len(p.trace_id) for p in parts), dtype=np.int64,
                             count=len(parts))
        n = int(counts.sum())
        start = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum(counts, out=start[1:])

        def cat(field: str) -> Any:
            if len(parts) == 1:
                return getattr(parts[0], field)
            columns = [getattr(p, field) for p in parts]
            if isinstance(columns[0], list):
                return list(chain.from_iterable(columns))
            return np.concatenate(columns)

        empty_int = np.zeros(0, dtype=np.int32)
        return cls(
            n=n,
            resource_index=np.repeat(np.asarray(scope_resource, dtype=np.int32), counts),
            services=services,
            trace_id=cat("trace_id") if parts else [],
            name=cat("name") if parts else [],
            kind=cat("kind") if parts else empty_int,
            status_code=cat("status_code") if parts else empty_int,
            start=cat("start") if parts else np.zeros(0, dtype=np.int64),
            end=cat("end") if parts else np.zeros(0, dtype=np.int64),
            _scope_start=start,
            _load_scope=load,
            _span_ids=[p.span_ids for p in parts],
        )

    def _locate(self, index: Sequence[int]) -> zip[tuple[int, int]]:
        """``(scope, position in the scope)`` of each batch position in ``index``."""
        idx = np.asarray(index, dtype=np.int64)
        scope = np.searchsorted(self._scope_start, idx, side="right") - 1
        return zip(scope.tolist(), (idx - self._scope_start[scope]).tolist(), strict=True)

    def spans_at(self, index: Sequence[int]) -> list[Any]:
        """Span messages at ``index`` (batch positions), each with at least
        ``trace_id``, ``span_id`` and ``parent_span_id``."""
        load = self._load_scope
        return [load(k)[j] for k, j in self._locate(index)]

    def span_ids_at(self, index: Sequence[int]) -> list[bytes]:
        """The span ids at ``index``: from a scope's span id column where it has
        one (no span read), else from its spans."""
        ids, load = self._span_ids, self._load_scope
        return [ids[k][j] if ids[k] is not None else load(k)[j].span_id  # type: ignore[index]
                for k, j in self._locate(index)]

    @cached
    def span_id(self) -> list[bytes]:
        return self.span_ids_at(range(self.n))

    @cached
    def parent_span_id(self) -> list[bytes]:
        return list(map(_parent_span_id, self.spans_at(range(self.n))))

    @property
    def service(self) -> list[str]:
        """Service name per span."""
        s = self.services
        return [s[i] for i in self.resource_index.tolist()]


class _ScopeLoader:
    """One scope's spans, by scope number, as messages with at least the three ids:
    from the batch's parsed request when it has one (nothing parsed again), else
    that scope's bytes parsed span by span. Scopes are loaded once, when asked for."""

    def __init__(self, raw: bytes | None, parsed: Any) -> None:
        self._raw = raw
        self._scopes = None if parsed is None else [
            ss.spans for rs in parsed.resource_spans for ss in rs.scope_spans]
        self._ranges: list[tuple[int, int]] = []
        self._loaded: dict[int, Sequence[Any]] = {}

    def __call__(self, k: int) -> Sequence[Any]:
        return self._scopes[k] if self._scopes is not None else self.raw_scope(k)

    def raw_scope(self, k: int) -> Sequence[Any]:
        """Scope ``k`` parsed span by span from the raw bytes (status still encoded)."""
        spans = self._loaded.get(k)
        if spans is None:
            assert self._raw is not None
            if not self._ranges:
                self._ranges = _scope_ranges(self._raw)
            a, b = self._ranges[k]
            spans = self._loaded[k] = _SpanList.FromString(self._raw[a:b]).spans
        return spans


@dataclass
class _Part:
    """One scope's columns."""

    trace_id: list[bytes]
    name: list[str]
    kind: np.ndarray
    status_code: np.ndarray
    start: np.ndarray
    end: np.ndarray
    span_ids: Sequence[bytes] | None = None  # the merged column, read by index


def _aligned(c: Any) -> _Part | None:
    """A scope's merged columns (see the module docstring), or None when some column
    is not aligned with the others (a span left a field out, or repeated it)."""
    n = len(c.trace_id)
    kinds, statuses = len(c.kind), len(c.status)
    if (len(c.name) != n or len(c.start_time_unix_nano) != n
            or len(c.end_time_unix_nano) != n or len(c.span_id) != n
            or kinds not in (0, n) or statuses not in (0, n)):
        return None
    return _Part(
        trace_id=list(c.trace_id),
        name=list(c.name),
        # Enums are int32 on the wire: a sender may put any value there. None at all
        # means every span left it at 0.
        kind=np.fromiter(c.kind, dtype=np.int32, count=n) if kinds
        else np.zeros(n, dtype=np.int32),
        status_code=np.fromiter(map(_status_codes.__getitem__, c.status), dtype=np.int32,
                                count=n) if statuses else np.zeros(n, dtype=np.int32),
        start=_times(c.start_time_unix_nano, n),
        end=_times(c.end_time_unix_nano, n),
        span_ids=c.span_id,
    )


def _per_span(spans: Sequence[Any], encoded_status: bool) -> _Part:
    """A scope's columns read span by span (``spans``: OTLP Span messages, or this
    module's ``Span`` whose status is still encoded)."""
    n = len(spans)
    status = map(_status_codes.__getitem__, map(_status, spans)) if encoded_status \
        else map(_status_code, spans)
    return _Part(
        trace_id=list(map(_trace_id, spans)),
        name=list(map(_name, spans)),
        kind=np.fromiter(map(_kind, spans), dtype=np.int32, count=n),
        status_code=np.fromiter(status, dtype=np.int32, count=n),
        start=_times(map(_start, spans), n),
        end=_times(map(_end, spans), n),
    )


# --------------------------------------------------------------------------- logs


@dataclass
class LogColumns:
    """Per-record fields of one log batch, extracted once, in batch order."""

    n: int
    resource_index: np.ndarray
    services: list[str]
    trace_id: list[bytes]
    span_id: list[bytes]
    time: np.ndarray  # int64 ns (observed time when time is unset)
    severity: np.ndarray  # int32

    @classmethod
    def extract(cls, request: Any) -> LogColumns:
        services: list[str] = []
        ridx: list[int] = []
        recs: list[Any] = []
        for i, rl in enumerate(request.resource_logs):
            services.append(service_name(rl.resource))
            for sl in rl.scope_logs:
                group = sl.log_records
                recs.extend(group)
                ridx.extend([i] * len(group))
        n = len(recs)
        return cls(
            n=n,
            resource_index=np.asarray(ridx, dtype=np.int32),
            services=services,
            trace_id=[r.trace_id for r in recs],
            span_id=[r.span_id for r in recs],
            time=_times((r.time_unix_nano or r.observed_time_unix_nano for r in recs), n),
            severity=np.fromiter((r.severity_number for r in recs), dtype=np.int32, count=n),
        )

    @property
    def service(self) -> list[str]:
        s = self.services
        return [s[i] for i in self.resource_index.tolist()]
