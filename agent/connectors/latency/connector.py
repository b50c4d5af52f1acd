"""The ``latency`` connector: where each request's time goes, per service and stage.

Consumes traces, emits metrics (see README.md for every metric, unit and attribute).
Two paths, following DESIGN.md §2:

- **per batch** (``consume``, processed in bulk every ``flush_spans`` spans and at
  each tick): RED metrics — calls, errors and a duration histogram per (service,
  span name, span kind, status) — from the batches' columns with a handful of
  vectorised numpy calls; then the spans of the traces in the ``trace_sample_rate``
  sample (a hash of the trace id) have their few fields copied into the trace buffer.
- **per assembled trace** (``tick``, from the connector's own timer task): self time,
  critical path, stage time and service-graph edges (``analysis.analyze``), added to
  their series in one vectorised update per tick; sums over traces are scaled by
  ``1 / trace_sample_rate``.

Cumulative counters and histograms keep counting for the life of the connector;
every ``window`` (tumbling) the connector emits all of them plus the window's
gauges — p50/p95/p99 per (service, operation, kind) and per stage, interpolated within the
window's histogram bucket, and the critical-path and stage shares — to the next
metrics consumer. Time for windows and trace decisions comes from an injectable
monotonic clock, so tests drive it without sleeping.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain
from operator import attrgetter
from typing import Any, cast

import numpy as np
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from agent.columns import SpanColumns
from agent.component import (
    Capabilities,
    Consumer,
    Host,
    PermanentError,
    Settings,
    Signal,
    cancel_tasks,
    emit,
)
from agent.connectors.latency.analysis import Analysis, analyze
from agent.connectors.latency.assembly import TraceBuffer
from agent.connectors.latency.config import LatencyConfig
from agent.connectors.latency.emit import (
    gauge_metric,
    histogram_metric,
    series_points,
    sum_metric,
)
from agent.connectors.latency.normalize import Names
from agent.connectors.latency.series import (
    OVERFLOW_ATTRIBUTES,
    Grouped,
    Histograms,
    Series,
    Sums,
    ids_of,
)
from agent.connectors.latency.spans import (
    INVALID_PARENT,
    Spans,
    id_words,
    sample_mask,
    trace_keys,
)
from agent.pdata import (
    MetricBatch,
    TraceBatch,
    attributes_to_dict,
    python_to_anyvalue,
)

KIND_NAMES = [Span.SpanKind.Name(k) for k in range(6)]  # SPAN_KIND_UNSPECIFIED .. CONSUMER
STATUS_NAMES = ["STATUS_CODE_UNSET", "STATUS_CODE_OK", "STATUS_CODE_ERROR"]
STATUS_ERROR = 2
NS = 1e-9
SCOPE = "mlagent.connectors.latency"
# connection_type of a service-graph edge, as Tempo and the collector's servicegraph
# connector name them.
CONNECTION_DIRECT = ""
CONNECTION_MESSAGING = "messaging_system"

SPAN_ATTRS = ("service.name", "span.name")
RED_ATTRS = ("service.name", "span.name", "span.kind", "status.code")


class _Window:
    """The state of one tumbling window; a fresh one replaces it at each boundary."""

    def __init__(self, bounds: list[float], max_series: int, start: float, start_ns: int) -> None:
        self.start = start
        self.start_ns = start_ns
        self.ops = Series(RED_ATTRS[:3], max_series)  # kind kept: SERVER spans = requests
        self.ops_duration = Histograms(bounds, exemplars=False)
        self.stages = Series(("service.name", "stage"), max_series)
        self.stage_duration = Histograms(bounds, exemplars=False)
        # Shares are ratios of sums: time in the stage (on the critical path) over the
        # end-to-end duration of the window's traces that the service took part in.
        self.stage_time = Sums()
        self.stage_total = Sums()
        self.services = Series(("service.name",), max_series)
        # (service, raw span name, kind, status) -> row in ops (see LatencyConnector._rows)
        self.rows: dict[tuple[str, str, int, int], int] = {}
        self.critical_time = Sums()
        self.critical_total = Sums()

    def tables(self) -> dict[str, Series]:
        """The window's series tables by the metric they feed (for overflow counting)."""
        return {"mlagent.latency.quantile": self.ops, "mlagent.latency.stage.quantile": self.stages,
                "mlagent.latency.critical_path.share": self.services}


@dataclass
class _Columns:
    """The per-span columns of consumed batches that the connector reads: the lists
    and arrays of their ``SpanColumns`` (never the batches), and when each span
    arrived (connector clock). ``services`` is per resource, ``resource_index`` per span."""

    n: int
    name: list[str]
    services: list[str]
    resource_index: np.ndarray
    kind: np.ndarray
    status_code: np.ndarray
    start: np.ndarray
    end: np.ndarray
    trace_id: list[bytes]
    sources: list[SpanColumns]  # the batches' columns: ids of the few spans that need them
    arrived: np.ndarray

    @classmethod
    def of(cls, cols: SpanColumns, arrived: float) -> _Columns:
        """The columns the connector reads of one batch's ``SpanColumns``."""
        return cls(cols.n, cols.name, cols.services, cols.resource_index, cols.kind,
                   cols.status_code, cols.start, cols.end, cols.trace_id, [cols],
                   np.full(cols.n, arrived))

    @classmethod
    def concatenate(cls, parts: list[_Columns]) -> _Columns:
        """The parts as one set of columns, span order kept."""
        if len(parts) == 1:
            return parts[0]
        services: list[str] = []
        resource = []
        for p in parts:  # resources renumbered after the earlier parts'
            resource.append(p.resource_index.astype(np.int64) + len(services))
            services.extend(p.services)

        def cat(name: str) -> Any:
            columns = [getattr(p, name) for p in parts]
            if isinstance(columns[0], list):
                return list(chain.from_iterable(columns))
            return np.concatenate(columns)

        return cls(sum(p.n for p in parts), cat("name"), services, np.concatenate(resource),
                   cat("kind"), cat("status_code"), cat("start"), cat("end"), cat("trace_id"),
                   cat("sources"), cat("arrived"))

    def spans_at(self, index: Sequence[int]) -> list[Any]:
        """The span messages at ``index`` (with their ids), from the batches' columns."""
        return self._gather(index, SpanColumns.spans_at)

    def span_ids_at(self, index: Sequence[int]) -> list[bytes]:
        """The span ids at ``index``, from the batches' columns."""
        return self._gather(index, SpanColumns.span_ids_at)

    def _gather(self, index: Sequence[int],
                read: Callable[[SpanColumns, Sequence[int]], list[Any]]) -> list[Any]:
        if len(self.sources) == 1:
            return read(self.sources[0], index)
        starts = np.cumsum([0] + [c.n for c in self.sources])
        idx = np.asarray(index, dtype=np.int64)
        source = np.searchsorted(starts, idx, side="right") - 1
        out: list[Any] = [None] * len(idx)
        for k in np.unique(source).tolist():
            at = np.flatnonzero(source == k)
            for i, x in zip(at.tolist(), read(self.sources[k], idx[at] - starts[k]),
                            strict=True):
                out[i] = x
        return out


class LatencyConnector:
    """Traces in, latency-breakdown metrics out. See the module docstring."""

    capabilities = Capabilities(mutates_data=False)

    def __init__(self, settings: Settings, config: LatencyConfig, next_consumer: Consumer, *,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock_ns: Callable[[], int] = time.time_ns) -> None:
        self._id = settings.id
        self._tel = settings.telemetry
        self._cfg = config
        self._next = next_consumer
        self._clock = clock
        self._wall_ns = wall_clock_ns
        self._names = Names(config.stages, normalize=config.normalize_names)
        self._buffer = TraceBuffer(max_traces=config.max_traces, max_spans=config.max_spans,
                                   decision_wait=config.decision_wait,
                                   root_timeout=config.root_timeout)
        b, ms = list(config.buckets), config.max_series
        self._bounds = b
        # Cumulative state, per metric: a series table and its numpy values.
        self._red = Series(RED_ATTRS, ms)
        self._calls, self._errors, self._duration = Sums(), Sums(), Histograms(b)
        self._self = Series(SPAN_ATTRS, ms)
        self._self_time = Sums()
        self._critical = Series(("service.name",), ms)
        self._critical_time = Sums()
        self._roots = Series(SPAN_ATTRS, ms)
        self._trace_duration = Histograms(b)
        self._stages = Series(("service.name", "stage"), ms)
        self._stage_duration = Histograms(b)
        self._edges = Series(("client", "server", "connection_type"), ms)
        self._requests, self._failures = Sums(), Sums()
        self._client_duration, self._server_duration = Histograms(b), Histograms(b)
        # (service, raw span name, kind, status) -> rows (RED, self time, critical
        # path, stage) of the batch groups seen before: one dict lookup per group.
        self._rows: dict[tuple[str, str, int, int], tuple[int, int, int, int]] = {}
        self._window = _Window(b, ms, clock(), wall_clock_ns())
        self._pending: list[_Columns] = []  # consumed, not yet processed (see consume)
        self._pending_spans = 0
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._anomalies = self._tel.counter(
            "mlagent_agent_latency_span_anomalies",
            "Spans of analysed traces that needed repair: orphan (parent missing), "
            "clock_skew (child outside its parent, clipped), duplicate (span id repeated).",
            ("anomaly",))
        self._traces = self._tel.counter(
            "mlagent_agent_latency_traces",
            "Traces analysed: complete (root arrived) or rootless (analysed at root_timeout).",
            ("outcome",))
        self._sampling = self._tel.counter(
            "mlagent_agent_latency_sampled_spans",
            "Spans by trace sampling decision: analysed (their trace is in the "
            "trace_sample_rate sample) or skipped (RED metrics only).",
            ("decision",))
        self._overflow = self._tel.counter(
            "mlagent_agent_latency_series_overflow",
            "Measurements aggregated into a metric's overflow series (max_series reached).",
            ("metric",))

    # ----------------------------------------------------------------- lifecycle

    async def start(self, host: Host) -> None:
        """Start the timer task that analyses due traces and closes windows."""
        if self._task is None and not self._stopped:
            self._task = asyncio.get_running_loop().create_task(self._run(),
                                                                name=f"{self._id} timer")

    async def shutdown(self) -> None:
        """Stop the timer, analyse every buffered trace and emit the final window.

        Idempotent and safe without ``start``.
        """
        if self._stopped:
            return
        self._stopped = True
        await cancel_tasks(self._task)
        self._task = None
        self._flush()
        self._analyse(self._buffer.drain())
        await self._close_window(self._clock())

    def _tick_interval(self) -> float:
        # Fine enough to honour decision_wait and the window boundary within a tenth
        # of the window, never busier than 100 Hz or lazier than 1 Hz.
        c = self._cfg
        return max(0.01, min(1.0, c.window / 10, c.decision_wait / 2 or 1.0))

    async def _run(self) -> None:
        interval = self._tick_interval()
        while True:
            await asyncio.sleep(interval)
            try:
                await self.tick()
            except Exception as e:  # a bug must not stop the timer for good
                self._tel.error("tick failed", error=repr(e))

    async def tick(self) -> None:
        """One timer step: analyse the traces that are due, close the window if it ended.

        The timer task calls this; tests call it directly after moving the clock.
        """
        self._flush()
        now = self._clock()
        self._analyse(self._buffer.due(now))
        if now - self._window.start >= self._cfg.window:
            await self._close_window(now)

    # ----------------------------------------------------------------- per batch

    async def consume(self, batch: TraceBatch) -> None:  # type: ignore[override]
        """Take the batch's spans for the RED metrics and trace assembly.

        Reads the batch's shared columns only and keeps references to the per-span
        columns it needs, never the batch. They are processed together once
        ``flush_spans`` spans are pending, and at every timer tick, window and
        shutdown: numpy's fixed cost per call is paid per thousands of spans, not per
        request. With attribute-matched stages a batch is processed at once (its
        span attributes are read while the batch is at hand).
        """
        if batch.signal is not Signal.TRACES:
            raise PermanentError(f"latency connector consumes traces, not {batch.signal}")
        n = batch.item_count
        if n == 0:
            return
        if self._stopped:
            self._tel.refused(Signal.TRACES, n, "stopped")
            raise PermanentError("latency connector is shut down")
        self._tel.accepted(Signal.TRACES, n)
        try:
            cols = batch.columns
        except (ValueError, OverflowError) as e:  # e.g. a time beyond int64 nanoseconds
            self._tel.dropped(Signal.TRACES, n, "invalid_batch", error=repr(e))
            return
        part = _Columns.of(cols, self._clock())
        if self._names.has_attribute_rules:
            self._process([part], batch)
            return
        self._pending.append(part)
        self._pending_spans += n
        if self._pending_spans >= self._cfg.flush_spans:
            self._flush()

    def _flush(self) -> None:
        """Process the pending spans (see ``consume``)."""
        if self._pending:
            parts, self._pending, self._pending_spans = self._pending, [], 0
            self._process(parts)

    def _process(self, parts: list[_Columns], batch: TraceBatch | None = None) -> None:
        """RED metrics and trace buffering for ``parts``; ``batch`` is the batch of
        the single part when attribute stage rules need span attributes. A failure
        costs these spans only, never the pipeline."""
        try:
            self._consume_columns(_Columns.concatenate(parts), batch)
        except Exception as e:  # a bug must cost these spans only, never the pipeline
            self._tel.dropped(Signal.TRACES, sum(p.n for p in parts), "internal_error",
                              error=repr(e))
        self._count_overflow()

    def _consume_columns(self, cols: _Columns, batch: TraceBatch | None) -> None:
        now_ns = self._wall_ns()
        names = cols.name
        # Distinct raw names of these spans -> local ids; normalise each once.
        local = {x: i for i, x in enumerate(dict.fromkeys(names))}
        name_id = np.fromiter(map(local.__getitem__, names), dtype=np.int64, count=cols.n)
        raw_names = list(local)
        looked = [self._names.lookup(x) for x in raw_names]
        kind = cols.kind.astype(np.int64)
        kind[(kind < 0) | (kind > 5)] = 0
        status = cols.status_code.astype(np.int64)
        status[(status < 0) | (status > 2)] = 0
        # Resources -> distinct services: a merged batch repeats the same few
        # resources once per request it was merged from.
        svc_names = list(dict.fromkeys(cols.services))
        svc_local = {x: i for i, x in enumerate(svc_names)}
        svc_of_res = np.fromiter(map(svc_local.__getitem__, cols.services), dtype=np.int64,
                                 count=len(cols.services))
        service = svc_of_res[cols.resource_index]

        # Group spans by (service, name, kind, status) with one counting pass; resolve
        # each distinct group to its series rows in Python (tens, not one per span).
        code = ((service * len(local) + name_id) * 8 + kind) * 4 + status
        uniq, inverse, weights = _group(code, len(svc_names) * len(local) * 32)
        # Each group's rows (cumulative RED, self time, critical path, stage; window
        # operations), cached by (service, raw name, kind, status) across batches.
        cache, window_cache, nl = self._rows, self._window.rows, len(local)
        group_rows = []
        # The stage each group's name gives, for attribute rules to refine (read here,
        # not back from the stage table: an overflow row has no key).
        group_stage: list[str | None] = []
        attribute_rules = self._names.has_attribute_rules
        for c, weight in zip(uniq.tolist(), weights.tolist(), strict=True):
            c, st = divmod(c, 4)
            c, k = divmod(c, 8)
            r, ni = divmod(c, nl)
            key = (svc_names[r], raw_names[ni], k, st)
            rows = cache.get(key)
            if rows is None:
                rows = self._resolve(key, looked[ni], now_ns, weight)
            win_row = window_cache.get(key)
            if win_row is None:
                win_row = self._resolve_window(key, looked[ni][0], now_ns, weight)
            group_rows.append((*rows, win_row))
            if attribute_rules:
                matches = looked[ni][1]
                group_stage.append(self._names.stage(matches, k) if matches else None)
        red_u, op_u, svc_u, stage_u, win_u = np.array(group_rows, dtype=np.int64).T
        nu, red, win = len(uniq), self._red, self._window.ops
        # Calls and errors per group; durations summarised per group once, merged
        # into both histograms (cumulative and window) by group.
        nr = len(red)
        self._calls.add(red_u, weights, nr)
        self._errors.add(red_u, weights * (uniq % 4 == STATUS_ERROR), nr)
        start, end, arrived = cols.start, cols.end, cols.arrived
        dur = np.maximum(end - start, 0) * NS
        hist = self._duration
        grouped = Grouped.of(inverse, nu, hist.buckets(dur), dur, hist.nb)
        hist.merge(red_u, grouped, nr, trace_ids=ids_of(cols.trace_id),
                   span_ids=cols.span_ids_at, times=end, values=dur)
        self._window.ops_duration.merge(win_u, grouped, len(win))

        # Copy out, as columns, what trace analysis needs — for the sampled traces
        # only, chosen before any per-span Python work.
        tkey, tw = trace_keys(cols.trace_id)
        keep = sample_mask(tkey, self._cfg.trace_sample_rate)
        if keep is not None:
            n_kept = int(np.count_nonzero(keep))
            # Spans without a valid trace id are kept for the buffer to count as
            # invalid_trace_id: no trace of theirs is analysed.
            self._sampling.labels("analysed").inc(int(np.count_nonzero(keep & (tkey != 0))))
            self._sampling.labels("skipped").inc(cols.n - n_kept)
            if n_kept == 0:
                return
            tkey, tw, inverse = tkey[keep], tw[keep], inverse[keep]
            kind, status, start, end = kind[keep], status[keep], start[keep], end[keep]
            arrived = arrived[keep]
        stage = stage_u[inverse]
        if attribute_rules:
            assert batch is not None  # consume passes it whenever there are attribute rules
            stage = self._attribute_stages(batch, kind, [group_stage[g] for g in inverse.tolist()],
                                           now_ns, keep)
        spans = cols.spans_at(range(cols.n) if keep is None else np.flatnonzero(keep).tolist())
        sw, _ = id_words(list(map(_span_id, spans)), 8)
        pw, plen = id_words(list(map(_parent_span_id, spans)), 8)
        pid = pw[:, 0]
        pid[(plen != 0) & (plen != 8)] = INVALID_PARENT
        buffered = Spans(key=tkey, trace_id=tw, sid=sw[:, 0], pid=pid, op=op_u[inverse],
                         svc=svc_u[inverse], stage=stage, kind=kind.astype(np.int8),
                         status=status.astype(np.int8), start=start, end=end)
        result = self._buffer.add(buffered, arrived)
        for reason, count in result.dropped.items():
            self._tel.dropped(Signal.TRACES, count, reason)

    def _resolve(self, key: tuple[str, str, int, int], looked: tuple[str, Any], now_ns: int,
                 weight: int) -> tuple[int, int, int, int]:
        """The cumulative rows of a (service, raw name, kind, status) group: RED,
        self time, critical path and stage (-1: none); cached unless the RED row is
        the overflow row (whose ``weight`` measurements must be counted at every
        batch). Self time, critical path and stage measurements come from analysed
        traces only: ``_record`` counts those that land in an overflow row."""
        svc, _, k, st = key
        name, matches = looked
        stage_name = self._names.stage(matches, k) if matches else None
        red = self._red.row((svc, name, KIND_NAMES[k], STATUS_NAMES[st]), now_ns, weight)
        rows = (red, self._self.row((svc, name), now_ns, 0), self._critical.row(svc, now_ns, 0),
                self._stages.row((svc, stage_name), now_ns, 0) if stage_name else -1)
        if red != self._red.overflow_row:
            _bounded_put(self._rows, key, rows, 4 * self._cfg.max_series)
        return rows

    def _resolve_window(self, key: tuple[str, str, int, int], name: str, now_ns: int,
                        weight: int) -> int:
        """The window-operations row of a group, cached as ``_resolve`` caches."""
        svc, _, k, _ = key
        ops = self._window.ops
        row = ops.row((svc, name, KIND_NAMES[k]), now_ns, weight)
        if row != ops.overflow_row:
            _bounded_put(self._window.rows, key, row, 4 * self._cfg.max_series)
        return row

    def _attribute_stages(self, batch: TraceBatch, kind: np.ndarray,
                          stage_names: list[str | None], now_ns: int,
                          keep: np.ndarray | None) -> np.ndarray:
        """Stage rows per kept span (``keep``: the sampled spans' mask, ``None``: all)
        when some stage is matched by attributes (slow path: every kept span's
        attributes are read). ``stage_names``: per kept span, the stage its name and
        kind give (``None``: none)."""
        cols = batch.columns
        spans = [sp for rs in batch.request.resource_spans for ss in rs.scope_spans
                 for sp in ss.spans]
        index = range(cols.n) if keep is None else np.flatnonzero(keep).tolist()
        services, resource = cols.services, cols.resource_index.tolist()
        out = np.empty(len(stage_names), dtype=np.int32)
        for j, (i, k, st) in enumerate(zip(index, kind.tolist(), stage_names, strict=True)):
            st = self._names.stage_of_attributes(attributes_to_dict(spans[i].attributes), k, st)
            out[j] = self._stages.row((services[resource[i]], st), now_ns, 0) if st else -1
        return out

    # ----------------------------------------------------------------- per trace

    def _analyse(self, due: tuple[Spans, int]) -> None:
        """Analyse the spans of the traces just taken from the buffer (all at once)."""
        spans, n_traces = due
        if n_traces:
            analysis = analyze(spans)
            if analysis is not None:
                self._record(analysis)
            self._count_overflow()

    def _record(self, a: Analysis) -> None:
        """Add one analysis to the cumulative series and the window, one update each."""
        now_ns = self._wall_ns()
        w = self._window
        trace_ids = _id_bytes(a.trace_id, 16)
        root_ids = _id_bytes(a.trace_root_sid, 8)
        secs = a.trace_ns * NS

        rows = _remap(a.trace_op, lambda op, n: self._roots.row(self._self.keys[op], now_ns, n))
        self._trace_duration.add(rows, secs, len(self._roots), trace_ids=trace_ids,
                                 span_ids=root_ids, times=a.trace_end)
        # Sums over traces estimate the total over every trace: each analysed trace
        # stands for 1/rate (Horvitz-Thompson). Histograms count the analysed traces
        # themselves, and window shares and quantiles need no scaling.
        scale = NS / self._cfg.trace_sample_rate
        self._self_time.add(a.self_op, a.self_ns * scale, len(self._self))
        _count_overflow_rows(self._self, a.self_op)
        _count_overflow_rows(self._critical, a.path_svc)
        _count_overflow_rows(self._stages, a.stage_row)

        path_s = a.path_ns * NS
        self._critical_time.add(a.path_svc, a.path_ns * scale, len(self._critical))

        def window_service(svc: int, n: int) -> int:
            return w.services.row(self._critical.keys[svc], now_ns, n)

        # A share's measurements: one per (trace, service) taking part.
        w.critical_time.add(_remap(a.path_svc, lambda svc, _: window_service(svc, 0)), path_s,
                            len(w.services))
        w.critical_total.add(_remap(a.member_svc, window_service), a.member_ns * NS,
                             len(w.services))

        stage_s = a.stage_ns * NS
        st_traces = a.stage_trace.tolist()
        self._stage_duration.add(a.stage_row, stage_s, len(self._stages),
                                 trace_ids=[trace_ids[t] for t in st_traces],
                                 span_ids=_id_bytes(a.stage_sid, 8), times=a.stage_end)
        w_rows = _remap(a.stage_row, lambda r, n: w.stages.row(self._stages.keys[r], now_ns, n))
        w.stage_duration.add(w_rows, stage_s, len(w.stages))
        w.stage_time.add(w_rows, stage_s, len(w.stages))
        w.stage_total.add(w_rows, secs[a.stage_trace], len(w.stages))

        if len(a.edge_client):
            svc_keys = self._critical.keys
            code = (a.edge_client.astype(np.int64) * len(svc_keys) + a.edge_server) * 2 \
                + a.edge_messaging

            def edge_row(code: int, n: int) -> int:
                pair, messaging = divmod(code, 2)
                client, server = svc_keys[pair // len(svc_keys)], svc_keys[pair % len(svc_keys)]
                key = None if client is None or server is None else (
                    client, server, CONNECTION_MESSAGING if messaging else CONNECTION_DIRECT)
                return self._edges.row(key, now_ns, n)

            rows = _remap(code, edge_row)
            n = len(self._edges)
            edge_traces = _id_bytes(a.edge_trace_id, 16)
            per_edge = 1.0 / self._cfg.trace_sample_rate
            self._requests.add(rows, per_edge, n)
            self._failures.add(rows, a.edge_failed * per_edge, n)
            # Each side's histogram links to that side's span.
            self._client_duration.add(rows, a.edge_client_ns * NS, n, trace_ids=edge_traces,
                                      span_ids=_id_bytes(a.edge_client_sid, 8),
                                      times=a.edge_end)
            self._server_duration.add(rows, a.edge_server_ns * NS, n, trace_ids=edge_traces,
                                      span_ids=_id_bytes(a.edge_server_sid, 8),
                                      times=a.edge_server_end)

        for anomaly, count in (("orphan", a.orphans), ("clock_skew", a.clock_skew),
                               ("duplicate", a.duplicates)):
            if count:
                self._anomalies.labels(anomaly).inc(count)
        if a.rootless:
            self._traces.labels("rootless").inc(a.rootless)
        if a.traces > a.rootless:
            self._traces.labels("complete").inc(a.traces - a.rootless)

    def _count_overflow(self) -> None:
        tables = {"mlagent.latency.calls": self._red, "mlagent.latency.self_time": self._self,
                  "mlagent.latency.critical_path.time": self._critical,
                  "mlagent.latency.trace.duration": self._roots,
                  "mlagent.latency.stage.duration": self._stages,
                  "mlagent.service_graph.requests": self._edges, **self._window.tables()}
        for metric, series in tables.items():
            if series.overflowed:
                self._overflow.labels(metric).inc(series.overflowed)
                self._tel.warn("series overflow", metric, measurements=series.overflowed,
                               max_series=series.max_series)
                series.overflowed = 0

    # ----------------------------------------------------------------- windows

    async def _close_window(self, now: float) -> None:
        """Emit every metric (cumulative, plus this window's gauges), start a new window."""
        self._flush()  # spans consumed in this window count in it
        w = self._window
        now_ns = self._wall_ns()
        # Tumbling windows stay aligned to the first one's start, however late the tick.
        elapsed = max(1, int((now - w.start) // self._cfg.window))
        self._window = _Window(self._bounds, self._cfg.max_series,
                               w.start + elapsed * self._cfg.window, now_ns)
        metrics = [m for m in self._cumulative_metrics(now_ns) + self._window_metrics(w, now_ns)
                   if m is not None]
        if metrics:
            await self._send(metrics)

    def _cumulative_metrics(self, now_ns: int) -> list[Metric | None]:
        red = self._red
        return [
            sum_metric("mlagent.latency.calls", "{call}",
                       "Spans ended, per service, operation, span kind and status.",
                       series_points(red, self._calls.values), now_ns),
            sum_metric("mlagent.latency.errors", "{call}",
                       "Spans ended with status ERROR, per service, operation and span kind.",
                       self._error_points(), now_ns),
            histogram_metric("mlagent.latency.duration", "s",
                             "Span duration, per service, operation, span kind and status.",
                             red, self._duration, now_ns),
            sum_metric("mlagent.latency.self_time", "s",
                       "Exclusive time of spans (duration minus the union of their children), "
                       "per service and operation.",
                       series_points(self._self, self._self_time.values), now_ns),
            sum_metric("mlagent.latency.critical_path.time", "s",
                       "Time each service spent on the critical path of the traces it was in.",
                       series_points(self._critical, self._critical_time.values), now_ns),
            histogram_metric("mlagent.latency.trace.duration", "s",
                             "End-to-end trace duration, per root service and operation.",
                             self._roots, self._trace_duration, now_ns),
            histogram_metric("mlagent.latency.stage.duration", "s",
                             "Time per trace spent in a stage, per service and stage.",
                             self._stages, self._stage_duration, now_ns),
            sum_metric("mlagent.service_graph.requests", "{request}",
                       "Requests between services (client span -> server span).",
                       series_points(self._edges, self._requests.values), now_ns),
            sum_metric("mlagent.service_graph.failures", "{request}",
                       "Requests between services where either side ended with status ERROR.",
                       series_points(self._edges, self._failures.values), now_ns),
            histogram_metric("mlagent.service_graph.client.duration", "s",
                             "Request duration seen by the client span.",
                             self._edges, self._client_duration, now_ns),
            histogram_metric("mlagent.service_graph.server.duration", "s",
                             "Request duration seen by the server span.",
                             self._edges, self._server_duration, now_ns),
        ]

    def _error_points(self) -> list[tuple[dict[str, Any], int, float]]:
        """Error counts per (service, operation, kind): the status dimension folded away."""
        red = self._red
        errors = self._errors.values.tolist()
        groups: dict[Any, list[Any]] = {}
        for row, key in enumerate(red.keys):
            group = None if key is None else cast(tuple, key)[:3]
            e = errors[row] if row < len(errors) else 0.0
            g = groups.get(group)
            if g is None:
                groups[group] = [red.start_ns[row], e]
            else:
                g[0] = min(g[0], red.start_ns[row])
                g[1] += e
        return [(dict(OVERFLOW_ATTRIBUTES) if group is None
                 else dict(zip(RED_ATTRS[:3], group, strict=True)), start, e)
                for group, (start, e) in groups.items()]

    def _window_metrics(self, w: _Window, now_ns: int) -> list[Metric | None]:
        qs = self._cfg.quantiles
        labels = [_quantile_label(q) for q in qs]

        def quantile_points(series: Series, hist: Histograms) -> list[tuple[dict, float]]:
            est = hist.quantiles(qs)[: len(series)].tolist()
            return [({**series.attributes(row), "quantile": label}, est[row][j])
                    for row in range(len(est)) for j, label in enumerate(labels)]

        def share_points(series: Series, part: Sums, total: Sums) -> list[tuple[dict, float]]:
            p, t = part.values.tolist(), total.values.tolist()
            return [(series.attributes(row), (p[row] if row < len(p) else 0.0) / t[row])
                    for row in range(len(series)) if row < len(t) and t[row] > 0]

        return [
            gauge_metric("mlagent.latency.quantile", "s",
                         "Span duration quantile over the last window, per service, "
                         "operation and span kind (interpolated within the histogram bucket).",
                         quantile_points(w.ops, w.ops_duration), w.start_ns, now_ns),
            gauge_metric("mlagent.latency.stage.quantile", "s",
                         "Per-trace stage time quantile over the last window.",
                         quantile_points(w.stages, w.stage_duration), w.start_ns, now_ns),
            gauge_metric("mlagent.latency.critical_path.share", "1",
                         "Share of end-to-end duration a service spent on the critical path, "
                         "over the last window's traces that it took part in.",
                         share_points(w.services, w.critical_time, w.critical_total),
                         w.start_ns, now_ns),
            gauge_metric("mlagent.latency.stage.share", "1",
                         "Share of end-to-end duration spent in a stage, over the last "
                         "window's traces that contain the stage.",
                         share_points(w.stages, w.stage_time, w.stage_total), w.start_ns,
                         now_ns),
        ]

    async def _send(self, metrics: list[Metric]) -> None:
        """Hand the metrics downstream; a failure is counted, never raised.

        Counters and histograms are cumulative, so the next window re-sends their
        state; what a failed send loses for good is that window's gauges.
        """
        batch = MetricBatch()
        rm = batch.request.resource_metrics.add()
        python_to_anyvalue("mlagent", rm.resource.attributes.add(key="service.name").value)
        sm = rm.scope_metrics.add()
        sm.scope.name = SCOPE
        sm.metrics.extend(metrics)
        if await emit(self._next, batch, self._tel):
            self._tel.sent(Signal.METRICS, batch.item_count)


_span_id = attrgetter("span_id")
_parent_span_id = attrgetter("parent_span_id")


def _bounded_put(cache: dict[Any, Any], key: Any, value: Any, limit: int) -> None:
    """``cache[key] = value``, emptying the cache first when it holds ``limit`` entries
    (raw span names are unbounded; the series they map to are not)."""
    if len(cache) >= limit:
        cache.clear()
    cache[key] = value


def _group(code: np.ndarray, n_codes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(distinct codes, index of each code's group, group sizes)`` for codes in
    ``[0, n_codes)``: counted in a table when it is small (linear time), sorted
    otherwise."""
    if n_codes > 4 * len(code) + 4096:
        uniq, inverse = np.unique(code, return_inverse=True)
        return uniq, inverse, np.bincount(inverse)
    counts = np.bincount(code, minlength=n_codes)
    uniq = np.flatnonzero(counts)
    group_of = np.zeros(n_codes, dtype=np.int64)
    group_of[uniq] = np.arange(len(uniq))
    return uniq, group_of[code], counts[uniq]


def _remap(values: np.ndarray, row_of: Callable[[int, int], int]) -> np.ndarray:
    """``row_of(value, occurrences)`` applied to each distinct value once, broadcast
    back to ``values`` (occurrences: the measurements a row about to take them gets)."""
    uniq, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    return np.asarray([row_of(v, c) for v, c in zip(uniq.tolist(), counts.tolist(),
                                                      strict=True)],
                      dtype=np.int64)[inverse.reshape(-1)]


def _count_overflow_rows(series: Series, rows: np.ndarray) -> None:
    """Count the measurements at ``rows`` that land in ``series``' overflow row."""
    if series.overflow_row is not None:
        series.overflowed += int(np.count_nonzero(rows == series.overflow_row))


def _id_bytes(words: np.ndarray, width: int) -> list[bytes]:
    """Ids held as uint64 words back to their bytes (for exemplars)."""
    buf = np.ascontiguousarray(words).tobytes()
    return [buf[i:i + width] for i in range(0, len(buf), width)]


def _quantile_label(q: float) -> str:
    """``0.99`` -> ``"0.99"``, ``0.5`` -> ``"0.5"`` (as Prometheus summaries write them)."""
    return repr(float(q))

