"""OTLP logs and spans as ECS documents, each pre-encoded as its two bulk NDJSON lines.

Field choices (ECS 8, as Kibana and Elastic APM read them):

- common: ``@timestamp`` (RFC 3339, nanosecond digits), ``data_stream.{type,dataset,
  namespace}``, ``event.dataset``, ``trace.id`` / ``span.id`` as lowercase hex;
  resource attributes with an ECS home (``service.name``, ``service.version``,
  ``deployment.environment`` -> ``service.environment``, ``host.name``, ...) go
  there, every other resource attribute goes to ``labels.<key>`` with dots turned
  into ``_`` (ECS labels are flat keywords); the item's own attributes go to
  ``attributes`` as one flat object keyed by the attribute name (nested maps become
  dotted keys), meant for a ``flattened`` mapping (see ``templates``).
- logs: ``message`` (the body; a structured body as JSON text), ``log.level``
  (severity text, or the name of the severity number's range), ``event.severity``
  (the severity number), ``log.logger`` (the instrumentation scope name).
- spans: ``@timestamp`` is the start, ``event.duration`` nanoseconds,
  ``event.outcome`` success / failure / unknown from the status, ``span.name``,
  ``span.kind``, ``span.status.message``, and the parent span as ``parent.id`` (the
  Elastic APM convention; ``transaction.id`` is not derived because OTLP does not say
  which span is a service's entry). Span events and links are not exported.

Documents get a deterministic ``_id`` so that a retried ``create`` answers 409
instead of storing a duplicate: a hash of trace id + span id for spans, and of the
serialised resource, scope and record for logs.

Resource- and scope-level fields are computed once per ResourceLogs / ScopeLogs, and
timestamps for a whole batch in one vectorised call.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from agent.exporters.elasticsearch.config import MAX_PART_BYTES, is_data_stream_part
from agent.pdata import LogBatch, TraceBatch, anyvalue_to_python

# OTel resource attribute -> ECS field.
RESOURCE_FIELDS: dict[str, tuple[str, ...]] = {
    "service.name": ("service", "name"),
    "service.version": ("service", "version"),
    "service.instance.id": ("service", "node", "name"),
    "deployment.environment": ("service", "environment"),
    "deployment.environment.name": ("service", "environment"),
    "telemetry.sdk.language": ("service", "language", "name"),
    "host.name": ("host", "name"),
    "host.id": ("host", "id"),
    "host.arch": ("host", "architecture"),
    "os.type": ("host", "os", "platform"),
    "os.description": ("host", "os", "full"),
    "process.pid": ("process", "pid"),
    "process.executable.name": ("process", "name"),
    "container.id": ("container", "id"),
    "container.name": ("container", "name"),
    "k8s.pod.name": ("kubernetes", "pod", "name"),
    "k8s.namespace.name": ("kubernetes", "namespace"),
    "cloud.provider": ("cloud", "provider"),
    "cloud.region": ("cloud", "region"),
}
ROUTING_DATASET = "data_stream.dataset"
ROUTING_NAMESPACE = "data_stream.namespace"
_ROUTING_KEYS = (ROUTING_DATASET, ROUTING_NAMESPACE)
# OTLP SeverityNumber ranges (1-4 trace, 5-8 debug, ...) -> log.level.
_LEVELS = ("trace", "debug", "info", "warn", "error", "fatal")
_SPAN_KINDS = ("unspecified", "internal", "server", "client", "producer", "consumer")
_OUTCOMES = ("unknown", "success", "failure")  # status code unset, ok, error
_STATUS_CODES = ("unset", "ok", "error")
_SANITISE = str.maketrans({c: "_" for c in '-\\/*?"<>| ,#:'})


@dataclass(slots=True)
class Document:
    """One bulk item: where it goes, its id, and its action + source NDJSON lines."""

    index: str
    id: str
    lines: bytes

    @property
    def source(self) -> bytes:
        """The document line (without the action line and the final newline)."""
        return self.lines.split(b"\n", 2)[1]


@dataclass(frozen=True)
class Routing:
    """The configured data stream parts and whether attributes may override them."""

    dataset: str
    namespace: str
    dynamic: bool


def sanitise_part(value: Any) -> str | None:
    """A routing attribute as a valid data stream part, or None when it cannot be one.

    Cut to ``MAX_PART_BYTES`` of UTF-8, not characters: Elasticsearch's index name
    limit is in bytes (see ``config.MAX_PART_BYTES``). A character the cut would split
    is left out whole.
    """
    if not isinstance(value, str):
        return None
    part = value.lower().translate(_SANITISE)
    encoded = part.encode()
    if len(encoded) > MAX_PART_BYTES:
        part = encoded[:MAX_PART_BYTES].decode("utf-8", "ignore")
    return part if is_data_stream_part(part) else None


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return str(value)


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON; bytes values become base64, NaN and infinities null (JSON
    has no such numbers, and Elasticsearch refuses a document that holds one)."""
    return orjson.dumps(obj, default=_json_default)


def flatten(attrs: Any) -> dict[str, Any]:
    """Repeated ``KeyValue`` -> one flat dict; nested maps become dotted keys."""
    out: dict[str, Any] = {}
    for kv in attrs:
        _flatten_into(out, kv.key, anyvalue_to_python(kv.value))
    return out


def _flatten_into(out: dict[str, Any], key: str, value: Any) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten_into(out, f"{key}.{k}", v)
    elif value is not None:
        out[key] = value


def _set_path(doc: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        doc = doc.setdefault(part, {})
    doc[path[-1]] = value


def resource_fields(attrs: dict[str, Any]) -> dict[str, Any]:
    """ECS fields and ``labels`` from one resource's attributes (routing keys excluded)."""
    out: dict[str, Any] = {}
    labels: dict[str, str] = {}
    for key, value in attrs.items():
        path = RESOURCE_FIELDS.get(key)
        if path is not None:
            _set_path(out, path, value)
        elif key not in _ROUTING_KEYS:
            labels[key.replace(".", "_")] = value if isinstance(value, str) else dumps(
                value).decode()
    if labels:
        out["labels"] = labels
    return out


def timestamps(ns: np.ndarray) -> list[str]:
    """Unix nanoseconds -> RFC 3339 UTC strings; 0 (unset) becomes now."""
    ns = np.where(ns > 0, ns, time.time_ns()).astype("datetime64[ns]")
    return [s + "Z" for s in np.datetime_as_string(ns, unit="ns").tolist()]


def _short_hash(*parts: bytes) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(len(p).to_bytes(4, "little"))  # length-prefixed: no ambiguous joins
        h.update(p)
    return h.hexdigest()


class _Router:
    """Resolves the data stream of each item, caching the per-resource/scope parts."""

    def __init__(self, kind: str, routing: Routing) -> None:
        self.kind = kind
        self.routing = routing

    def parts(self, attrs: dict[str, Any], base: tuple[str, str]) -> tuple[str, str]:
        if not self.routing.dynamic:
            return base
        ds = sanitise_part(attrs.get(ROUTING_DATASET)) or base[0]
        ns = sanitise_part(attrs.get(ROUTING_NAMESPACE)) or base[1]
        return ds, ns

    def stream(self, dataset: str, namespace: str) -> tuple[str, dict[str, str]]:
        return (f"{self.kind}-{dataset}-{namespace}",
                {"type": self.kind, "dataset": dataset, "namespace": namespace})


def _item(index: str, doc_id: str, doc: dict[str, Any]) -> Document:
    action = dumps({"create": {"_index": index, "_id": doc_id}})
    return Document(index, doc_id, action + b"\n" + dumps(doc) + b"\n")


def _strip_routing(attrs: dict[str, Any]) -> dict[str, Any]:
    if ROUTING_DATASET in attrs or ROUTING_NAMESPACE in attrs:
        return {k: v for k, v in attrs.items() if k not in _ROUTING_KEYS}
    return attrs


def log_documents(batch: LogBatch, routing: Routing) -> list[Document]:
    """One ECS document per log record, in batch order."""
    cols = batch.columns
    stamps = timestamps(cols.time)
    severities = cols.severity.tolist()
    docs: list[Document] = []
    scope: Any = None  # the scope whose encoded (resource, scope) prefix is `prefix`
    prefix: tuple[bytes, bytes] = (b"", b"")
    for i, (rl, rfields, sl, rec, attrs, index, stream) in enumerate(
            _walk(batch.request.resource_logs, "scope_logs", "log_records",
                  _Router("logs", routing), routing)):
        doc: dict[str, Any] = {"@timestamp": stamps[i], "data_stream": stream,
                               "event": {"dataset": stream["dataset"]}, **rfields}
        body = anyvalue_to_python(rec.body)
        if body is not None:
            doc["message"] = body if isinstance(body, str) else dumps(body).decode()
        log: dict[str, Any] = {}
        level = rec.severity_text or (
            _LEVELS[(severities[i] - 1) // 4] if 1 <= severities[i] <= 24 else "")
        if level:
            log["level"] = level
        if sl.scope.name:
            log["logger"] = sl.scope.name
        if log:
            doc["log"] = log
        if severities[i]:
            doc["event"]["severity"] = severities[i]
        if cols.trace_id[i]:
            doc["trace"] = {"id": cols.trace_id[i].hex()}
        if cols.span_id[i]:
            doc["span"] = {"id": cols.span_id[i].hex()}
        if attrs:
            doc["attributes"] = attrs
        if sl is not scope:  # encoded once per scope, not per record
            scope = sl
            prefix = (rl.resource.SerializeToString(deterministic=True),
                      sl.scope.SerializeToString(deterministic=True))
        doc_id = _short_hash(*prefix, rec.SerializeToString(deterministic=True))
        docs.append(_item(index, doc_id, doc))
    return docs


def span_documents(batch: TraceBatch, routing: Routing) -> list[Document]:
    """One ECS document per span, in batch order."""
    cols = batch.columns
    stamps = timestamps(cols.start)
    durations = np.maximum(cols.end - cols.start, 0).tolist()
    kinds = cols.kind.tolist()
    codes = cols.status_code.tolist()
    docs: list[Document] = []
    for i, (_rs, rfields, _ss, sp, attrs, index, stream) in enumerate(
            _walk(batch.request.resource_spans, "scope_spans", "spans",
                  _Router("traces", routing), routing)):
        code = codes[i] if 0 <= codes[i] <= 2 else 0
        span: dict[str, Any] = {
            "id": cols.span_id[i].hex(), "name": cols.name[i],
            "kind": _SPAN_KINDS[kinds[i]] if 0 <= kinds[i] < 6 else "unspecified",
            "status": {"code": _STATUS_CODES[code]},
        }
        if sp.status.message:
            span["status"]["message"] = sp.status.message
        doc: dict[str, Any] = {
            "@timestamp": stamps[i], "data_stream": stream,
            "event": {"dataset": stream["dataset"], "duration": durations[i],
                      "outcome": _OUTCOMES[code]},
            "trace": {"id": cols.trace_id[i].hex()}, "span": span, **rfields,
        }
        if cols.parent_span_id[i]:
            doc["parent"] = {"id": cols.parent_span_id[i].hex()}
        if attrs:
            doc["attributes"] = attrs
        docs.append(_item(index, _short_hash(cols.trace_id[i], cols.span_id[i]), doc))
    return docs


def _walk(resources: Any, scopes_field: str, items_field: str, router: _Router,
          routing: Routing) -> Iterator[tuple[Any, dict[str, Any], Any, Any, dict[str, Any],
                                               str, dict[str, str]]]:
    """Resource -> scope -> item, in batch order, with the routing of each level resolved.

    Yields ``(resource_x, resource_fields, scope_x, item, attributes, index, stream)``:
    the item's flattened attributes without the routing keys, and the data stream
    (index name and ``data_stream`` fields) the item goes to.
    """
    base = (routing.dataset, routing.namespace)
    for res in resources:
        rattrs = flatten(res.resource.attributes)
        rfields = resource_fields(rattrs)
        rparts = router.parts(rattrs, base)
        for scope in getattr(res, scopes_field):
            sparts = router.parts(flatten(scope.scope.attributes), rparts)
            for item in getattr(scope, items_field):
                attrs = flatten(item.attributes)
                index, stream = router.stream(*router.parts(attrs, sparts))
                yield res, rfields, scope, item, _strip_routing(attrs), index, stream
