"""OTLP metrics -> Prometheus: names, units, labels, job/instance, delta -> cumulative.

Shared by the ``prometheus`` (pull) and ``prometheus_remote_write`` exporters, and by
anything else that must name OTel metrics the way Prometheus users will query them.
The rules follow the OpenTelemetry Collector's Prometheus translator (see
``/work/shared/specs/PROTOCOLS.md``):

- Metric names: every character outside ``[a-zA-Z0-9_:]`` becomes ``_`` (runs of ``_``
  collapse), a leading digit gets a ``_`` prefix; the unit is appended as a word
  (``s`` -> ``_seconds``, ``By`` -> ``_bytes``, ``By/s`` -> ``_bytes_per_second``,
  ``1`` -> ``_ratio`` on gauges only, ``{requests}`` annotations dropped) unless the name
  already ends with it; monotonic sums become counters whose samples end in ``_total``.
- Label names: invalid characters -> ``_``; a leading digit gets ``key_``, a leading
  single ``_`` gets ``key`` (``__`` names are reserved by Prometheus and get ``key`` too).
  When two attributes sanitize to the same label name their values are joined with
  ``;`` in the order of the original keys, as the collector does.
- Resources: ``job`` = ``service.namespace/service.name`` (or ``service.name``),
  ``instance`` = ``service.instance.id``, else ``host.name``, else a stable hash of
  the resource attributes. Both label every series; the other resource attributes go
  to one ``target_info`` series per job/instance, unless promoted to labels
  (``resource_to_telemetry_conversion`` for all, ``promote_resource_attributes`` for
  chosen ones).
- Temporality: delta sums and delta (exponential) histograms are accumulated into
  cumulative series here, so both exporters see only cumulative values.
- Exponential histograms are exposed as classic histograms whose ``le`` bounds are the
  boundaries ``2**(i / 2**scale)`` of a scale no finer than the point's own, lowered
  until the populated buckets number at most ``exponential_histogram_max_buckets``
  (or two per sign, when the values straddle +-1, a boundary at every scale).
  Negative buckets come first, then one bucket ``le = zero_threshold`` for the zero
  count. Points with a scale outside -10..20 are refused. Delta points of one series
  merge at the coarser of their scales, lowered by the same rule, so the running total
  stays within the same bound.
- With ``add_metric_suffixes`` off, names are left as they are: no unit word, and a
  counter's samples end in ``_total`` only when its OTel name does (OpenMetrics, which
  requires the suffix, still writes it; its ``TYPE`` line names the family without).

``Translator.translate(request)`` yields one ``PromPoint`` per OTLP data point (and one
``target_info`` point per resource); it never raises on bad input but counts what it
skips, by reason, for ``Translator.take_skipped``.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality

from agent.config import Duration
from agent.pdata import anyvalue_to_python

COUNTER = "counter"
GAUGE = "gauge"
HISTOGRAM = "histogram"
SUMMARY = "summary"
INFO = "info"  # target_info: a gauge of value 1 in text 0.0.4, an info family in OpenMetrics

TARGET_INFO = "target_info"

# The scales the OTel data model allows for exponential histograms (bucket bounds
# 2**(1024*i) at the coarsest); points outside are refused as invalid.
MIN_EXPONENTIAL_SCALE = -10
MAX_EXPONENTIAL_SCALE = 20

# Prometheus' StaleNaN: the sample value that marks a series as ended (remote write).
STALE_NAN = float(np.array(0x7FF0000000000002, dtype=np.uint64).view(np.float64))

_DELTA = AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA
# DataPointFlags.DATA_POINT_FLAGS_NO_RECORDED_VALUE_MASK: the series ended (staleness).
_NO_RECORDED_VALUE = 1

# Attribute keys that would clash with the labels Prometheus adds to these kinds.
_RESERVED = {HISTOGRAM: frozenset({"le"}), SUMMARY: frozenset({"quantile"})}

# OpenMetrics: the label names and values of one exemplar may hold at most 128 runes.
EXEMPLAR_MAX_RUNES = 128

# ----------------------------------------------------------------------------- names

_INVALID_METRIC_CHARS = re.compile(r"[^a-zA-Z0-9_:]+")
_INVALID_LABEL_CHARS = re.compile(r"[^a-zA-Z0-9_]")
_MULTI_UNDERSCORE = re.compile(r"__+")
_UNIT_ANNOTATION = re.compile(r"\{[^}]*\}")

# UCUM unit -> Prometheus word (the collector's table).
UNIT_WORDS: dict[str, str] = {
    "d": "days", "h": "hours", "min": "minutes", "s": "seconds", "ms": "milliseconds",
    "us": "microseconds", "ns": "nanoseconds",
    "By": "bytes", "KiBy": "kibibytes", "MiBy": "mebibytes", "GiBy": "gibibytes",
    "TiBy": "tibibytes", "KBy": "kilobytes", "MBy": "megabytes", "GBy": "gigabytes",
    "TBy": "terabytes", "B": "bytes", "KB": "kilobytes", "MB": "megabytes", "GB": "gigabytes",
    "m": "meters", "V": "volts", "A": "amperes", "J": "joules", "W": "watts", "g": "grams",
    "Cel": "celsius", "Hz": "hertz", "%": "percent",
}
# The denominator of a rate unit ("By/s" -> "per_second").
PER_UNIT_WORDS: dict[str, str] = {
    "s": "second", "m": "minute", "min": "minute", "h": "hour", "d": "day", "w": "week",
    "mo": "month", "y": "year",
}


def unit_suffix(unit: str, *, gauge: bool) -> str:
    """The Prometheus word(s) for a UCUM unit: ``"By/s"`` -> ``"bytes_per_second"``.

    ``{annotations}`` are dropped; ``"1"`` is ``"ratio"`` on gauges and nothing
    otherwise; unknown units are sanitized and used as they are.
    """
    unit = _UNIT_ANNOTATION.sub("", unit).strip()
    if not unit:
        return ""
    if unit == "1":
        return "ratio" if gauge else ""
    main, _, per = unit.partition("/")
    words = [UNIT_WORDS.get(main, main) if main and main != "1" else ""]
    if per:
        words.append("per_" + PER_UNIT_WORDS.get(per, per))
    return _clean("_".join(w for w in words if w), _INVALID_METRIC_CHARS)


def _clean(name: str, invalid: re.Pattern[str]) -> str:
    return _MULTI_UNDERSCORE.sub("_", invalid.sub("_", name)).strip("_")


@functools.lru_cache(maxsize=4096)
def metric_name(name: str, unit: str = "", *, kind: str = GAUGE, namespace: str = "",
                add_suffixes: bool = True) -> str:
    """The Prometheus family name of an OTel metric (without ``_total``/``_bucket``...).

    A counter's samples are named ``<family>_total``; see ``sample_name``. With
    ``add_suffixes`` off no unit is added, and a counter's ``_total`` is still taken
    off the family (its samples keep it: see ``counter_total``). Cached: the same few
    metric names arrive in every batch.
    """
    out = _clean(name, _INVALID_METRIC_CHARS)
    if namespace:
        out = f"{_clean(namespace, _INVALID_METRIC_CHARS)}_{out}"
    if kind == COUNTER and out.endswith("_total") and len(out) > len("_total"):
        out = out[: -len("_total")]
    if add_suffixes:
        suffix = unit_suffix(unit, gauge=kind == GAUGE)
        if suffix and out != suffix and not out.endswith("_" + suffix):
            out = f"{out}_{suffix}" if out else suffix
    if not out:
        out = "_"
    elif out[0].isdigit():
        out = "_" + out
    return out


def counter_total(name: str, namespace: str = "", *, add_suffixes: bool = True) -> bool:
    """Whether a counter's samples end in ``_total`` in text 0.0.4 and remote write.

    Always with suffixes on. With them off the OTel name is left as it is (the
    OTel-Prometheus compatibility spec): ``requests_total`` keeps its ``_total`` (and
    does not get a second one), ``requests`` gets none. OpenMetrics requires the
    suffix on counter samples and writes it regardless.
    """
    if add_suffixes:
        return True
    return metric_name(name, namespace=namespace, add_suffixes=False) != metric_name(
        name, kind=COUNTER, namespace=namespace, add_suffixes=False)


def sample_name(family: str, kind: str, total: bool = True) -> str:
    """The sample name of a counter is ``<family>_total`` (unless ``total`` is false, see
    ``counter_total``); other kinds keep the family."""
    return family + "_total" if kind == COUNTER and total else family


@functools.lru_cache(maxsize=8192)
def label_name(key: str) -> str:
    """A valid Prometheus label name for an attribute key (cached, like ``metric_name``)."""
    out = _INVALID_LABEL_CHARS.sub("_", key)
    if not out:
        return "key_empty"
    if out[0].isdigit():
        return "key_" + out
    if out[0] == "_":
        return "key" + out
    return out


def format_float(v: float) -> str:
    """A sample or ``le``/``quantile`` value as Prometheus writes it: ``+Inf``, ``-Inf``,
    ``NaN``, ``1.0``, ``1e-05`` (both exporters, so ``le`` values match between them)."""
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def label_value(value: Any) -> str:
    """An attribute value as a label value (lists and maps as compact JSON-ish text)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list):
        return "[" + ",".join(label_value(v) for v in value) + "]"
    return str(value)


def add_labels(out: dict[str, str], attrs: Iterable[Any], *, only: frozenset[str] | None = None,
               skip: frozenset[str] = frozenset()) -> None:
    """Add OTLP ``KeyValue`` attributes to ``out`` as labels (collisions joined with ``;``).

    Keys are taken in sorted order so that a collision joins values the same way every
    time. ``only`` limits which keys are taken; ``skip`` excludes keys. Empty values are
    left out (Prometheus treats an empty label as an absent one).
    """
    pairs = []
    for kv in attrs:
        if (only is not None and kv.key not in only) or kv.key in skip:
            continue
        v = label_value(anyvalue_to_python(kv.value))
        if v:
            pairs.append((kv.key, v))
    pairs.sort()
    seen: set[str] = set()  # label names set by these attrs (a join, not an overwrite)
    for key, v in pairs:
        name = label_name(key)
        if name in seen:
            out[name] = f"{out[name]};{v}"
        else:
            out[name] = v
            seen.add(name)


# ----------------------------------------------------------------------------- resources

SERVICE_NAME = "service.name"
SERVICE_NAMESPACE = "service.namespace"
SERVICE_INSTANCE = "service.instance.id"
HOST_NAME = "host.name"
_IDENTITY_KEYS = frozenset({SERVICE_NAME, SERVICE_NAMESPACE, SERVICE_INSTANCE})


def job_instance(attrs: dict[str, Any]) -> tuple[str, str]:
    """``(job, instance)`` of a resource (attribute dict); either may be empty for job."""
    name = label_value(attrs.get(SERVICE_NAME))
    ns = label_value(attrs.get(SERVICE_NAMESPACE))
    job = f"{ns}/{name}" if ns and name else name
    instance = label_value(attrs.get(SERVICE_INSTANCE)) or label_value(attrs.get(HOST_NAME))
    if not instance:
        # Stable across restarts for the same resource, so series do not churn.
        text = "\x00".join(f"{k}={label_value(v)}" for k, v in sorted(attrs.items()))
        instance = hashlib.sha1(text.encode()).hexdigest()[:16]
    return job, instance


# ----------------------------------------------------------------------------- points


@dataclass
class Exemplar:
    """An exemplar: trace and span ids (hex) plus filtered attributes, value, time (ms)."""

    labels: dict[str, str]
    value: float
    time_ms: int


@dataclass
class HistogramValue:
    """A classic histogram: ``bounds`` (upper, ascending, +Inf implied) and per-bucket counts.

    ``counts`` has ``len(bounds) + 1`` entries (the last is the +Inf bucket) and is not
    cumulative; ``exemplars`` maps a bucket index to its latest exemplar.
    """

    bounds: tuple[float, ...]
    counts: np.ndarray
    sum: float
    count: float
    exemplars: dict[int, Exemplar] = field(default_factory=dict)

    def cumulative(self) -> np.ndarray:
        return np.cumsum(self.counts)


@dataclass
class SummaryValue:
    quantiles: tuple[tuple[float, float], ...]  # (quantile, value)
    sum: float
    count: float


@dataclass
class PromPoint:
    """One OTLP data point, translated: family, labels and a cumulative value.

    ``labels`` are sorted ``(name, value)`` pairs without ``__name__`` (job and instance
    included). ``value`` is a float for counters and gauges, a ``HistogramValue`` or a
    ``SummaryValue``; ``stale`` marks a point flagged "no recorded value" (the series
    ended). ``exemplar`` is a counter's latest exemplar. ``total`` says whether a
    counter's samples end in ``_total`` outside OpenMetrics (see ``counter_total``).
    """

    family: str
    kind: str
    help: str
    labels: tuple[tuple[str, str], ...]
    time_ms: int
    value: float | HistogramValue | SummaryValue
    stale: bool = False
    exemplar: Exemplar | None = None
    total: bool = True


@dataclass
class TranslationConfig:
    """Translation settings shared by the Prometheus exporters (flattened into their configs)."""

    # Prefix for every metric name (``namespace_name``).
    namespace: str = ""
    # Append unit words and ``_total`` (the OTel compatibility spec's default).
    add_metric_suffixes: bool = True
    # Every resource attribute becomes a label on every series.
    resource_to_telemetry_conversion: bool = False
    # These resource attributes become labels on every series.
    promote_resource_attributes: list[str] = field(default_factory=list)
    # Emit one target_info series per job/instance with the resource attributes.
    target_info: bool = True
    # Exponential histograms are exposed with at most this many buckets.
    exponential_histogram_max_buckets: int = 160
    # Cumulative state kept for delta series (and exposed series) that stopped reporting
    # is forgotten after this long.
    metric_expiration: Duration = 300.0
    # Most series held; points of new series beyond it are dropped and counted.
    max_series: int = 100_000

    def validate(self) -> list[str]:
        errs = []
        if self.namespace and not re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", self.namespace):
            errs.append(f"namespace: {self.namespace!r} is not a valid metric name prefix")
        if self.exponential_histogram_max_buckets < 1:
            errs.append("exponential_histogram_max_buckets: must be >= 1")
        if self.metric_expiration <= 0:
            errs.append("metric_expiration: must be > 0")
        if self.max_series < 1:
            errs.append("max_series: must be >= 1")
        return errs


@dataclass
class _Cumulative:
    """Running state of one delta series: its last point time and cumulative value."""

    last_ns: int
    value: Any  # float | HistogramValue | _ExpState
    seen: float  # monotonic time of the last update, for expiry


class Translator:
    """Stateful OTLP -> ``PromPoint`` translation (the state is delta accumulation).

    Not thread-safe; one per exporter, called from the event loop.
    """

    def __init__(self, cfg: TranslationConfig) -> None:
        self.cfg = cfg
        self._promoted = frozenset(cfg.promote_resource_attributes)
        self._delta: dict[tuple[str, tuple[tuple[str, str], ...]], _Cumulative] = {}
        self.skipped: dict[str, int] = {}

    # --- bookkeeping ------------------------------------------------------------------

    def _skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def take_skipped(self) -> dict[str, int]:
        """Counts of points skipped since the last call, by reason."""
        out, self.skipped = self.skipped, {}
        return out

    def expire(self, now: float | None = None) -> int:
        """Forget delta state not updated for ``metric_expiration``; returns how many."""
        now = time.monotonic() if now is None else now
        horizon = now - self.cfg.metric_expiration
        old = [k for k, c in self._delta.items() if c.seen < horizon]
        for k in old:
            del self._delta[k]
        return len(old)

    # --- translation ------------------------------------------------------------------

    def resource_labels(self, resource: Any) -> tuple[dict[str, str], PromPoint | None]:
        """Labels every series of this resource carries, and its ``target_info`` point."""
        attrs = {kv.key: anyvalue_to_python(kv.value) for kv in resource.attributes}
        job, instance = job_instance(attrs)
        base: dict[str, str] = {}
        if self.cfg.resource_to_telemetry_conversion:
            add_labels(base, resource.attributes)
        elif self._promoted:
            add_labels(base, resource.attributes, only=self._promoted)
        if job:
            base["job"] = job
        base["instance"] = instance
        info = None
        if self.cfg.target_info:
            tl: dict[str, str] = {}
            add_labels(tl, resource.attributes, skip=_IDENTITY_KEYS)
            if job:
                tl["job"] = job
            tl["instance"] = instance
            info = PromPoint(TARGET_INFO, INFO, "Target metadata", tuple(sorted(tl.items())),
                             int(time.time() * 1000), 1.0)
        return base, info

    def translate(self, request: ExportMetricsServiceRequest) -> Iterator[PromPoint]:
        """Yield a ``PromPoint`` for every valid data point of ``request``.

        Each resource first yields its ``target_info`` point (when enabled).
        """
        cfg = self.cfg
        now = time.monotonic()
        for rm in request.resource_metrics:
            base, info = self.resource_labels(rm.resource)
            if info is not None:
                yield info
            identity: dict[str, str] = {k: base[k] for k in ("job", "instance") if k in base}
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    which = m.WhichOneof("data")
                    if which is None:
                        self._skip("no_data")
                        continue
                    data = getattr(m, which)
                    if which == "sum":
                        kind = COUNTER if data.is_monotonic else GAUGE
                    elif which == "exponential_histogram":
                        kind = HISTOGRAM
                    else:
                        kind = which
                    family = metric_name(m.name, m.unit, kind=kind, namespace=cfg.namespace,
                                         add_suffixes=cfg.add_metric_suffixes)
                    total = kind != COUNTER or counter_total(
                        m.name, cfg.namespace, add_suffixes=cfg.add_metric_suffixes)
                    # HELP is never empty (promtool lints that): the OTel name stands in.
                    help = m.description or m.name
                    delta = getattr(data, "aggregation_temporality", 0) == _DELTA
                    reserved = _RESERVED.get(kind, frozenset())
                    for dp in data.data_points:
                        labels = dict(base)
                        add_labels(labels, dp.attributes, skip=reserved)
                        labels.update(identity)  # job/instance are never overwritten
                        key = tuple(sorted(labels.items()))
                        p = self._point(which, kind, family, total, help, key, dp, delta, now)
                        if p is not None:
                            yield p

    def _point(self, which: str, kind: str, family: str, total: bool, help: str,
               key: tuple[tuple[str, str], ...], dp: Any, delta: bool,
               now: float) -> PromPoint | None:
        t_ms = dp.time_unix_nano // 1_000_000 or int(time.time() * 1000)
        # Delta state is per sample name: with suffixes off, counters "x" and "x_total"
        # share a family but are two series.
        series = sample_name(family, kind, total)
        if dp.flags & _NO_RECORDED_VALUE:
            self._delta.pop((series, key), None)
            return PromPoint(family, kind, help, key, t_ms, math.nan, stale=True, total=total)
        value: Any
        exemplar = None
        if which in ("gauge", "sum"):
            v = dp.WhichOneof("value")
            if v is None:
                self._skip("no_value")
                return None
            value = float(getattr(dp, v))
            exemplar = _latest_exemplar(dp.exemplars)
        elif which == "histogram":
            bounds = tuple(dp.explicit_bounds)
            if len(dp.bucket_counts) != len(bounds) + 1 or not _valid_bounds(bounds):
                self._skip("invalid_histogram")
                return None
            value = HistogramValue(bounds, np.asarray(dp.bucket_counts, dtype=np.float64),
                                   dp.sum, float(dp.count))
            _bucket_exemplars(value, dp.exemplars)
        elif which == "exponential_histogram":
            if not MIN_EXPONENTIAL_SCALE <= dp.scale <= MAX_EXPONENTIAL_SCALE:
                self._skip("invalid_histogram")
                return None
            value = _ExpState.from_point(dp)
        elif which == "summary":
            value = SummaryValue(tuple((q.quantile, q.value) for q in dp.quantile_values),
                                 dp.sum, float(dp.count))
        else:
            self._skip("unsupported_type")
            return None

        if delta:
            value = self._accumulate(series, key, dp, value, now)
            if value is None:
                return None
        if isinstance(value, _ExpState):
            value = value.to_explicit(self.cfg.exponential_histogram_max_buckets)
            if not _valid_bounds(value.bounds):
                self._skip("invalid_histogram")  # a zero threshold above the first bucket
                return None
            _bucket_exemplars(value, dp.exemplars)
        return PromPoint(family, kind, help, key, t_ms, value, exemplar=exemplar, total=total)

    def _accumulate(self, series: str, key: tuple[tuple[str, str], ...], dp: Any, value: Any,
                    now: float) -> Any:
        """Add a delta point to its series' running total; None when the point is skipped.

        A point that starts before the previous one ended overlaps data already counted
        (a duplicate or a reordering) and is skipped as ``out_of_order``; a point with a
        gap after the previous one is still added: the gap lost nothing we could know of.
        """
        k = (series, key)
        cur = self._delta.get(k)
        if cur is None:
            if len(self._delta) >= self.cfg.max_series:
                self._skip("series_limit")
                return None
            self._delta[k] = _Cumulative(dp.time_unix_nano, value, now)
            return _copy_value(value)
        if (dp.start_time_unix_nano and dp.start_time_unix_nano < cur.last_ns) or (
                dp.time_unix_nano <= cur.last_ns):
            self._skip("out_of_order")
            return None
        cur.value = _merge(cur.value, value, self.cfg.exponential_histogram_max_buckets)
        cur.last_ns = dp.time_unix_nano
        cur.seen = now
        return _copy_value(cur.value)


def _valid_bounds(bounds: tuple[float, ...]) -> bool:
    """Finite and strictly ascending, as ``le`` values must be (+Inf is implied)."""
    return all(map(math.isfinite, bounds)) and all(
        a < b for a, b in itertools.pairwise(bounds))


def _copy_value(v: Any) -> Any:
    if isinstance(v, HistogramValue):
        return HistogramValue(v.bounds, v.counts.copy(), v.sum, v.count, dict(v.exemplars))
    if isinstance(v, _ExpState):
        return v.copy()
    return v


def _merge(acc: Any, new: Any, max_buckets: int) -> Any:
    """``acc + new`` for delta values of one series; a changed bucket layout restarts it.

    ``max_buckets`` bounds the buckets of merged exponential histograms.
    """
    if isinstance(acc, float):
        return acc + new
    if isinstance(acc, HistogramValue):
        if acc.bounds != new.bounds:
            return new
        acc.counts += new.counts
        acc.sum += new.sum
        acc.count += new.count
        acc.exemplars.update(new.exemplars)
        return acc
    if isinstance(acc, _ExpState):
        return acc.merge(new, max_buckets)
    return new  # summaries have no delta form


def _exemplar(e: Any) -> Exemplar:
    labels: dict[str, str] = {}
    if e.trace_id:
        labels["trace_id"] = e.trace_id.hex()
    if e.span_id:
        labels["span_id"] = e.span_id.hex()
    budget = EXEMPLAR_MAX_RUNES - sum(len(k) + len(v) for k, v in labels.items())
    extra: dict[str, str] = {}
    add_labels(extra, e.filtered_attributes)
    for k, v in extra.items():  # filtered attributes only while they fit in 128 runes
        if k not in labels and len(k) + len(v) <= budget:
            labels[k] = v
            budget -= len(k) + len(v)
    v = e.WhichOneof("value")
    return Exemplar(labels, float(getattr(e, v)) if v else 0.0, e.time_unix_nano // 1_000_000)


def _latest_exemplar(exemplars: Any) -> Exemplar | None:
    if not exemplars:
        return None
    return _exemplar(max(exemplars, key=lambda e: e.time_unix_nano))


def _bucket_exemplars(h: HistogramValue, exemplars: Any) -> None:
    """Put each exemplar on the bucket its value falls in (the latest one wins)."""
    for e in sorted(exemplars, key=lambda e: e.time_unix_nano):
        ex = _exemplar(e)
        h.exemplars[int(np.searchsorted(h.bounds, ex.value, side="left"))] = ex


# ----------------------------------------------------------------------------- exponential


@dataclass
class _ExpState:
    """An exponential histogram (one point, or a delta series' running total).

    Bucket ``i`` at scale ``s`` holds values in ``(base**i, base**(i+1)]`` with
    ``base = 2**(2**-s)``; negative buckets mirror it.
    """

    scale: int
    zero_count: float
    zero_threshold: float
    pos_offset: int
    pos: np.ndarray
    neg_offset: int
    neg: np.ndarray
    sum: float
    count: float

    @classmethod
    def from_point(cls, dp: Any) -> _ExpState:
        return cls(dp.scale, float(dp.zero_count), dp.zero_threshold,
                   dp.positive.offset, np.asarray(dp.positive.bucket_counts, dtype=np.float64),
                   dp.negative.offset, np.asarray(dp.negative.bucket_counts, dtype=np.float64),
                   dp.sum, float(dp.count))

    def copy(self) -> _ExpState:
        return _ExpState(self.scale, self.zero_count, self.zero_threshold, self.pos_offset,
                         self.pos.copy(), self.neg_offset, self.neg.copy(), self.sum, self.count)

    def merge(self, other: _ExpState, max_buckets: int) -> _ExpState:
        """``self + other`` as a new state, at the coarser of the two scales or lower.

        The scale is lowered further, before any array is allocated, until the merged
        buckets fit ``max_buckets`` by the rule of ``to_explicit`` (which would lower it
        that far anyway), as the collector's delta-to-cumulative processor bounds its
        merges. Without it, one observation of 1e-6 and a later one of 1000 at scale 20
        would span 31 million buckets (250 MB) kept for the series.
        """
        scale = min(self.scale, other.scale)
        # Trimmed and brought to the common scale: each no larger than its operand.
        ap = _downscale(*_trim(self.pos_offset, self.pos), self.scale - scale)
        bp = _downscale(*_trim(other.pos_offset, other.pos), other.scale - scale)
        an = _downscale(*_trim(self.neg_offset, self.neg), self.scale - scale)
        bn = _downscale(*_trim(other.neg_offset, other.neg), other.scale - scale)
        pos_span = _span(ap, bp)
        neg_span = _span(an, bn)
        target = max(max_buckets, _fewest_buckets(*pos_span) + _fewest_buckets(*neg_span))
        by = 0
        while (_width(*pos_span, by) + _width(*neg_span, by) > target
               and scale - by > MIN_EXPONENTIAL_SCALE):
            by += 1
        po, pc = _add_buckets(*_downscale(*ap, by), *_downscale(*bp, by))
        no, nc = _add_buckets(*_downscale(*an, by), *_downscale(*bn, by))
        return _ExpState(scale - by, self.zero_count + other.zero_count,
                         max(self.zero_threshold, other.zero_threshold), po, pc, no, nc,
                         self.sum + other.sum, self.count + other.count)

    def to_explicit(self, max_buckets: int) -> HistogramValue:
        """Classic buckets at the scale where the populated range fits ``max_buckets``.

        Lowering the scale merges neighbouring buckets pairwise. Buckets either side
        of +-1 never merge (1 is a boundary at every scale), so a sign whose values
        straddle 1 keeps two buckets: the scale is lowered no further than needed.
        """
        pos_off, pos = _trim(self.pos_offset, self.pos)
        neg_off, neg = _trim(self.neg_offset, self.neg)
        target = max(max_buckets, _fewest_buckets(pos_off, pos_off + len(pos) - 1)
                     + _fewest_buckets(neg_off, neg_off + len(neg) - 1))
        scale = self.scale
        while len(pos) + len(neg) > target and scale > MIN_EXPONENTIAL_SCALE:
            scale -= 1
            pos_off, pos = _downscale(pos_off, pos, 1)
            neg_off, neg = _downscale(neg_off, neg, 1)
        # base**i computed as 2**(i / 2**scale): exact at integer powers of two.
        step = 2.0 ** scale
        bounds: list[float] = []
        counts: list[float] = []
        # Negative buckets, most negative first: bucket j covers [-base**(j+1), -base**j).
        for j in range(neg_off + len(neg) - 1, neg_off - 1, -1):
            bounds.append(-_pow2(j / step))
            counts.append(float(neg[j - neg_off]))
        bounds.append(self.zero_threshold)
        counts.append(self.zero_count)
        for i in range(pos_off, pos_off + len(pos)):
            bounds.append(_pow2((i + 1) / step))
            counts.append(float(pos[i - pos_off]))
        counts.append(0.0)  # +Inf: every finite value fell in a bucket above
        bounds, counts = _fold_degenerate(bounds, counts)
        return HistogramValue(tuple(bounds), np.asarray(counts), self.sum, self.count)


def _fewest_buckets(lo: int, hi: int) -> int:
    """How few buckets the populated index range ``lo..hi`` (empty when ``hi < lo``) can
    shrink to by lowering the scale: indexes -1 and 0 stay apart at every scale."""
    if hi < lo:
        return 0
    return 2 if lo < 0 <= hi else 1


def _span(a: tuple[int, np.ndarray], b: tuple[int, np.ndarray]) -> tuple[int, int]:
    """The index range ``lo..hi`` covered by two trimmed bucket runs (``hi < lo``: none)."""
    runs = [(off, off + len(c) - 1) for off, c in (a, b) if len(c)]
    if not runs:
        return 0, -1
    return min(lo for lo, _ in runs), max(hi for _, hi in runs)


def _width(lo: int, hi: int, by: int) -> int:
    """How many buckets the index range ``lo..hi`` spans ``by`` scales lower."""
    return (hi >> by) - (lo >> by) + 1 if hi >= lo else 0


def _pow2(x: float) -> float:
    try:
        return 2.0 ** x
    except OverflowError:  # the top bucket of the largest doubles
        return math.inf


def _fold_degenerate(bounds: list[float], counts: list[float]) -> tuple[list[float], list[float]]:
    """Merge away buckets whose bound overflowed to +-inf or underflowed onto its
    neighbour (extreme offsets), keeping every count and the bounds strictly ascending.

    ``counts`` has one more entry than ``bounds`` (the +Inf bucket).
    """
    out_b: list[float] = []
    out_c: list[float] = []
    carry = 0.0  # counts of dropped buckets whose values lie above the last kept bound
    for b, c in zip(bounds, counts, strict=False):
        if math.isinf(b):
            carry += c  # -inf: its values are above it; +inf: they go to the +Inf bucket
        elif out_b and b <= out_b[-1]:
            out_c[-1] += c + carry  # its values are <= the previous kept bound
            carry = 0.0
        else:
            out_b.append(b)
            out_c.append(c + carry)
            carry = 0.0
    out_c.append(counts[-1] + carry)
    return out_b, out_c


def _trim(offset: int, counts: np.ndarray) -> tuple[int, np.ndarray]:
    """Drop empty buckets at both ends."""
    nz = np.flatnonzero(counts)
    if not len(nz):
        return 0, counts[:0]
    return offset + int(nz[0]), counts[nz[0]: nz[-1] + 1]


def _downscale(offset: int, counts: np.ndarray, by: int) -> tuple[int, np.ndarray]:
    """Merge buckets pairwise ``by`` times (scale s -> s - by): index i -> i >> by."""
    if by <= 0 or not len(counts):
        return offset, counts
    idx = (np.arange(offset, offset + len(counts)) >> by)
    new_off = int(idx[0])
    return new_off, np.bincount(idx - new_off, weights=counts).astype(np.float64)


def _add_buckets(o1: int, c1: np.ndarray, o2: int, c2: np.ndarray) -> tuple[int, np.ndarray]:
    if not len(c1):
        return o2, c2.copy()
    if not len(c2):
        return o1, c1.copy()
    lo = min(o1, o2)
    out = np.zeros(max(o1 + len(c1), o2 + len(c2)) - lo)
    out[o1 - lo: o1 - lo + len(c1)] += c1
    out[o2 - lo: o2 - lo + len(c2)] += c2
    return lo, out
