"""The ``elasticsearch`` exporter: logs and spans as ECS documents through the bulk API.

Every document is a ``create`` into a data stream with a deterministic ``_id`` (see
``ecs``), which is what makes every retry safe: a document that was stored by an
earlier attempt answers 409, and 409 counts as success. So:

- connection errors and HTTP 429 / 502 / 503 / 504 on the whole request: the batch
  is retried by the sending queue (with ``Retry-After`` when given);
- per item: 2xx and 409 are done; 429 items are retried, *only those* (the batch's
  remaining documents are remembered between attempts); any other status, 5xx
  included, is permanent: counted by Elasticsearch's error type in
  ``mlagent_agent_elasticsearch_refused_documents``, appended to ``dead_letter_file``
  when set, and reported to the queue as rejected (dropped) once the batch is done.
  A per-item 5xx is what Elasticsearch answers for a document an ingest pipeline
  fails (a ``fail`` processor, a processor error), the same way on every attempt:
  retrying it would hold a queue worker and its batch (forever with the default
  ``max_elapsed_time = 0``). Overload is 429 per item, or 502 / 503 / 504 for the
  whole request, and those are retried;
- HTTP 413 on a bulk request: split it in halves and send each (one document that
  is too large on its own is refused like a permanent item);
- any other whole-request status (401, 403, 404, ...) drops the rest of the batch.

A batch is cut into bulk requests of at most ``bulk_max_bytes``.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import ssl
import weakref
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from agent.component import (
    Capabilities,
    Host,
    PermanentError,
    RetryableError,
    Settings,
    Signal,
)
from agent.exporters.elasticsearch.config import ElasticsearchConfig
from agent.exporters.elasticsearch.deadletter import DeadLetterFile
from agent.exporters.elasticsearch.ecs import Document, Routing, log_documents, span_documents
from agent.exporters.elasticsearch.templates import index_template, template_name
from agent.httputil import parse_retry_after, read_bounded
from agent.pdata import Batch, LogBatch, TraceBatch
from agent.queue import QueuedSender

RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
# Bulk responses list every item; with filter_path they carry only status and error,
# but a batch of many small documents still makes a sizeable answer.
MAX_RESPONSE_BYTES = 64 * 2**20
FILTER_PATH = "errors,items.*.status,items.*.error"


@dataclass
class _Progress:
    """One batch between attempts: the documents still to send, and what earlier
    attempts had refused for good (reported once the batch is done).

    ``settled`` holds the identities of the documents the current attempt has stored
    or refused, so that an attempt cut short part-way through a request that was
    split (413) leaves them out of what is resent: a refused document is counted and
    dead-lettered once, and a stored one is neither resent nor reported as dropped.
    """

    docs: list[Document]
    refused: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    settled: set[int] = field(default_factory=set)

    @property
    def refused_total(self) -> int:
        return sum(self.refused.values())

    def unsettled(self, docs: list[Document]) -> list[Document]:
        """``docs`` without those this attempt settled; forgets what was settled."""
        if self.settled:
            docs = [d for d in docs if id(d) not in self.settled]
            self.settled.clear()
        return docs

    def summary(self) -> str:
        """``: <n> <type> (<reason>), ...`` for an error message; empty when none."""
        if not self.refused:
            return ""
        return ": " + ", ".join(f"{n} {r} ({self.examples[r]})" for r, n in self.refused.items())


class ElasticsearchExporter:
    """Sends log and trace batches to Elasticsearch data streams through a sending queue."""

    capabilities = Capabilities(mutates_data=False)

    def __init__(self, settings: Settings, config: ElasticsearchConfig) -> None:
        self.cfg = config
        self.tel = settings.telemetry
        self.routing = Routing(config.dataset, config.namespace, config.dynamic_routing)
        self.sender = QueuedSender(settings, config.sending_queue, config.retry_on_failure,
                                   self._send)
        self.base_url = config.endpoint.rstrip("/")
        self.bulk_url = f"{self.base_url}/_bulk?filter_path={FILTER_PATH}"
        self._headers = {**config.headers, "Content-Type": "application/x-ndjson",
                         "Accept": "application/json"}
        if config.api_key:
            self._headers["Authorization"] = f"ApiKey {config.api_key}"
        elif config.user:
            basic = base64.b64encode(f"{config.user}:{config.password}".encode()).decode()
            self._headers["Authorization"] = f"Basic {basic}"
        if config.compression == "gzip":
            self._headers["Content-Encoding"] = "gzip"
        # Batches part-way through (some documents still to send), so that a retry
        # sends only those. Weak: a batch the queue gives up on takes its entry along.
        self._progress: weakref.WeakKeyDictionary[Batch, _Progress] = (
            weakref.WeakKeyDictionary())
        self._refused = self.tel.counter(
            "mlagent_agent_elasticsearch_refused_documents",
            "Documents Elasticsearch refused for good, by its error type.", ("signal", "reason"))
        self._session: aiohttp.ClientSession | None = None
        self._ssl: ssl.SSLContext | bool = True
        self._dead_letter: DeadLetterFile | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self, host: Host) -> None:
        tls = self.cfg.tls
        if tls.ca_file is not None or tls.insecure_skip_verify:
            self._ssl = await asyncio.to_thread(self._ssl_context)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.cfg.timeout))
        if self.cfg.dead_letter_file is not None:
            path = self.cfg.dead_letter_file
            self._dead_letter = DeadLetterFile(
                path if path.is_absolute() else host.state_dir / path,
                self.cfg.dead_letter_max_size)
        if self.cfg.create_index_templates:
            await self._create_index_templates()
        await self.sender.start(host)

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(
            cafile=str(self.cfg.tls.ca_file) if self.cfg.tls.ca_file else None)
        if self.cfg.tls.insecure_skip_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    async def consume(self, batch: Batch) -> None:
        await self.sender.put(batch)

    async def shutdown(self) -> None:
        """Drain the queue into Elasticsearch, then close the connection pool. Idempotent."""
        await self.sender.shutdown()
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # ------------------------------------------------------------------ sending

    async def _send(self, batch: Batch) -> None:
        progress = self._progress.pop(batch, None)
        if progress is None:
            progress = _Progress(await asyncio.to_thread(self._documents, batch))
        chunks = list(self._chunks(progress.docs))
        deferred: list[Document] = []
        for k, chunk in enumerate(chunks):
            try:
                deferred += await self._bulk(batch.signal, chunk, progress)
            except (RetryableError, asyncio.CancelledError):
                # CancelledError: the queue's per-attempt timeout. Either way the next
                # attempt resumes here instead of refusing (and dead-lettering) twice;
                # this chunk may have been split (413) and partly refused already.
                progress.docs = progress.unsettled(
                    deferred + [d for c in chunks[k:] for d in c])
                self._progress[batch] = progress
                raise
            except PermanentError as e:
                left = len(progress.unsettled(deferred + [d for c in chunks[k:] for d in c]))
                raise PermanentError(f"{e}{progress.summary()}",
                                     rejected=left + progress.refused_total) from None
        progress.settled.clear()
        if deferred:
            progress.docs = deferred
            self._progress[batch] = progress
            raise RetryableError(f"{len(deferred)} documents not stored yet (per-item 429)")
        if progress.refused_total:
            raise PermanentError(f"{progress.refused_total} documents refused by "
                                 f"Elasticsearch{progress.summary()}",
                                 rejected=progress.refused_total)

    def _documents(self, batch: Batch) -> list[Document]:
        if isinstance(batch, LogBatch):
            return log_documents(batch, self.routing)
        if isinstance(batch, TraceBatch):
            return span_documents(batch, self.routing)
        raise PermanentError(f"elasticsearch exports logs and traces, not {batch.signal}")

    def _chunks(self, docs: list[Document]) -> Iterator[list[Document]]:
        """Consecutive runs of documents of at most ``bulk_max_bytes`` (a larger one alone)."""
        chunk: list[Document] = []
        size = 0
        for d in docs:
            if chunk and size + len(d.lines) > self.cfg.bulk_max_bytes:
                yield chunk
                chunk, size = [], 0
            chunk.append(d)
            size += len(d.lines)
        if chunk:
            yield chunk

    async def _bulk(self, signal: Signal, docs: list[Document],
                    progress: _Progress) -> list[Document]:
        """Send ``docs`` in one bulk request (halving on 413); returns the ones to retry."""
        status, payload, retry_after = await self._post(b"".join(d.lines for d in docs))
        if status == 413:
            if len(docs) == 1:
                await self._refuse(signal, progress, [(docs[0], 413, {
                    "type": "request_entity_too_large",
                    "reason": f"a single document of {len(docs[0].lines)} bytes is too large"})])
                return []
            mid = len(docs) // 2
            return (await self._bulk(signal, docs[:mid], progress)
                    + await self._bulk(signal, docs[mid:], progress))
        if status in RETRYABLE_STATUSES:
            raise RetryableError(f"bulk: HTTP {status}: {_reason(payload)}",
                                 retry_after=parse_retry_after(retry_after))
        if not 200 <= status < 300:
            raise PermanentError(f"bulk: HTTP {status}: {_reason(payload)}")
        try:
            result = orjson.loads(payload)
            items = result["items"] if result.get("errors") else None
        except (ValueError, KeyError, TypeError, AttributeError):
            # What was stored is unknown; resending is safe (409 for stored documents).
            raise RetryableError("bulk: unreadable response") from None
        if items is None:
            progress.settled.update(map(id, docs))
            return []
        if not isinstance(items, list) or len(items) != len(docs):
            raise RetryableError(f"bulk: response items do not match the {len(docs)} documents")
        retry: list[Document] = []
        refused: list[tuple[Document, int, Any]] = []
        for doc, item in zip(docs, items, strict=True):
            res: Any = next(iter(item.values()), None) if isinstance(item, dict) else None
            st = res.get("status") if isinstance(res, dict) else None
            if isinstance(st, int) and (200 <= st < 300 or st == 409):
                progress.settled.add(id(doc))  # 409: stored by an earlier attempt
                continue
            if not isinstance(st, int) or st == 429:
                retry.append(doc)  # unreadable items too: resending is idempotent
            else:
                refused.append((doc, st, res.get("error")))
        if refused:
            await self._refuse(signal, progress, refused)
        return retry

    async def _post(self, body: bytes) -> tuple[int, bytes, str | None]:
        if self._session is None:
            raise RetryableError("elasticsearch exporter is not started")
        # Off the loop: compressing a few MiB takes long enough to stall other components.
        data = (await asyncio.to_thread(gzip.compress, body, 6)
                if self.cfg.compression == "gzip" else body)
        try:
            async with self._session.post(self.bulk_url, data=data, headers=self._headers,
                                          ssl=self._ssl) as resp:
                payload = await read_bounded(resp, MAX_RESPONSE_BYTES)
                return resp.status, payload, resp.headers.get("Retry-After")
        except (aiohttp.ClientError, TimeoutError) as e:
            raise RetryableError(f"bulk: {type(e).__name__}: {e}") from None

    async def _refuse(self, signal: Signal, progress: _Progress,
                      refused: list[tuple[Document, int, Any]]) -> None:
        """Count permanently refused documents by reason; dead-letter them when configured.

        The queue counts them as dropped when the batch is done (``PermanentError``
        with ``rejected``); the reasons go to their own counter and the error message.
        """
        for doc, status, error in refused:
            progress.settled.add(id(doc))
            etype = error.get("type") if isinstance(error, dict) else None
            reason = etype if isinstance(etype, str) else f"http_{status}"
            progress.refused[reason] += 1
            progress.examples.setdefault(reason, str(error.get("reason")
                                                     if isinstance(error, dict) else error))
            self._refused.labels(signal, reason).inc()
        if self._dead_letter is None:
            return
        entries = [{"index": d.index, "id": d.id, "status": st, "error": err,
                    "document": json.loads(d.source)} for d, st, err in refused]
        try:
            left_out = await self._dead_letter.write(entries)
        except OSError as e:
            self.tel.error("dead letter file not writable", path=str(self._dead_letter.path),
                           error=str(e))
            return
        if left_out:
            self.tel.warn("dead letter", "file_full", items=left_out,
                          path=str(self._dead_letter.path))

    async def _create_index_templates(self) -> None:
        """Best effort: a failure is logged and export goes on with the built-in templates."""
        assert self._session is not None
        for kind in ("logs", "traces"):
            name = template_name(kind, self.cfg.dataset)
            url = f"{self.base_url}/_index_template/{name}"
            headers = {k: v for k, v in self._headers.items()
                       if k not in ("Content-Type", "Content-Encoding")}
            try:
                async with self._session.put(url, json=index_template(kind, self.cfg.dataset),
                                             headers=headers, ssl=self._ssl) as resp:
                    payload = await read_bounded(resp)
                    if resp.status >= 300:
                        self.tel.error("index template not created", template=name,
                                       status=resp.status, error=_reason(payload))
            except (aiohttp.ClientError, TimeoutError) as e:
                self.tel.error("index template not created", template=name, error=str(e))


def _reason(payload: bytes) -> str:
    """Elasticsearch's ``error.reason`` from an error body, or the start of the body."""
    try:
        err = orjson.loads(payload).get("error")
        if isinstance(err, dict):
            return f"{err.get('type')}: {err.get('reason')}"
    except (ValueError, AttributeError):
        pass
    return payload[:200].decode("utf-8", "replace")

