"""Trace assembly: spans buffered by trace until the trace is complete.

Spans of one trace arrive out of order, over many batches, from several services.
A trace is *due* for analysis when its root span (no parent) has arrived and no span
of it has arrived for ``decision_wait`` seconds, or, when the root has not arrived (an
uninstrumented caller, a lost span), once no span of it has arrived for
``root_timeout`` seconds. Quiet time, not age: a long request (a minute-long
generation) keeps exporting child spans before its root, which ends last.
The buffer is bounded by ``max_traces`` and ``max_spans``: the oldest trace is
evicted first and counted with the reason. Spans arriving for a trace already
analysed or evicted are *late* and counted too, rather than starting a second,
partial copy of the trace.

Spans live in a columnar ``SpanStore``; the Python-level bookkeeping is per trace
(last arrival, root seen, span count), touched once per trace per batch.
Times are seconds of the injectable monotonic clock the connector passes in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from agent.connectors.latency.spans import Spans, SpanStore

# Fields of a trace's bookkeeping entry, a small list per trace (cheaper than an object).
_LAST, _ROOT, _COUNT = range(3)


@dataclass
class AddResult:
    """Spans ``TraceBuffer.add`` could not keep, per reason (``late_span``,
    ``invalid_trace_id``, ``max_traces``, ``max_spans``)."""

    dropped: dict[str, int] = field(default_factory=dict)

    def count(self, reason: str, n: int) -> None:
        if n:
            self.dropped[reason] = self.dropped.get(reason, 0) + n


class TraceBuffer:
    """Bounded buffer of pending traces, oldest first (dict insertion order)."""

    def __init__(self, *, max_traces: int, max_spans: int, decision_wait: float,
                 root_timeout: float) -> None:
        self.max_traces = max_traces
        self.max_spans = max_spans
        self.decision_wait = decision_wait
        self.root_timeout = root_timeout
        self.traces: dict[int, list] = {}  # trace key -> [last arrival, has_root, spans]
        self.store = SpanStore()
        self.span_count = 0
        # Keys of traces already analysed or evicted, remembered (FIFO, as many as
        # the buffer holds traces) so their late spans are recognised.
        self._done: dict[int, None] = {}

    def add(self, spans: Spans, arrived: np.ndarray) -> AddResult:
        """Buffer ``spans`` (any traces, any order) that arrived at ``arrived`` (per
        span, clock seconds), then evict down to the limits."""
        out = AddResult()
        keys = spans.key
        uniq, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
        has_root = np.bincount(inverse, weights=spans.pid == 0, minlength=len(uniq)) > 0
        first = np.full(len(uniq), np.inf)
        last = np.full(len(uniq), -np.inf)
        np.minimum.at(first, inverse, arrived)
        np.maximum.at(last, inverse, arrived)
        keep = np.ones(len(uniq), dtype=bool)
        traces, done = self.traces, self._done
        added = 0
        # New traces enter the buffer (and later leave it) in order of first arrival.
        order = np.argsort(first, kind="stable")
        for j, k, c, root, t1 in zip(
                order.tolist(), uniq[order].tolist(), counts[order].tolist(),
                has_root[order].tolist(), last[order].tolist(), strict=True):
            if k == 0:
                out.count("invalid_trace_id", c)
                keep[j] = False
                continue
            t = traces.get(k)
            if t is None:
                if k in done:
                    out.count("late_span", c)
                    keep[j] = False
                    continue
                t = traces[k] = [t1, False, 0]
            t[_LAST] = max(t[_LAST], t1)
            t[_ROOT] = t[_ROOT] or root
            t[_COUNT] += c
            added += c
        self.store.append(spans if keep.all() else spans.take(keep[inverse]))
        self.span_count += added
        evicted: list[int] = []
        while len(traces) > self.max_traces:
            out.count("max_traces", self._forget(evicted))
        while self.span_count > self.max_spans:
            out.count("max_spans", self._forget(evicted))
        if evicted:
            self.store.pop(self.store.where_key_in(np.asarray(evicted, dtype=np.int64)))
        return out

    def due(self, now: float) -> tuple[Spans, int]:
        """Remove the traces ready for analysis at ``now``: their spans and how many."""
        wait, timeout = self.decision_wait, self.root_timeout
        ready = [k for k, t in self.traces.items()
                 if now - t[_LAST] >= (wait if t[_ROOT] else timeout)]
        return self._take(ready), len(ready)

    def drain(self) -> tuple[Spans, int]:
        """Remove every pending trace (at shutdown)."""
        keys = list(self.traces)
        return self._take(keys), len(keys)

    def _take(self, keys: list[int]) -> Spans:
        if not keys:
            return Spans.empty()
        for k in keys:
            self._finish(k)
        if not self.traces:  # everything goes: skip the membership test
            return self.store.pop(np.ones(self.store.n, dtype=bool))
        return self.store.pop(self.store.where_key_in(np.asarray(keys, dtype=np.int64)))

    def _finish(self, key: int) -> int:
        """Forget trace ``key`` (its spans stay in the store); return its span count."""
        n = self.traces.pop(key)[_COUNT]
        self.span_count -= n
        self._done[key] = None
        if len(self._done) > self.max_traces:
            del self._done[next(iter(self._done))]
        return n

    def _forget(self, evicted: list[int]) -> int:
        key = next(iter(self.traces))
        evicted.append(key)
        return self._finish(key)
