"""A strict contract server for the Elasticsearch bulk API, for tests.

No Elasticsearch can be installed here, so tests run against this server, written
from the bulk API contract in ``/work/shared/specs/PROTOCOLS.md`` and strict enough
that the official ``elasticsearch`` Python client (v8) accepts it:

- ``GET /`` (and ``HEAD /``) answer the cluster info document;
- ``PUT`` and ``POST`` on ``/_bulk`` and ``/<index>/_bulk``; ``Content-Type`` must be
  ``application/x-ndjson`` or the client's ``application/vnd.elasticsearch+x-ndjson``
  (406 otherwise); ``Content-Encoding: gzip`` is undone; the body must end with a
  newline (400 otherwise); every action line must be one of index/create/delete/
  update with a document line after it (but delete);
- index names are checked as Elasticsearch checks them: lowercase, none of
  ``\\/*?"<>| ,#:``, not starting with ``_ - +``, at most 255 bytes (UTF-8);
- indices named ``logs|metrics|traces-<dataset>-<namespace>`` are data streams:
  only ``create`` is accepted and every document needs ``@timestamp``; the name of
  the first backing index (``.ds-<name>-<yyyy.mm.dd>-000001``) must fit in 255 bytes
  too, or the data stream cannot be created;
- ``create`` of an existing ``_id`` is 409 ``version_conflict_engine_exception``;
- every response carries ``X-Elastic-Product: Elasticsearch``;
- ``PUT /_index_template/<name>`` stores a template (``index_patterns`` required).

Faults are scripted through ``ElasticsearchContract.faults``; an outage is
``await server.stop()`` followed by ``await server.start()`` (same port, documents
kept). What was stored is in ``documents()``.
"""

from __future__ import annotations

import json
import re
import ssl
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

from aiohttp import web

ACCEPTED_CONTENT_TYPES = ("application/x-ndjson", "application/vnd.elasticsearch+x-ndjson")
DATA_STREAM_RE = re.compile(r"^(logs|metrics|traces)-[^-]+-[^-]+$")
INVALID_INDEX_CHARS = set('\\/*?"<>| ,#:')
ACTIONS = ("index", "create", "delete", "update")
MAX_INDEX_NAME_BYTES = 255

INFO = {
    "name": "es-contract",
    "cluster_name": "es-contract",
    "cluster_uuid": "k3m6tTnKQ-2rAa7xVbRl3g",
    "version": {
        "number": "8.15.0",
        "build_flavor": "default",
        "build_type": "docker",
        "build_hash": "1a77947f34deddb41af25e6f0ddb8e830159c179",
        "build_date": "2024-08-05T10:05:34.233336849Z",
        "build_snapshot": False,
        "lucene_version": "9.11.1",
        "minimum_wire_compatibility_version": "7.17.0",
        "minimum_index_compatibility_version": "7.0.0",
    },
    "tagline": "You Know, for Search",
}


@dataclass
class Faults:
    """Scripted misbehaviour.

    ``item_429_attempts``: each document (by index and ``_id``) is answered 429 on its
    first K attempts; only documents whose line contains ``item_429_marker`` when that
    is set. ``reject_marker``: a document whose line contains it is answered
    400 ``document_parsing_exception``. ``item_500_marker``: a document whose line
    contains it is answered 500 ``fail_processor_exception``, every time, as an ingest
    pipeline's ``fail`` processor answers. ``fail_requests``: the next N bulk
    requests are answered 503; only requests whose (decoded) body contains
    ``fail_requests_marker`` when that is set. ``max_body_bytes``: larger bulk bodies
    (as sent) are answered 413.
    """

    item_429_attempts: int = 0
    item_429_marker: str | None = None
    reject_marker: str | None = None
    item_500_marker: str | None = None
    fail_requests: int = 0
    fail_requests_marker: str | None = None
    max_body_bytes: int | None = None


def _error(status: int, etype: str, reason: str) -> web.Response:
    body = {"error": {"root_cause": [{"type": etype, "reason": reason}], "type": etype,
                      "reason": reason}, "status": status}
    return web.json_response(body, status=status)


def _backing_index(stream: str) -> str:
    """The name Elasticsearch gives a new data stream's first backing index."""
    return f".ds-{stream}-{time.strftime('%Y.%m.%d', time.gmtime())}-000001"


class BulkRequestError(Exception):
    """A whole-request 400, as Elasticsearch answers a malformed bulk body."""


class ElasticsearchContract:
    """The server. ``indices`` maps index (or data stream) name -> ``_id`` -> document."""

    def __init__(self) -> None:
        self.indices: dict[str, dict[str, dict[str, Any]]] = {}
        self.templates: dict[str, dict[str, Any]] = {}
        self.faults = Faults()
        self.bulk_requests = 0
        # Per bulk request that got as far as parsing: how many operations it held,
        # and the request headers of the last one.
        self.bulk_sizes: list[int] = []
        self.last_headers: dict[str, str] = {}
        self.attempts: Counter[tuple[str, str]] = Counter()
        self.port = 0
        self.scheme = "http"
        self._seq_no = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def documents(self, index: str | None = None) -> list[dict[str, Any]]:
        """Stored documents, of one index or of all."""
        names = [index] if index is not None else sorted(self.indices)
        return [d for n in names for d in self.indices.get(n, {}).values()]

    # ------------------------------------------------------------------ lifecycle

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> None:
        """Listen on 127.0.0.1 (a free port the first time, the same port after a stop);
        HTTPS with ``ssl_context``."""
        self.scheme = "https" if ssl_context is not None else "http"
        # Elasticsearch's http.max_content_length default; aiohttp's own is 1 MiB.
        app = web.Application(client_max_size=100 * 2**20)
        app.on_response_prepare.append(self._product_header)
        app.router.add_get("/", self._info)
        for method in ("PUT", "POST"):
            app.router.add_route(method, "/_bulk", self._bulk)
            app.router.add_route(method, "/{index}/_bulk", self._bulk)
        app.router.add_put("/_index_template/{name}", self._put_template)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=ssl_context).start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @staticmethod
    async def _product_header(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["X-Elastic-Product"] = "Elasticsearch"

    async def _info(self, request: web.Request) -> web.Response:
        return web.json_response(INFO)

    async def _put_template(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "parse_exception", "request body is required")
        if not isinstance(body, dict) or not body.get("index_patterns"):
            return _error(400, "action_request_validation_exception",
                          "Validation Failed: 1: index patterns are missing;")
        self.templates[request.match_info["name"]] = body
        return web.json_response({"acknowledged": True})

    # ------------------------------------------------------------------ bulk

    async def _bulk(self, request: web.Request) -> web.Response:
        self.bulk_requests += 1
        ctype = request.headers.get("Content-Type", "")
        if ctype.split(";")[0].strip().lower() not in ACCEPTED_CONTENT_TYPES:
            return _error(406, "media_type_header_exception",
                          f"Content-Type header [{ctype}] is not supported")
        if (self.faults.max_body_bytes is not None
                and (request.content_length or 0) > self.faults.max_body_bytes):
            return web.Response(status=413, text="Request Entity Too Large")
        body = await request.read()  # aiohttp undoes Content-Encoding: gzip
        marker = self.faults.fail_requests_marker
        if self.faults.fail_requests > 0 and (marker is None or marker.encode() in body):
            self.faults.fail_requests -= 1
            return _error(503, "unavailable_shards_exception", "primary shard is not active")
        try:
            ops = self._parse(body, request.match_info.get("index"))
        except BulkRequestError as e:
            return _error(400, "illegal_argument_exception", str(e))
        self.bulk_sizes.append(len(ops))
        self.last_headers = dict(request.headers)
        items = [self._apply(*op) for op in ops]
        errors = any(next(iter(i.values()))["status"] >= 300 for i in items)
        return web.json_response({"took": 1, "errors": errors, "items": items})

    def _parse(self, body: bytes, default_index: str | None) -> list[tuple[str, dict, str | None]]:
        """``[(action, metadata, document line)]``, or a whole-request error."""
        if not body:
            raise BulkRequestError("request body is required")
        if not body.endswith(b"\n"):
            raise BulkRequestError("The bulk request must be terminated by a newline [\\n]")
        lines = body.decode("utf-8").split("\n")[:-1]
        ops = []
        i = 0
        while i < len(lines):
            try:
                action = json.loads(lines[i])
            except ValueError:
                raise BulkRequestError(f"Malformed action/metadata line [{i + 1}]") from None
            if not isinstance(action, dict) or len(action) != 1:
                raise BulkRequestError(f"Malformed action/metadata line [{i + 1}], expected "
                                       "a single action")
            (op, meta), = action.items()
            if op not in ACTIONS or not isinstance(meta, dict):
                raise BulkRequestError(f"Malformed action/metadata line [{i + 1}], expected "
                                       f"one of {ACTIONS} but found [{op}]")
            meta = dict(meta)
            meta.setdefault("_index", default_index)
            if not meta["_index"]:
                raise BulkRequestError("Validation Failed: 1: index is missing;")
            if op == "delete":
                ops.append((op, meta, None))
                i += 1
                continue
            if i + 1 >= len(lines):
                raise BulkRequestError(f"The bulk request action on line [{i + 1}] has no "
                                       "document line")
            ops.append((op, meta, lines[i + 1]))
            i += 2
        return ops

    def _apply(self, op: str, meta: dict[str, Any], line: str | None) -> dict[str, Any]:
        index = meta["_index"]
        doc_id = meta.get("_id") or uuid.uuid4().hex

        def fail(status: int, etype: str, reason: str) -> dict[str, Any]:
            return {op: {"_index": index, "_id": doc_id, "status": status,
                         "error": {"type": etype, "reason": reason, "index": index}}}

        if (index != index.lower() or index.startswith(("_", "-", "+"))
                or INVALID_INDEX_CHARS & set(index)):
            return fail(400, "invalid_index_name_exception",
                        f"Invalid index name [{index}]")
        is_stream = bool(DATA_STREAM_RE.match(index))
        # Elasticsearch counts UTF-8 bytes; a data stream also needs its first backing
        # index, whose name is longer than the stream's (MetadataCreateIndexService).
        for name in (index, _backing_index(index)) if is_stream else (index,):
            size = len(name.encode("utf-8"))
            if size > MAX_INDEX_NAME_BYTES:
                return fail(400, "invalid_index_name_exception",
                            f"Invalid index name [{name}], index name is too long, "
                            f"({size} > {MAX_INDEX_NAME_BYTES})")
        store = self.indices.setdefault(index, {})
        if op == "update":
            return fail(400, "illegal_argument_exception",
                        "update is not supported by the contract server")
        if op == "delete":
            existed = store.pop(doc_id, None) is not None
            return {op: {"_index": index, "_id": doc_id, "result":
                         "deleted" if existed else "not_found", "status": 200 if existed else 404}}
        self.attempts[(index, doc_id)] += 1
        marker = self.faults.item_429_marker
        if (self.attempts[(index, doc_id)] <= self.faults.item_429_attempts
                and (marker is None or (line is not None and marker in line))):
            return fail(429, "es_rejected_execution_exception",
                        "rejected execution of coordinating operation")
        assert line is not None
        try:
            doc = json.loads(line)
        except ValueError:
            return fail(400, "document_parsing_exception", "[1:1] failed to parse")
        if not isinstance(doc, dict):
            return fail(400, "document_parsing_exception", "[1:1] failed to parse: not an object")
        if self.faults.item_500_marker is not None and self.faults.item_500_marker in line:
            return fail(500, "fail_processor_exception", "document refused by the pipeline")
        if self.faults.reject_marker is not None and self.faults.reject_marker in line:
            return fail(400, "document_parsing_exception",
                        "[1:20] failed to parse field [attributes] of type [flattened]")
        if is_stream and op != "create":
            return fail(400, "illegal_argument_exception",
                        "only write ops with an op_type of create are allowed in data streams")
        if is_stream and "@timestamp" not in doc:
            return fail(400, "document_parsing_exception",
                        "data stream timestamp field [@timestamp] is missing")
        if op == "create" and doc_id in store:
            return fail(409, "version_conflict_engine_exception",
                        f"[{doc_id}]: version conflict, document already exists "
                        "(current version [1])")
        created = doc_id not in store
        store[doc_id] = doc
        self._seq_no += 1
        return {op: {"_index": index, "_id": doc_id, "_version": 1,
                     "result": "created" if created else "updated",
                     "_shards": {"total": 1, "successful": 1, "failed": 0},
                     "_seq_no": self._seq_no, "_primary_term": 1,
                     "status": 201 if created else 200}}
