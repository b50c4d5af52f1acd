"""Compiled rules: matchers, the value of a series, grouping, aggregation, templates.

``CompiledRule.evaluate`` turns the store's fresh series into one ``GroupResult``
per group (the distinct values of the rule's ``by`` attributes): the aggregated
value, whether the condition holds, the alert's labels and the trace ids of the
series that made it fire.
"""

from __future__ import annotations

import hashlib
import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from agent.exporters.alerts.config import TEMPLATE_RE, RuleConfig, sanitize_label
from agent.exporters.alerts.series import Point, Series, SeriesStore, bucket_quantile

OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le,
    "==": operator.eq, "!=": operator.ne,
}
_AGGREGATES: dict[str, Callable[[np.ndarray], float]] = {
    "max": lambda v: float(v.max()), "min": lambda v: float(v.min()),
    "avg": lambda v: float(v.mean()), "sum": lambda v: float(v.sum()),
    "count": lambda v: float(v.size),
}


def fingerprint(labels: Mapping[str, str]) -> str:
    """A stable hash of a label set: the alert's identity (and PagerDuty's dedup_key)."""
    h = hashlib.sha256()
    for k, v in sorted(labels.items()):
        h.update(k.encode() + b"\xff" + v.encode() + b"\xfe")
    return h.hexdigest()[:16]


def format_value(value: float) -> str:
    """How ``{{ value }}`` prints: up to 6 significant digits."""
    return f"{value:.6g}"


def render(template: str, *, value: float, threshold: float, alertname: str, metric: str,
           severity: str, labels: Mapping[str, str]) -> str:
    """Fill ``{{ value }}``, ``{{ labels.x }}``... (checked by ``config.check_template``)."""
    fields = {"value": format_value(value), "threshold": format_value(threshold),
              "alertname": alertname, "metric": metric, "severity": severity}

    def fill(m: re.Match[str]) -> str:
        name = m.group(1)
        if name.startswith("labels."):
            return labels.get(name[len("labels."):], "")
        return fields.get(name, m.group(0))

    return TEMPLATE_RE.sub(fill, template)


class Matcher:
    """One attribute matcher: ``"x"`` equals, ``"!x"`` differs, ``"~re"`` / ``"!~re"`` regex.

    A leading ``=`` escapes a value that itself starts with ``!``, ``~`` or ``=``.
    Regexes match the whole value. A missing attribute reads as the empty string.
    """

    def __init__(self, key: str, spec: str) -> None:
        self.key = key
        self.negate = spec.startswith("!")
        body = spec[1:] if self.negate else spec
        self.regex: re.Pattern[str] | None = None
        if body.startswith("~"):
            self.regex = re.compile(body[1:])
            self.value = ""
        else:
            self.value = body[1:] if body.startswith("=") else body

    def matches(self, attrs: Mapping[str, str]) -> bool:
        v = attrs.get(self.key, "")
        hit = self.regex.fullmatch(v) is not None if self.regex is not None else v == self.value
        return hit != self.negate


@dataclass
class GroupResult:
    """A rule's outcome for one group at one evaluation."""

    labels: dict[str, str]  # alertname, severity, the rule's labels, the sanitised `by` values
    value: float
    holds: bool
    trace_ids: list[str]  # hex, newest first, from the series that satisfy the condition


class CompiledRule:
    """A ``RuleConfig`` ready to evaluate (regexes compiled once)."""

    def __init__(self, cfg: RuleConfig, max_exemplars: int) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.matchers = [Matcher(k, v) for k, v in cfg.matchers.items()]
        den = cfg.divide_by
        self.den_matchers = (None if den is None else
                             [Matcher(k, v) for k, v in (den.matchers if den.matchers is not None
                                                         else cfg.matchers).items()])
        self.compare = OPS[cfg.op]
        self.aggregate = _AGGREGATES[cfg.aggregate]
        self.max_exemplars = max_exemplars

    @property
    def metrics(self) -> set[str]:
        """The metric names this rule reads."""
        return {self.cfg.metric} | ({self.cfg.divide_by.metric} if self.cfg.divide_by else set())

    def static_labels(self, group: Mapping[str, str]) -> dict[str, str]:
        """The alert's label set for a group (values of ``by`` attributes, sanitised names)."""
        cfg = self.cfg
        labels = {sanitize_label(k): v for k, v in group.items() if v != ""}
        base = {"alertname": cfg.name, "severity": cfg.severity}
        rendered = {k: render(v, value=math.nan, threshold=cfg.threshold, alertname=cfg.name,
                              metric=cfg.metric, severity=cfg.severity, labels=labels)
                    for k, v in cfg.labels.items()}
        return {**labels, **{k: v for k, v in rendered.items() if v != ""}, **base}

    def annotations(self, value: float, labels: Mapping[str, str]) -> dict[str, str]:
        """The rule's annotations rendered for one alert; a default ``summary`` if none."""
        cfg = self.cfg
        out = {k: render(v, value=value, threshold=cfg.threshold, alertname=cfg.name,
                         metric=cfg.metric, severity=cfg.severity, labels=labels)
               for k, v in cfg.annotations.items()}
        if "summary" not in out:
            out["summary"] = (f"{cfg.name}: {cfg.aggregate} of {cfg.metric} is "
                              f"{format_value(value)} ({cfg.op} {format_value(cfg.threshold)})")
        return out

    def evaluate(self, store: SeriesStore, now: float, staleness: float) -> list[GroupResult]:
        """One ``GroupResult`` per group that has fresh, usable series."""
        cfg = self.cfg
        num = self._grouped(store.fresh(cfg.metric, now, staleness), self.matchers)
        den = None
        if cfg.divide_by is not None and self.den_matchers is not None:
            den = self._grouped(store.fresh(cfg.divide_by.metric, now, staleness),
                                self.den_matchers)
        results = []
        for key, members in num.items():
            values = np.fromiter((v for _, v in members), dtype=np.float64, count=len(members))
            value = self.aggregate(values)
            if den is not None:
                dmembers = den.get(key)
                if not dmembers:
                    continue
                divisor = self.aggregate(np.fromiter((v for _, v in dmembers), dtype=np.float64,
                                                     count=len(dmembers)))
                if divisor == 0 or math.isnan(divisor):
                    continue
                value /= divisor
            holds = not math.isnan(value) and self.compare(value, cfg.threshold)
            group = dict(zip(cfg.by, key, strict=True))
            results.append(GroupResult(self.static_labels(group), value, holds,
                                       self._trace_ids(members, holds)))
        return results

    def _grouped(self, series: list[Series], matchers: list[Matcher]
                 ) -> dict[tuple[str, ...], list[tuple[Series, float]]]:
        """Matching series with a usable value, by the values of the ``by`` attributes."""
        by = self.cfg.by
        groups: dict[tuple[str, ...], list[tuple[Series, float]]] = {}
        for s in series:
            if not all(m.matches(s.attrs) for m in matchers):
                continue
            v = self._series_value(s)
            if v is None or math.isnan(v):
                continue
            groups.setdefault(tuple(s.attrs.get(b, "") for b in by), []).append((s, v))
        return groups

    def _series_value(self, s: Series) -> float | None:
        cfg = self.cfg
        p = s.latest
        if cfg.quantile is not None:
            if p.bucket_counts:
                return bucket_quantile(cfg.quantile, p.bounds, p.bucket_counts)
            if p.quantiles is not None:
                return p.quantiles.get(cfg.quantile)
            return None
        if not cfg.rate:
            return _stat(p, cfg.stat)
        # Rates: a delta point covers [start, time]; a cumulative one is compared
        # with the series' previous point, and a drop means the counter restarted.
        v = _stat(p, cfg.stat)
        if p.delta:
            span = (p.time_ns - p.start_ns) / 1e9
            return v / span if span > 0 else None
        prev = s.previous
        if prev is None:
            return None
        pv = _stat(prev, cfg.stat)
        dt = (p.time_ns - prev.time_ns) / 1e9
        if dt <= 0:
            return None
        if v >= pv:
            return (v - pv) / dt
        span = (p.time_ns - p.start_ns) / 1e9 if p.start_ns else 0.0
        return v / span if span > 0 else None

    def _trace_ids(self, members: list[tuple[Series, float]], holds: bool) -> list[str]:
        """Trace ids of the series that satisfy the condition (all series if none does,
        or when the value is a ratio, which no single series' value can be compared to)."""
        threshold, compare = self.cfg.threshold, self.compare
        firing = ([s for s, v in members if compare(v, threshold)]
                  if holds and self.cfg.divide_by is None else [])
        chosen = firing or [s for s, _ in members]
        chosen.sort(key=lambda s: s.latest.arrived, reverse=True)
        out: dict[str, None] = {}
        for s in chosen:
            for trace_id, _span_id in s.exemplars:
                out.setdefault(trace_id)
                if len(out) >= self.max_exemplars:
                    return list(out)
        return list(out)


def _stat(p: Point, stat: str) -> float:
    """``value``, ``count``, ``sum`` or ``mean`` (sum / count) of a point."""
    if stat == "mean":
        return p.sum / p.count if p.count else math.nan
    return float(getattr(p, stat))
