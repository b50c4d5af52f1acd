"""Bounded metric series and their numpy state: sums and explicit-bucket histograms.

A ``Series`` table maps an attribute tuple (``("svc", "GET /x", "SPAN_KIND_SERVER")``) to a row
number; the state of a metric lives in numpy arrays indexed by row and is updated
with vectorised calls (``np.add.at`` and friends), one call per batch rather than one
Python operation per span. A table holds at most ``max_series`` rows plus one
overflow row, which carries the attribute ``otel.metric.overflow="true"`` and
absorbs every key that arrives once the table is full (the OpenTelemetry SDK's
cardinality-limit behaviour).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np

OVERFLOW_ATTRIBUTES = {"otel.metric.overflow": "true"}


class Series:
    """Rows keyed by attribute tuples, at most ``max_series`` of them plus overflow.

    ``attribute_names`` names the key's positions when points are emitted.
    ``start_ns`` is the Unix time each row was first seen: the ``start_time`` of its
    cumulative points, fixed for the life of the series. ``overflowed`` counts the
    measurements routed to the overflow row (read and reset by the owner).
    """

    def __init__(self, attribute_names: Sequence[str], max_series: int) -> None:
        self.attribute_names = tuple(attribute_names)
        self.max_series = max_series
        self.keys: list[Hashable | None] = []  # None marks the overflow row
        self.start_ns: list[int] = []
        self.index: dict[Hashable, int] = {}
        self.overflow_row: int | None = None
        self.overflowed = 0

    def __len__(self) -> int:
        return len(self.keys)

    def row(self, key: Hashable, now_ns: int, weight: int = 1) -> int:
        """The row of ``key``, created on first sight, or the overflow row when full.

        A ``None`` key (derived from another table's overflow row) goes to the
        overflow row too. ``weight`` is how many measurements the caller is about to add, counted in
        ``overflowed`` when they land in the overflow row.
        """
        row = self.index.get(key)
        if row is not None:
            return row
        if key is not None and len(self.index) < self.max_series:
            row = self.index[key] = len(self.keys)
            self.keys.append(key)
            self.start_ns.append(now_ns)
            return row
        if self.overflow_row is None:
            self.overflow_row = len(self.keys)
            self.keys.append(None)
            self.start_ns.append(now_ns)
        self.overflowed += weight
        return self.overflow_row

    def attributes(self, row: int) -> dict[str, object]:
        """The data point attributes of ``row``."""
        key = self.keys[row]
        if key is None:
            return dict(OVERFLOW_ATTRIBUTES)
        values = key if isinstance(key, tuple) else (key,)
        return dict(zip(self.attribute_names, values, strict=True))


def _grow(a: np.ndarray, n: int, fill: object) -> np.ndarray:
    """``a`` with at least ``n`` rows (capacity doubles so growth is amortised)."""
    if len(a) >= n:
        return a
    cap = max(n, 2 * len(a), 8)
    out = np.full((cap, *a.shape[1:]), fill, dtype=a.dtype)
    out[: len(a)] = a
    return out


class Sums:
    """One float per row: a cumulative sum (calls, seconds) or a window accumulator."""

    def __init__(self) -> None:
        self.values = np.zeros(0, dtype=np.float64)

    def add(self, rows: np.ndarray, values: np.ndarray | float, n_rows: int) -> None:
        """Add ``values`` (one per entry of ``rows``, or a scalar) at ``rows``."""
        self.values = _grow(self.values, n_rows, 0.0)
        np.add.at(self.values, rows, values)



# The ids of the values at some indices of a batch (for the exemplars picked).
IdsAt = Callable[[list[int]], Sequence[bytes]]


def ids_of(ids: Sequence[bytes]) -> IdsAt:
    """``IdsAt`` of ids held in a sequence."""
    return lambda picked: [ids[i] for i in picked]

@dataclass
class Grouped:
    """One batch of values summarised per group: what a histogram row takes in.

    ``last[g, b]`` is the index (into the batch) of group ``g``'s latest value in
    bucket ``b``, -1 when none fell there: the candidate exemplar.
    """

    counts: np.ndarray  # (groups, buckets) int64
    sums: np.ndarray
    mins: np.ndarray
    maxs: np.ndarray
    last: np.ndarray  # (groups, buckets) int64

    @classmethod
    def of(cls, group: np.ndarray, n_groups: int, buckets: np.ndarray, values: np.ndarray,
           nb: int) -> Grouped:
        """Summarise ``values`` (their ``buckets``) by ``group`` (ids below ``n_groups``):
        counting and ufunc.at over 1-D arrays, linear in the values, no sort."""
        cells = group.astype(np.int64) * nb + buckets
        mins = np.full(n_groups, np.inf)
        maxs = np.full(n_groups, -np.inf)
        np.minimum.at(mins, group, values)
        np.maximum.at(maxs, group, values)
        last = np.full(n_groups * nb, -1, dtype=np.int64)
        np.maximum.at(last, cells, np.arange(len(values)))
        return cls(np.bincount(cells, minlength=n_groups * nb).reshape(n_groups, nb),
                   np.bincount(group, weights=values, minlength=n_groups), mins, maxs,
                   last.reshape(n_groups, nb))


class Histograms:
    """Explicit-bucket histograms, one per row, with one exemplar per bucket.

    Bucket ``i`` counts values in ``(bounds[i-1], bounds[i]]`` (the last one is
    unbounded above), as OTLP defines them. The exemplar kept for a bucket is the
    latest value that fell in it, with its trace and span ids, so a slow bucket links
    to a real trace. ``mins``/``maxs`` track the extremes (OTLP ``min``/``max``, and
    the outer edges when quantiles are interpolated). Exemplars live in per-cell
    arrays (row, bucket) so a batch updates them with a few vectorised assignments.
    """

    def __init__(self, bounds: Sequence[float], *, exemplars: bool = True) -> None:
        self.bounds = np.asarray(bounds, dtype=np.float64)
        self.nb = len(self.bounds) + 1
        self.counts = np.zeros((0, self.nb), dtype=np.int64)
        self.sums = np.zeros(0, dtype=np.float64)
        self.mins = np.zeros(0, dtype=np.float64)
        self.maxs = np.zeros(0, dtype=np.float64)
        self.keep_exemplars = exemplars
        # Per (row, bucket): the exemplar's trace and span ids (bytes; None: no
        # exemplar yet), time (Unix ns) and value.
        self._ex_trace = np.full((0, self.nb), None, dtype=object)
        self._ex_span = np.full((0, self.nb), None, dtype=object)
        self._ex_time = np.zeros((0, self.nb), dtype=np.int64)
        self._ex_value = np.zeros((0, self.nb), dtype=np.float64)

    def buckets(self, values: np.ndarray) -> np.ndarray:
        """The bucket index of each value (to share between histograms of equal bounds)."""
        return np.searchsorted(self.bounds, values, side="left")

    def add(self, rows: np.ndarray, values: np.ndarray, n_rows: int, *,
            trace_ids: Sequence[bytes] | None = None, span_ids: Sequence[bytes] | None = None,
            times: np.ndarray | None = None) -> None:
        """Record ``values`` (seconds) at ``rows``; ids and times feed the exemplars."""
        if len(values) == 0:
            return
        uniq, group = np.unique(rows, return_inverse=True)
        grouped = Grouped.of(group, len(uniq), self.buckets(values), values, self.nb)
        self.merge(uniq, grouped, n_rows,
                   trace_ids=None if trace_ids is None else ids_of(trace_ids),
                   span_ids=None if span_ids is None else ids_of(span_ids),
                   times=times, values=values)

    def merge(self, rows: np.ndarray, g: Grouped, n_rows: int, *,
              trace_ids: IdsAt | None = None, span_ids: IdsAt | None = None,
              times: np.ndarray | None = None, values: np.ndarray | None = None) -> None:
        """Add the summary ``g`` of a batch, group ``i`` into row ``rows[i]`` (groups
        may share a row). The exemplars take ``trace_ids``, ``span_ids``, ``times`` and
        ``values`` of the batch, indexed by ``g.last``."""
        self.counts = _grow(self.counts, n_rows, 0)
        self.sums = _grow(self.sums, n_rows, 0.0)
        self.mins = _grow(self.mins, n_rows, np.inf)
        self.maxs = _grow(self.maxs, n_rows, -np.inf)
        np.add.at(self.counts, rows, g.counts)
        np.add.at(self.sums, rows, g.sums)
        np.minimum.at(self.mins, rows, g.mins)
        np.maximum.at(self.maxs, rows, g.maxs)
        if not self.keep_exemplars or trace_ids is None or span_ids is None \
                or times is None or values is None:
            return
        self._ex_trace = _grow(self._ex_trace, n_rows, None)
        self._ex_span = _grow(self._ex_span, n_rows, None)
        self._ex_time = _grow(self._ex_time, n_rows, 0)
        self._ex_value = _grow(self._ex_value, n_rows, 0.0)
        group, bucket = np.nonzero(g.last >= 0)
        index = g.last[group, bucket]
        # Where groups share a row, the latest value wins: unique over the cells
        # ordered latest first keeps each cell's latest.
        latest_first = np.argsort(index)[::-1]
        cells = (rows[group] * self.nb + bucket)[latest_first]
        cells, first = np.unique(cells, return_index=True)
        pick = index[latest_first][first]
        r, b = np.divmod(cells, self.nb)
        self._ex_time[r, b] = times[pick]
        self._ex_value[r, b] = values[pick]
        picked = pick.tolist()
        self._ex_trace[r, b] = trace_ids(picked)
        self._ex_span[r, b] = span_ids(picked)

    def exemplars_of(self, row: int) -> list[tuple[bytes, bytes, int, float]]:
        """The exemplars of ``row`` as ``(trace_id, span_id, time, value)``, in bucket order."""
        if row >= len(self._ex_trace):
            return []
        return [(t, s, int(tm), float(v)) for t, s, tm, v in zip(
            self._ex_trace[row], self._ex_span[row], self._ex_time[row].tolist(),
            self._ex_value[row].tolist(), strict=True) if t is not None]

    def quantiles(self, qs: Sequence[float]) -> np.ndarray:
        """``(rows, len(qs))`` estimates, interpolated linearly within the bucket.

        The bucket's edges are narrowed to the observed min and max, so the first and
        the unbounded last bucket get finite edges and a single-valued row is exact.
        Rows without observations give NaN.
        """
        counts = self.counts
        rows = len(counts)
        out = np.full((rows, len(qs)), np.nan)
        if rows == 0:
            return out
        total = counts.sum(axis=1)
        cum = counts.cumsum(axis=1)
        lower_edges = np.concatenate(([-np.inf], self.bounds))
        upper_edges = np.concatenate((self.bounds, [np.inf]))
        has = total > 0
        idx = np.arange(rows)
        mins, maxs = self.mins[:rows], self.maxs[:rows]
        with np.errstate(invalid="ignore"):  # empty rows give inf - inf: NaN by design
            for j, q in enumerate(qs):
                rank = q * total
                # The first bucket whose cumulative count reaches the rank.
                b = np.minimum((cum < rank[:, None]).sum(axis=1), self.nb - 1)
                in_bucket = counts[idx, b]
                before = cum[idx, b] - in_bucket
                lo = np.maximum(lower_edges[b], mins)
                hi = np.minimum(upper_edges[b], maxs)
                frac = np.divide(rank - before, in_bucket, out=np.zeros(rows),
                                 where=in_bucket > 0)
                out[:, j] = np.where(has, lo + (hi - lo) * np.clip(frac, 0.0, 1.0), np.nan)
        return out
