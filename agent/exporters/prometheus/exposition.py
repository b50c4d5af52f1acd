"""The series store behind ``/metrics`` and its two exposition formats.

``SeriesStore.update(point)`` is O(1): a dict lookup by family name, then by label set,
replacing the series' latest cumulative point. ``render`` walks the store once per
scrape and writes Prometheus text 0.0.4 or OpenMetrics 1.0 (with exemplars and
``# EOF``). Series not updated for ``expiration`` seconds are removed, at render time
and by ``expire()``, so a process that stops reporting stops being exposed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.promnames import (
    COUNTER,
    HISTOGRAM,
    INFO,
    SUMMARY,
    Exemplar,
    HistogramValue,
    PromPoint,
    SummaryValue,
    format_float,
    sample_name,
)

TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"

Labels = tuple[tuple[str, str], ...]


def escape_label_value(v: str) -> str:
    """Backslash, double quote and newline escaped, as both formats require."""
    return v.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def _escape_help(text: str, openmetrics: bool) -> str:
    text = text.replace("\\", "\\\\").replace("\n", "\\n")
    return text.replace("\"", "\\\"") if openmetrics else text


def format_labels(labels: Labels) -> str:
    """``a="1",b="2"`` (no braces), values escaped."""
    return ",".join(f'{k}="{escape_label_value(v)}"' for k, v in labels)


def wants_openmetrics(accept: str | None) -> bool:
    """True when an ``Accept`` header asks for OpenMetrics (with a non-zero q)."""
    for part in (accept or "").split(","):
        media, *params = (x.strip() for x in part.split(";"))
        if media.lower() != "application/openmetrics-text":
            continue
        q = 1.0
        for p in params:
            name, _, val = p.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(val)
                except ValueError:
                    q = 0.0
        if q > 0:
            return True
    return False


@dataclass(slots=True)
class _Series:
    labels_text: str  # formatted once, reused by every scrape
    point: PromPoint
    seen: float


@dataclass(slots=True)
class _Family:
    kind: str
    help: str
    total: bool  # a counter's text samples end in _total (see promnames.counter_total)
    series: dict[Labels, _Series] = field(default_factory=dict)


class SeriesStore:
    """The latest cumulative point of every exposed series, bounded by ``max_series``.

    ``update`` returns ``None`` when the point was stored (or ended its series) and a
    drop reason otherwise: ``type_conflict`` (the family exists with another type, or,
    with suffixes off, as the counter of the other sample name: ``x`` and ``x_total``
    are one OpenMetrics family), ``out_of_order`` (older than the stored point),
    ``series_limit``.
    """

    def __init__(self, *, expiration: float, max_series: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.expiration = expiration
        self.max_series = max_series
        self.clock = clock
        self.families: dict[str, _Family] = {}
        self.series_count = 0

    def update(self, p: PromPoint) -> str | None:
        fam = self.families.get(p.family)
        if fam is None:
            if p.stale:
                return None
            if self.series_count >= self.max_series:
                return "series_limit"
            fam = self.families[p.family] = _Family(p.kind, p.help, p.total)
        elif fam.kind != p.kind or fam.total != p.total:
            return "type_conflict"
        s = fam.series.get(p.labels)
        if p.stale:  # the sender says the series ended: stop exposing it now
            if s is not None:
                del fam.series[p.labels]
                self.series_count -= 1
            return None
        now = self.clock()
        if s is None:
            if self.series_count >= self.max_series:
                return "series_limit"
            fam.series[p.labels] = _Series(format_labels(p.labels), p, now)
            self.series_count += 1
            return None
        if p.time_ms < s.point.time_ms:
            return "out_of_order"
        if p.exemplar is None and s.point.exemplar is not None:
            p.exemplar = s.point.exemplar  # keep showing the last exemplar seen
        s.point = p
        s.seen = now
        if p.help and not fam.help:
            fam.help = p.help
        return None

    def expire(self) -> int:
        """Remove series not updated for ``expiration`` seconds; returns how many."""
        horizon = self.clock() - self.expiration
        removed = 0
        for name in list(self.families):
            fam = self.families[name]
            old = [k for k, s in fam.series.items() if s.seen < horizon]
            for k in old:
                del fam.series[k]
            removed += len(old)
            if not fam.series:
                del self.families[name]
        self.series_count -= removed
        return removed

    # ------------------------------------------------------------------------- render

    def render(self, *, openmetrics: bool, exemplars: bool = True) -> bytes:
        """The whole exposition, families in name order, after expiring old series."""
        self.expire()
        out: list[str] = []
        ex = openmetrics and exemplars
        for name in sorted(self.families):
            fam = self.families[name]
            kind = fam.kind
            if openmetrics:
                # OpenMetrics names the family without the sample suffix: counter
                # "x" has samples "x_total" (required, even with suffixes off), info
                # "target" has "target_info".
                meta_name = name.removesuffix("_info") if kind == INFO else name
                type_name = kind
                sname = sample_name(name, kind)
            else:
                meta_name = sname = sample_name(name, kind, fam.total)
                type_name = "gauge" if kind == INFO else kind
            if fam.help:
                out.append(f"# HELP {meta_name} {_escape_help(fam.help, openmetrics)}")
            out.append(f"# TYPE {meta_name} {type_name}")
            if kind == HISTOGRAM:
                for s in fam.series.values():
                    _histogram(out, name, s, ex)
            elif kind == SUMMARY:
                for s in fam.series.values():
                    _summary(out, name, s)
            else:
                for s in fam.series.values():
                    v = s.point.value
                    assert isinstance(v, float)
                    line = (f"{sname}{{{s.labels_text}}} {format_float(v)}" if s.labels_text
                            else f"{sname} {format_float(v)}")
                    if ex and kind == COUNTER and s.point.exemplar is not None:
                        line += _exemplar(s.point.exemplar)
                    out.append(line)
        if openmetrics:
            out.append("# EOF")
        out.append("")
        return "\n".join(out).encode()


def _exemplar(e: Exemplar) -> str:
    return (f" # {{{format_labels(tuple(e.labels.items()))}}} {format_float(e.value)}"
            f" {e.time_ms / 1000:.3f}")


def _with(labels_text: str, extra: str) -> str:
    return f"{labels_text},{extra}" if labels_text else extra


def _histogram(out: list[str], name: str, s: _Series, ex: bool) -> None:
    h = s.point.value
    assert isinstance(h, HistogramValue)
    lt = s.labels_text
    cum = h.cumulative().tolist()
    les = [*(format_float(b) for b in h.bounds), "+Inf"]
    for i, le in enumerate(les):
        le_label = 'le="' + le + '"'
        line = f"{name}_bucket{{{_with(lt, le_label)}}} {format_float(cum[i])}"
        if ex and i in h.exemplars:
            line += _exemplar(h.exemplars[i])
        out.append(line)
    braces = f"{{{lt}}}" if lt else ""
    out.append(f"{name}_sum{braces} {format_float(h.sum)}")
    out.append(f"{name}_count{braces} {format_float(h.count)}")


def _summary(out: list[str], name: str, s: _Series) -> None:
    v = s.point.value
    assert isinstance(v, SummaryValue)
    lt = s.labels_text
    for q, qv in v.quantiles:
        ql = 'quantile="' + format_float(q) + '"'
        out.append(f"{name}{{{_with(lt, ql)}}} {format_float(qv)}")
    braces = f"{{{lt}}}" if lt else ""
    out.append(f"{name}_sum{braces} {format_float(v.sum)}")
    out.append(f"{name}_count{braces} {format_float(v.count)}")
