"""Configuration of the ``latency`` connector: defaults here, validation pure."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from agent.config import Duration

# Inference latencies span sub-millisecond feature lookups to minute-long generations:
# 1 ms .. 60 s, roughly 1-2.5-5 per decade, denser around 10-100 ms where most
# online models sit. Upper bounds are inclusive, as in OTLP explicit-bucket histograms.
SpanKindName = Literal["unspecified", "internal", "server", "client", "producer", "consumer"]
SPAN_KINDS: dict[str, int] = {"unspecified": 0, "internal": 1, "server": 2, "client": 3,
                              "producer": 4, "consumer": 5}

DEFAULT_BUCKETS = [0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5,
                   0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 15.0, 30.0, 60.0]


@dataclass
class StageConfig:
    """One stage of request handling, recognised by span name or attribute.

    A span belongs to the stage when ``span_names`` has a regular expression that
    matches somewhere in its (normalised) name, case-insensitively, or when one of
    ``attributes`` names an attribute the span has whose value (as a string) matches
    the expression. The first stage in the list that matches wins.
    """

    name: str = ""
    span_names: list[str] = field(default_factory=list)
    attributes: dict[str, str] = field(default_factory=dict)
    # Only spans of these kinds belong to a stage. Internal by default: a SERVER span
    # named "POST /predict" covers the whole request (queueing included), so counting
    # it as the inference stage would make inference 100% of every request.
    span_kinds: list[SpanKindName] = field(default_factory=lambda: ["internal"])

    def name_pattern(self) -> re.Pattern[str]:
        """The one expression ``span_names`` compile to (what the connector matches with)."""
        return re.compile("|".join(f"(?:{p})" for p in self.span_names), re.IGNORECASE)

    def validate(self) -> list[str]:
        errors = []
        if not self.name:
            errors.append("name: a stage needs a name")
        for i, pattern in enumerate(self.span_names):
            errors.extend(f"span_names[{i}]: {e}" for e in _regex_errors(pattern))
        if self.span_names and not any(e.startswith("span_names[") for e in errors):
            try:  # each alone may compile and the union not (a global flag like "(?i)")
                self.name_pattern()
            except re.error as e:
                errors.append(f"span_names: the patterns do not combine: {e} (use no inline "
                              "flags; matching is case-insensitive already)")
        for key, pattern in self.attributes.items():
            errors.extend(f"attributes.{key}: {e}" for e in _regex_errors(pattern))
        if not self.span_kinds:
            errors.append("span_kinds: at least one span kind is required")
        if not self.span_names and not self.attributes:
            errors.append("span_names: a stage needs span_names or attributes to match")
        return errors


def default_stages() -> list[StageConfig]:
    """Stages of a typical inference server, matched on span names."""
    return [
        StageConfig("queue", [r"queue", r"\bwait", r"enqueue", r"schedul"]),
        StageConfig("preprocess", [r"pre[-_ ]?process", r"tokeni[sz]", r"featur", r"\bdecode_input"]),
        StageConfig("inference", [r"infer", r"predict", r"forward", r"generat"]),
        StageConfig("postprocess", [r"post[-_ ]?process", r"detokeni[sz]", r"\bencode_output"]),
    ]


@dataclass
class LatencyConfig:
    """``[connectors.latency]``: where each request's time goes, per service and stage.

    ``decision_wait`` is the quiet time after a trace's root span has arrived (and
    after its last span) before the trace is analysed; ``root_timeout`` is the quiet time
    (no span of the trace arriving) after which a trace whose root has not arrived is
    analysed without it.
    ``max_traces``/``max_spans`` bound the assembly buffer (oldest trace evicted first);
    ``max_series`` bounds every metric's series (excess goes to one overflow series).
    ``trace_sample_rate`` is the fraction of traces analysed whole (self time, critical
    path, stages, service graph), chosen by a hash of the trace id; RED metrics count
    every span whatever it is.
    """

    window: Duration = 60.0
    decision_wait: Duration = 10.0
    root_timeout: Duration = 60.0
    max_traces: int = 10_000
    max_spans: int = 200_000
    max_series: int = 2_000
    buckets: list[float] = field(default_factory=lambda: list(DEFAULT_BUCKETS))
    quantiles: list[float] = field(default_factory=lambda: [0.5, 0.95, 0.99])
    normalize_names: bool = True
    # Per-trace analysis of 2% of traces costs little next to the RED metrics, and the
    # default buffer holds decision_wait of them up to ~400k spans/s (8-span traces)
    # without evicting any. At 10k spans/s that is still ~1500 analysed traces a
    # minute; on a quiet host set 1.0 to analyse every trace (README.md).
    trace_sample_rate: float = 0.02
    # Consumed spans are processed together once this many are pending (and at every
    # timer tick): processed one 512-span request at a time, numpy's fixed cost per
    # call made them ~3x as costly per span. Bounds the spans held between ticks.
    flush_spans: int = 8192
    stages: list[StageConfig] = field(default_factory=default_stages)

    def validate(self) -> list[str]:
        errors = []
        if self.window <= 0:
            errors.append("window: must be positive")
        if self.decision_wait < 0:
            errors.append("decision_wait: must not be negative")
        if self.root_timeout < self.decision_wait:
            errors.append("root_timeout: must be at least decision_wait")
        for key in ("max_traces", "max_spans", "max_series", "flush_spans"):
            if getattr(self, key) < 1:
                errors.append(f"{key}: must be at least 1")
        if not 0.0 < self.trace_sample_rate <= 1.0:
            errors.append("trace_sample_rate: must be in (0, 1]")
        if not self.buckets:
            errors.append("buckets: at least one bucket bound is required")
        elif any(b <= 0 for b in self.buckets):
            errors.append("buckets: bounds must be positive seconds")
        elif any(b >= a for a, b in zip(self.buckets[1:], self.buckets, strict=False)):
            errors.append("buckets: bounds must be strictly increasing")
        if any(not 0.0 < q < 1.0 for q in self.quantiles):
            errors.append("quantiles: each quantile must be between 0 and 1 (exclusive)")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            errors.append("stages: stage names must be unique")
        for i, stage in enumerate(self.stages):
            errors.extend(f"stages[{i}].{e}" for e in stage.validate())
        return errors


def _regex_errors(pattern: str) -> list[str]:
    try:
        re.compile(pattern)
    except re.error as e:
        return [f"{pattern!r} is not a regular expression: {e}"]
    return []
