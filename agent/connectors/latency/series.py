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

from collections.abc import Hashable, Sequence

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


def _grow(a: np.ndarray, n: int, fill: float) -> np.ndarray:
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


class Histograms:
    """Explicit-bucket histograms, one per row, with one exemplar per bucket.

    Bucket ``i`` counts values in ``(bounds[i-1], bounds[i]]`` (the last one is
    unbounded above), as OTLP defines them. The exemplar kept for a bucket is the
    latest value that fell in it, with its trace and span ids, so a slow bucket links
    to a real trace. ``mins``/``maxs`` track the extremes (OTLP ``min``/``max``, and
    the outer edges when quantiles are interpolated).
    """

    def __init__(self, bounds: Sequence[float], *, exemplars: bool = True) -> None:
        self.bounds = np.asarray(bounds, dtype=np.float64)
        self.nb = len(self.bounds) + 1
        self.counts = np.zeros((0, self.nb), dtype=np.int64)
        self.sums = np.zeros(0, dtype=np.float64)
        self.mins = np.zeros(0, dtype=np.float64)
        self.maxs = np.zeros(0, dtype=np.float64)
        self.keep_exemplars = exemplars
        # row * nb + bucket -> (trace_id, span_id, time_unix_nano, value)
        self.exemplars: dict[int, tuple[bytes, bytes, int, float]] = {}

    def add(self, rows: np.ndarray, values: np.ndarray, n_rows: int, *,
            trace_ids: Sequence[bytes] | None = None, span_ids: Sequence[bytes] | None = None,
            times: np.ndarray | None = None) -> None:
        """Record ``values`` (seconds) at ``rows``; ids and times feed the exemplars."""
        if len(values) == 0:
            return
        self.counts = _grow(self.counts, n_rows, 0)
        self.sums = _grow(self.sums, n_rows, 0.0)
        self.mins = _grow(self.mins, n_rows, np.inf)
        self.maxs = _grow(self.maxs, n_rows, -np.inf)
        buckets = np.searchsorted(self.bounds, values, side="left")
        np.add.at(self.counts, (rows, buckets), 1)
        np.add.at(self.sums, rows, values)
        np.minimum.at(self.mins, rows, values)
        np.maximum.at(self.maxs, rows, values)
        if self.keep_exemplars and trace_ids is not None and span_ids is not None \
                and times is not None:
            # The last occurrence of each (row, bucket) in this batch: unique over the
            # reversed cells gives the first index from the end.
            cells = rows.astype(np.int64) * self.nb + buckets
            uniq, first_from_end = np.unique(cells[::-1], return_index=True)
            last = len(cells) - 1 - first_from_end
            ex = self.exemplars
            for cell, i in zip(uniq.tolist(), last.tolist(), strict=True):
                ex[cell] = (trace_ids[i], span_ids[i], int(times[i]), float(values[i]))

    def exemplars_of(self, row: int) -> list[tuple[bytes, bytes, int, float]]:
        """The exemplars of ``row``, in bucket order."""
        base = row * self.nb
        ex = self.exemplars
        return [ex[c] for c in range(base, base + self.nb) if c in ex]

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
