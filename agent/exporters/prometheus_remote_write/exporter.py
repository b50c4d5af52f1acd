"""RemoteWriteExporter: OTLP metrics -> Prometheus remote write 1.0 requests.

``consume`` translates a batch into time series (``agent.promnames``: names, labels,
delta -> cumulative), spreads the series over ``shards`` by a stable hash of their
label set, and puts one or more ``WriteBatch`` per shard into that shard's
``QueuedSender``. Each shard has a single worker, so the requests of one shard — and
thus the samples of one series — reach the receiver in the order they were consumed;
shards send concurrently. ``consume`` holds a lock while it translates and queues, so
two concurrent callers cannot interleave their samples of one series either.

When a shard's queue refuses its part (full), ``consume`` raises ``RetryableError`` and
the sender resends the batch: the delta points already counted are then skipped as
``out_of_order`` (their total is already in the running sum, so nothing is counted
twice) and re-sent cumulative samples are exact duplicates, which Prometheus accepts.

Remote write has no deletion: a series ends with a StaleNaN sample. A point flagged "no
recorded value" ends every series of its metric point, each ``_bucket{le}`` and
``{quantile}`` series included (the layouts last queued are remembered per series, as
bounded as the translator's state), and a bucket or quantile that a histogram or
summary stops sending gets one too.

Delivery follows the remote write spec: 2xx is success; 429 and 5xx are retried
(``Retry-After`` honoured); any other status is final and the request is dropped and
counted (Prometheus answers 400 for ``out of order sample`` after storing the rest).
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import math
import time
import zlib
from typing import Any

import aiohttp
import cramjam

from agent.component import (
    Capabilities,
    Host,
    PermanentError,
    RetryableError,
    Settings,
    Signal,
    cancel_tasks,
)
from agent.exporters.prometheus_remote_write.config import RemoteWriteConfig
from agent.exporters.prometheus_remote_write.remote_pb2 import (
    Label,
    TimeSeries,
    WriteRequest,
)
from agent.httputil import parse_retry_after
from agent.pdata import Batch, MetricBatch
from agent.promnames import (
    COUNTER,
    HISTOGRAM,
    STALE_NAN,
    SUMMARY,
    HistogramValue,
    PromPoint,
    SummaryValue,
    Translator,
    format_float,
    sample_name,
)
from agent.promnames import Exemplar as PromExemplar
from agent.queue import QueuedSender
from agent.telemetry import ComponentTelemetry

try:
    USER_AGENT = f"mlagent/{importlib.metadata.version('mlagent')}"
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    USER_AGENT = "mlagent/dev"
HEADERS = {
    "Content-Encoding": "snappy",
    "Content-Type": "application/x-protobuf",
    "X-Prometheus-Remote-Write-Version": "0.1.0",
    "User-Agent": USER_AGENT,
}
# The most of an error body kept in a log line or an error message.
_ERROR_BODY_CHARS = 512

Labels = tuple[tuple[str, str], ...]


class WriteBatch(Batch):
    """One remote write request queued for a shard; its items are its samples."""

    signal = Signal.METRICS
    message_type = WriteRequest

    @property
    def item_count(self) -> int:
        return sum(len(ts.samples) for ts in self.request.timeseries)


def _decode_write_batch(_signal: Signal, data: bytes) -> WriteBatch:
    """Restore a persisted shard row (a serialised ``WriteRequest``)."""
    return WriteBatch.from_bytes(data)  # type: ignore[return-value]


# A sample's series: its name, its point's labels, and the extra ("le"/"quantile") label.
SeriesKey = tuple[str, Labels, tuple[str, str] | None]
# One sample of a point: (name, extra label, value, exemplar).
_Sample = tuple[str, tuple[str, str] | None, float, PromExemplar | None]


@dataclasses.dataclass(slots=True)
class _Series:
    """Samples and exemplars of one series gathered from one consumed batch."""

    key: SeriesKey
    samples: dict[int, float]  # timestamp ms -> value (the last one for a timestamp wins)
    exemplars: list[PromExemplar]


class RemoteWriteExporter:
    """A METRICS exporter that pushes to a Prometheus remote write receiver."""

    capabilities = Capabilities(mutates_data=False)

    def __init__(self, settings: Settings, config: RemoteWriteConfig) -> None:
        self.settings = settings
        self.config = config
        self.tel = settings.telemetry
        self.translator = Translator(config)
        shards = config.shards
        qc = config.sending_queue
        shard_qc = dataclasses.replace(qc, consumers=1,
                                       max_items=max(1, qc.max_items // shards),
                                       max_bytes=max(1, qc.max_bytes // shards))
        totals: dict[int, tuple[int, int, int, float]] = {}
        self.senders = [
            QueuedSender(dataclasses.replace(settings, telemetry=_ShardTelemetry(
                settings.telemetry, i, totals)), shard_qc, config.retry_on_failure, self._send,
                name=f"shard{i}", decode=_decode_write_batch)
            for i in range(shards)]
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        self._headers = {**config.headers, **HEADERS}
        self._sweeper: asyncio.Task[None] | None = None
        # Per-series caches (shard, serialized labels), bounded like the series state.
        self._cache_limit = 4 * config.max_series
        self._shards: dict[tuple[str, Labels], int] = {}
        self._label_cache: dict[SeriesKey, bytes] = {}
        self._layouts = _Layouts(config.max_series, config.metric_expiration)

    async def start(self, host: Host) -> None:
        self._session = aiohttp.ClientSession()
        for s in self.senders:
            await s.start(host)
        self._sweeper = asyncio.create_task(self._sweep(), name=f"{self.settings.id}-expiry")

    # ------------------------------------------------------------------------- intake

    async def consume(self, batch: Batch) -> None:
        """Translate and queue; returns once every shard's part is in its queue."""
        if not isinstance(batch, MetricBatch):
            return
        async with self._lock:
            try:
                await self._consume(batch)
            except BaseException:
                self._layouts.discard()
                raise
            self._layouts.commit(time.monotonic())

    async def _consume(self, batch: MetricBatch) -> None:
        """``consume`` under the lock; the layouts it stages are kept only if it returns."""
        shards: list[dict[SeriesKey, _Series]] = [{} for _ in self.senders]
        points = 0
        for p in self.translator.translate(batch.request):
            points += 1
            # Every sample of a point (buckets, sum, count) goes to one shard.
            shard = shards[self._shard_of(p.family, p.labels)]
            for name, extra, value, ex in self._expand(p):
                key = (name, p.labels, extra)
                s = shard.get(key)
                if s is None:
                    s = shard[key] = _Series(key, {}, [])
                s.samples[p.time_ms] = value
                if ex is not None:
                    s.exemplars.append(ex)
        for reason, n in self.translator.take_skipped().items():
            self.tel.dropped(Signal.METRICS, n, reason)
        if points:
            self.tel.accepted(Signal.METRICS, points)
        for sender, series in zip(self.senders, shards, strict=True):
            for req in self._requests(series.values()):
                await sender.put(WriteBatch(req))

    def _expand(self, p: PromPoint) -> list[_Sample]:
        """The classic samples of one point: ``(name, extra label, value, exemplar)``.

        Remote write ends a series only by a StaleNaN sample. When a histogram or
        summary series ends, or its layout changes, every ``le``/``quantile`` series it
        no longer has gets one: a bucket left live would keep ``histogram_quantile``
        answering for Prometheus' 5-minute lookback.
        """
        fam = p.family
        ex_on = self.config.exemplars
        if p.stale:
            if p.kind in (HISTOGRAM, SUMMARY):
                out: list[_Sample] = [(fam + "_count", None, STALE_NAN, None),
                                      (fam + "_sum", None, STALE_NAN, None)]
                sent = self._layouts.end((fam, p.labels))
                if sent is not None:
                    if p.kind == HISTOGRAM:
                        sent = (*sent, math.inf)
                    out.extend(_stale_extras(fam, p.kind, sent))
                return out
            return [(sample_name(fam, p.kind, p.total), None, STALE_NAN, None)]
        v = p.value
        if isinstance(v, HistogramValue):
            cum = v.cumulative().tolist()
            bucket = fam + "_bucket"
            out = [
                (bucket, ("le", format_float(le)), cum[i], v.exemplars.get(i) if ex_on else None)
                for i, le in enumerate([*v.bounds, math.inf])]
            out.append((fam + "_sum", None, v.sum, None))
            out.append((fam + "_count", None, v.count, None))
            gone = self._layouts.update((fam, p.labels), v.bounds)
            if gone:
                out.extend(_stale_extras(fam, p.kind, gone))
            return out
        if isinstance(v, SummaryValue):
            out = [(fam, ("quantile", format_float(q)), qv, None) for q, qv in v.quantiles]
            out.append((fam + "_sum", None, v.sum, None))
            out.append((fam + "_count", None, v.count, None))
            gone = self._layouts.update((fam, p.labels), tuple(q for q, _ in v.quantiles))
            if gone:
                out.extend(_stale_extras(fam, p.kind, gone))
            return out
        assert isinstance(v, float)
        ex = p.exemplar if ex_on and p.kind == COUNTER else None
        return [(sample_name(fam, p.kind, p.total), None, v, ex)]

    def _shard_of(self, family: str, labels: Labels) -> int:
        """A hash of the point's identity that is stable across processes (unlike ``hash``),
        so that a series keeps its shard (and its order) across restarts too."""
        if len(self.senders) == 1:
            return 0
        k = (family, labels)
        shard = self._shards.get(k)
        if shard is None:
            text = family + "\xff" + "\xff".join(f"{n}\xfe{v}" for n, v in labels)
            shard = zlib.crc32(text.encode()) % len(self.senders)
            _bounded_put(self._shards, k, shard, self._cache_limit)
        return shard

    def _labels_bytes(self, key: SeriesKey) -> bytes:
        """The series' sorted labels, ``__name__`` included, as serialized ``TimeSeries``
        fields, computed once per series: merging bytes is much cheaper in upb than
        building ``Label`` messages for every sample."""
        b = self._label_cache.get(key)
        if b is None:
            name, labels, extra = key
            pairs = sorted((*labels, ("__name__", name), *((extra,) if extra else ())))
            b = TimeSeries(labels=[Label(name=k, value=v) for k, v in pairs]).SerializeToString()
            _bounded_put(self._label_cache, key, b, self._cache_limit)
        return b

    def _requests(self, series: Any) -> list[WriteRequest]:
        """WriteRequests of at most ``max_samples_per_send`` samples, samples time-ordered."""
        limit = self.config.max_samples_per_send
        out: list[WriteRequest] = []
        req, n = WriteRequest(), 0
        for s in series:
            ts: TimeSeries = req.timeseries.add()
            ts.MergeFromString(self._labels_bytes(s.key))
            samples = s.samples
            if len(samples) == 1:
                ((t, v),) = samples.items()
                ts.samples.add(value=v, timestamp=t)
            else:
                for t in sorted(samples):
                    ts.samples.add(value=samples[t], timestamp=t)
            for e in sorted(s.exemplars, key=lambda e: e.time_ms):
                ts.exemplars.add(labels=[Label(name=k, value=v) for k, v in e.labels.items()],
                                 value=e.value, timestamp=e.time_ms or max(samples))
            n += len(samples)
            if n >= limit:
                out.append(req)
                req, n = WriteRequest(), 0
        if req.timeseries:
            out.append(req)
        return out

    # ------------------------------------------------------------------------- delivery

    async def _send(self, batch: Batch) -> None:
        """POST one request; raises as the remote write spec says (see module docstring)."""
        if self._session is None:
            raise RetryableError("exporter not started")
        body = bytes(cramjam.snappy.compress_raw(batch.request.SerializeToString()))
        try:
            async with self._session.post(self.config.endpoint, data=body,
                                          headers=self._headers) as r:
                if 200 <= r.status < 300:
                    return
                text = (await r.text(errors="replace"))[:_ERROR_BODY_CHARS].strip()
                msg = f"HTTP {r.status}: {text}"
                if r.status == 429 or r.status >= 500:
                    hint = parse_retry_after(r.headers.get("Retry-After"))
                    raise RetryableError(msg, retry_after=hint)
                raise PermanentError(msg)
        except aiohttp.ClientError as e:
            raise RetryableError(f"{type(e).__name__}: {e}") from e

    async def _sweep(self) -> None:
        """Forget the delta state and layouts of series that stopped reporting."""
        interval = max(1.0, min(self.config.metric_expiration / 2, 60.0))
        while True:
            await asyncio.sleep(interval)
            self.translator.expire()
            self._layouts.expire(time.monotonic())

    async def shutdown(self) -> None:
        """Drain the shard queues (within their deadline) and close. Idempotent."""
        await cancel_tasks(self._sweeper)
        self._sweeper = None
        await asyncio.gather(*(s.shutdown() for s in self.senders))
        if self._session is not None:
            await self._session.close()
            self._session = None


class _ShardTelemetry(ComponentTelemetry):
    """The exporter's telemetry as seen by one shard's queue.

    Counts go to the exporter as they are; the queue gauges report the sum over all
    shards (the oldest age: the maximum) instead of each shard overwriting the others.
    """

    def __init__(self, base: ComponentTelemetry, shard: int,
                 totals: dict[int, tuple[int, int, int, float]]) -> None:
        super().__init__(base.t, base.id)
        self._shard = shard
        self._totals = totals

    def queue(self, signal: str, *, size: int, nbytes: int, capacity: int,
              oldest_age: float) -> None:
        self._totals[self._shard] = (size, nbytes, capacity, oldest_age)
        rows = self._totals.values()
        super().queue(signal, size=sum(r[0] for r in rows), nbytes=sum(r[1] for r in rows),
                      capacity=sum(r[2] for r in rows), oldest_age=max(r[3] for r in rows))


def _stale_extras(family: str, kind: str, values: tuple[float, ...]) -> list[_Sample]:
    """StaleNaN samples for the bucket series of these ``le`` bounds, or the series of
    these quantiles."""
    if kind == HISTOGRAM:
        bucket = family + "_bucket"
        return [(bucket, ("le", format_float(le)), STALE_NAN, None) for le in values]
    return [(family, ("quantile", format_float(q)), STALE_NAN, None) for q in values]


@dataclasses.dataclass(slots=True)
class _Layout:
    values: tuple[float, ...]  # the le bounds (+Inf implied) or the quantiles last sent
    seen: float  # monotonic time of the last update


class _Layouts:
    """The ``le`` bounds or quantiles last queued for each histogram and summary series,
    so that the exporter can end each of their series (see ``_expand``).

    What one ``consume`` sees is staged and kept by ``commit`` only once the whole
    batch is queued: a batch refused and sent again then ends the same series again.
    Bounded like the translator's state: at most ``max_series`` entries (the least
    recently updated is forgotten first; its end then marks only ``_count`` and
    ``_sum``), and an entry not updated for ``expiration`` is forgotten by ``expire``.
    """

    def __init__(self, max_series: int, expiration: float) -> None:
        self.max_series = max_series
        self.expiration = expiration
        # Least recently updated first: commit() moves an updated entry to the end.
        self._sent: dict[tuple[str, Labels], _Layout] = {}
        # This batch's layouts; None: the series ended.
        self._pending: dict[tuple[str, Labels], tuple[float, ...] | None] = {}

    def _last(self, key: tuple[str, Labels]) -> tuple[float, ...] | None:
        if key in self._pending:
            return self._pending[key]
        entry = self._sent.get(key)
        return None if entry is None else entry.values

    def update(self, key: tuple[str, Labels], values: tuple[float, ...]) -> tuple[float, ...]:
        """Stage ``values`` for ``key``; returns those sent before and not now (+Inf is in
        every histogram, so it never ends by a layout change)."""
        old = self._last(key)
        self._pending[key] = values
        if old is None or old is values or old == values:
            return ()
        keep = set(values)
        return tuple(x for x in old if x not in keep)

    def end(self, key: tuple[str, Labels]) -> tuple[float, ...] | None:
        """Stage the end of ``key``; returns the values last sent, None if unknown."""
        old = self._last(key)
        self._pending[key] = None
        return old

    def commit(self, now: float) -> None:
        """Keep what this batch staged (it is queued)."""
        sent = self._sent
        for key, values in self._pending.items():
            entry = sent.pop(key, None)
            if values is None:
                continue
            if entry is None:
                if len(sent) >= self.max_series:
                    del sent[next(iter(sent))]
                entry = _Layout(values, now)
            else:
                entry.values = values
                entry.seen = now
            sent[key] = entry
        self._pending.clear()

    def discard(self) -> None:
        """Forget what this batch staged (it was not queued, and will come again)."""
        self._pending.clear()

    def expire(self, now: float) -> int:
        """Forget entries not updated for ``expiration``; returns how many."""
        horizon = now - self.expiration
        old = []
        for key, entry in self._sent.items():
            if entry.seen >= horizon:
                break
            old.append(key)
        for key in old:
            del self._sent[key]
        return len(old)


def _bounded_put(cache: dict[Any, Any], key: Any, value: Any, limit: int) -> None:
    """``cache[key] = value``, emptying the cache first when it holds ``limit`` entries:
    a cheap bound that only costs recomputation after series churn."""
    if len(cache) >= limit:
        cache.clear()
    cache[key] = value


