"""The agent's own telemetry: named internal events that count and log.

Every drop, refusal and send failure goes through one method of
``ComponentTelemetry`` that both increments a counter (exposed as
``mlagent_agent_*`` on the health endpoint's ``/metrics``) and writes one
rate-limited structured log line. Components never log a drop by hand.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import generate_latest

LOG = logging.getLogger("mlagent")

# One log line per (component, event, reason) per this many seconds; the next line
# says how many were suppressed meanwhile.
LOG_RATE_LIMIT_S = 10.0


class JsonFormatter(logging.Formatter):
    """One JSON object per line on stderr: journald keeps it, jq reads it."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "info", fmt: str = "json") -> None:
    """Configure the root ``mlagent`` logger (idempotent)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    LOG.handlers[:] = [handler]
    LOG.setLevel(level.upper())
    LOG.propagate = False


def log(level: int, msg: str, **fields: Any) -> None:
    """Log ``msg`` with structured ``fields``."""
    LOG.log(level, msg, extra={"fields": fields})


class RateLimiter:
    """Allows one event per key per interval; counts what it suppressed."""

    def __init__(self, interval: float = LOG_RATE_LIMIT_S) -> None:
        self.interval = interval
        self._last: dict[Any, float] = {}
        self._suppressed: dict[Any, int] = {}
        self._lock = threading.Lock()

    def allow(self, key: Any) -> tuple[bool, int]:
        """(allowed, suppressed since the last allowed one)."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return False, 0
            self._last[key] = now
            return True, self._suppressed.pop(key, 0)


class Telemetry:
    """The agent-wide registry of self-metrics. One per running agent."""

    def __init__(self) -> None:
        # The counters live as long as this object (across reloads): their start time.
        self.started_ns = time.time_ns()
        self.registry = CollectorRegistry(auto_describe=True)
        self.limiter = RateLimiter()
        r = self.registry
        labels = ["component", "signal"]
        self.accepted_items = Counter(
            "mlagent_agent_accepted_items", "Items (spans, points, log records) accepted.",
            labels, registry=r)
        self.refused_items = Counter(
            "mlagent_agent_refused_items", "Items refused to their sender, by reason.",
            [*labels, "reason"], registry=r)
        self.dropped_items = Counter(
            "mlagent_agent_dropped_items", "Items dropped after acceptance, by reason.",
            [*labels, "reason"], registry=r)
        self.sent_items = Counter(
            "mlagent_agent_sent_items", "Items delivered to a backend.", labels, registry=r)
        self.send_failed_items = Counter(
            "mlagent_agent_send_failed_items", "Items whose send attempt failed, by reason.",
            [*labels, "reason"], registry=r)
        self.retries = Counter(
            "mlagent_agent_retries", "Send attempts retried.", labels, registry=r)
        self.queue_size = Gauge(
            "mlagent_agent_queue_size", "Items waiting in a sending queue.", labels, registry=r)
        self.queue_bytes = Gauge(
            "mlagent_agent_queue_bytes", "Bytes waiting in a sending queue.", labels, registry=r)
        self.queue_capacity = Gauge(
            "mlagent_agent_queue_capacity", "Capacity of a sending queue, in items.", labels,
            registry=r)
        self.queue_oldest_age = Gauge(
            "mlagent_agent_queue_oldest_age_seconds", "Age of the oldest queued batch.", labels,
            registry=r)
        self.component_up = Gauge(
            "mlagent_agent_component_up", "1 when the component's status is ok.", ["component"],
            registry=r)
        self.errors = Counter(
            "mlagent_agent_component_errors", "Unexpected errors caught at the graph boundary.",
            ["component"], registry=r)

    def component(self, component_id: str) -> ComponentTelemetry:
        return ComponentTelemetry(self, component_id)

    def exposition(self) -> bytes:
        """Prometheus text format of every self-metric."""
        return generate_latest(self.registry)

    def snapshot(self, component_id: str | None = None) -> dict[str, float]:
        """Current values as ``{"name{label=..}": value}``, optionally for one component."""
        out: dict[str, float] = {}
        for metric in self.registry.collect():
            for s in metric.samples:
                if s.name.endswith("_created"):
                    continue
                if component_id is not None and s.labels.get("component") != component_id:
                    continue
                lbl = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "component")
                key = f"{s.name}{{{lbl}}}" if lbl else s.name
                if component_id is None and "component" in s.labels:
                    key = f"{s.labels['component']}:{key}"
                out[key] = s.value
        return out


class ComponentTelemetry:
    """The named internal events of one component."""

    def __init__(self, telemetry: Telemetry, component_id: str) -> None:
        self.t = telemetry
        self.id = component_id

    # --- counting events -------------------------------------------------------------

    def accepted(self, signal: str, n: int) -> None:
        self.t.accepted_items.labels(self.id, signal).inc(n)

    def sent(self, signal: str, n: int) -> None:
        self.t.sent_items.labels(self.id, signal).inc(n)

    def retried(self, signal: str) -> None:
        self.t.retries.labels(self.id, signal).inc()

    def refused(self, signal: str, n: int, reason: str, error: object = None) -> None:
        """Data answered with an error to its sender (it may retry)."""
        self.t.refused_items.labels(self.id, signal, reason).inc(n)
        self.warn("refused", reason, items=n, signal=signal, error=error)

    def dropped(self, signal: str, n: int, reason: str, error: object = None) -> None:
        """Data that was accepted and will never be delivered."""
        self.t.dropped_items.labels(self.id, signal, reason).inc(n)
        self.warn("dropped", reason, items=n, signal=signal, error=error)

    def send_failed(self, signal: str, n: int, reason: str, error: object = None) -> None:
        """A send attempt failed (it may still be retried)."""
        self.t.send_failed_items.labels(self.id, signal, reason).inc(n)
        self.warn("send failed", reason, items=n, signal=signal, error=error)

    def queue(self, signal: str, *, size: int, nbytes: int, capacity: int, oldest_age: float) -> None:
        t = self.t
        t.queue_size.labels(self.id, signal).set(size)
        t.queue_bytes.labels(self.id, signal).set(nbytes)
        t.queue_capacity.labels(self.id, signal).set(capacity)
        t.queue_oldest_age.labels(self.id, signal).set(oldest_age)

    def gauge(self, name: str, documentation: str, labelnames: tuple[str, ...] = ()) -> Any:
        """A component-specific gauge in the agent registry (``component`` label bound)."""
        return _child(self.t, Gauge, name, documentation, labelnames, self.id)

    def counter(self, name: str, documentation: str, labelnames: tuple[str, ...] = ()) -> Any:
        """A component-specific counter in the agent registry (``component`` label bound)."""
        return _child(self.t, Counter, name, documentation, labelnames, self.id)

    # --- logging ---------------------------------------------------------------------

    def warn(self, event: str, reason: str, **fields: Any) -> None:
        """A rate-limited warning: one line per (component, event, reason) per interval."""
        allowed, suppressed = self.t.limiter.allow((self.id, event, reason))
        if not allowed:
            return
        if suppressed:
            fields["suppressed"] = suppressed
        fields = {k: (str(v) if isinstance(v, BaseException) else v) for k, v in fields.items()
                  if v is not None}
        log(logging.WARNING, f"{self.id}: {event}: {reason}", component=self.id, event=event,
            reason=reason, **fields)

    def info(self, msg: str, **fields: Any) -> None:
        log(logging.INFO, f"{self.id}: {msg}", component=self.id, **fields)

    def error(self, msg: str, **fields: Any) -> None:
        allowed, suppressed = self.t.limiter.allow((self.id, "error", msg))
        if allowed:
            log(logging.ERROR, f"{self.id}: {msg}", component=self.id, suppressed=suppressed,
                **fields)


class _Bound:
    """A labelled metric with the ``component`` label already filled."""

    def __init__(self, metric: Any, component_id: str) -> None:
        self._m = metric
        self._id = component_id

    def labels(self, *values: str) -> Any:
        return self._m.labels(self._id, *values)


_METRICS_LOCK = threading.Lock()


def _child(t: Telemetry, cls: Any, name: str, doc: str, labelnames: tuple[str, ...],
           component_id: str) -> _Bound:
    with _METRICS_LOCK:
        existing = getattr(t, "_extra", None)
        if existing is None:
            existing = t._extra = {}  # type: ignore[attr-defined]
        metric = existing.get(name)
        if metric is None:
            metric = existing[name] = cls(name, doc, ["component", *labelnames], registry=t.registry)
    return _Bound(metric, component_id)
