"""Which items the drift connector examines, and reading the examined ones cheaply.

Reading an item's attributes from Python costs about 5 µs for a span of a dozen
attributes (upb hands out one wrapper per ``KeyValue`` and per value), several times
what decoding the span costs: reading every prediction at a few hundred thousand spans
per second would be most of the agent's work. The statistics do not need every
prediction: a window's chi-squared tests on ten thousand predictions already detect
any shift worth acting on. So:

- Each **service** is sampled at its own rate, chosen to examine about
  ``target_window_predictions`` predictions per window. The service is known per
  resource (one read per ``Resource*``), so the decision is made before any item is
  touched; model and version are item attributes and would cost the read itself.
- **Low volume is never sampled**: a service is read in full (at the ``sample``
  ceiling, 1 by default) unless its predictions in the current or the previous window
  exceed the target. A deployment, or a test, whose windows hold fewer predictions
  sees every one of them, however fast they arrive.
- Above it, the rate is **adapted every second** (``ADAPT_INTERVAL_S``) from the
  volume of the second before projected over a window, and carries over from one
  window to the next, so a steady stream is sampled uniformly in time. A service
  still read in full whose window count passes the target is adapted before the next
  batch rather than after a whole second of reading everything (its volume is then
  known exactly): at start-up, or after a quiet window, a service is read in full
  for about ``target`` predictions, no more. A rate may fall at once but rise at
  most ``MAX_RISE``-fold per second: an interval in which a low rate happened to pick
  no prediction does not flip it back to 1.
- Items without predictions bound the rate the same way (``max_window_examined``
  items per service and window), so a busy service whose spans seldom or never carry
  a prediction is not read in full either; it then yields fewer than the target.
- Items are chosen **independently** with the service's rate (Bernoulli sampling from
  a seeded generator, so runs are reproducible, and no periodic layout of spans can
  alias with it): within an interval the sample is uniform, so the window's histograms
  are unbiased. The gaps between chosen items are drawn directly (geometric), so a
  scope in which nothing is chosen costs one random number, not one per item.
  The tests run on the examined counts, so their p-values are those of the sample
  actually seen; volumes (``mlagent.prediction.count``, the cumulative histograms)
  are scaled by 1/rate per batch (Horvitz–Thompson: each examined item stands for
  1/rate items).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from agent.component import Signal
from agent.pdata import Batch, ml_attributes, service_name

# A sampled service's rate is re-estimated from the volume of the last second
# (connector's clock); the services are looked at this often for it.
ADAPT_INTERVAL_S = 1.0
CHECK_INTERVAL_S = 0.1
# The most a rate may grow per adaptation; the least it may be (a rate of 0 would
# make the volume estimate, examined / rate, meaningless).
MAX_RISE = 4.0
MIN_RATE = 1e-9



class ServiceRate:
    """One service's sampling rate and the volumes it is adapted from.

    Item counts are exact; prediction counts are estimated (examined / rate).
    """

    __slots__ = ("interval_items", "interval_predictions", "last_items", "last_predictions",
                 "rate", "since", "window_items", "window_predictions")

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.since = now  # start of the current interval
        self.interval_items = 0
        self.interval_predictions = 0.0
        self.window_items = 0  # in the current window so far
        self.window_predictions = 0.0
        self.last_items = 0  # in the last closed window
        self.last_predictions = 0.0


class AdaptiveSampler:
    """Per-service sampling rates that keep about ``target`` predictions per window.

    ``target = 0`` switches adaptation off: every service is read at ``ceiling`` (the
    ``sample`` setting, 1 by default). At most ``max_services`` services get their
    own rate; further ones share one entry (their combined volume sets its rate),
    which keeps both the memory and the cost bounded. Call ``tick`` before each
    batch, ``count_items`` and ``count_predictions`` with what it held, and
    ``close_window`` when the connector closes a window.
    """

    def __init__(self, *, window: float, target: int, max_examined: int, ceiling: float,
                 max_services: int, now: float) -> None:
        self.window = window
        self.target = target
        self.max_examined = max_examined
        self.ceiling = ceiling
        self.max_services = max_services
        self._services: dict[str | None, ServiceRate] = {}
        self._now = now  # the clock at the last tick
        self._checked = now  # when the services were last looked at
        self._due = False  # a service read in full went over a bound: adapt it now

    def service(self, name: str) -> ServiceRate:
        """The entry of service ``name`` (created at the ceiling rate when new)."""
        s = self._services.get(name)
        if s is None:
            key = name if len(self._services) < self.max_services else None
            s = self._services.get(key)
            if s is None:
                s = self._services[key] = ServiceRate(self.ceiling, self._now)
        return s

    def count_items(self, s: ServiceRate, n: int) -> None:
        """Record ``n`` items of service entry ``s`` (examined or not)."""
        s.interval_items += n
        s.window_items += n
        if s.window_items > self.max_examined and s.rate >= self.ceiling:
            self._due = True

    def count_predictions(self, s: ServiceRate, examined: int) -> None:
        """Record ``examined`` predictions of ``s``, read at its current rate."""
        estimate = examined / s.rate
        s.interval_predictions += estimate
        s.window_predictions += estimate
        if s.window_predictions > self.target and s.rate >= self.ceiling:
            self._due = True

    def tick(self, now: float) -> None:
        """Adapt the rates of the services whose interval is over, or that went over a
        bound while read in full (see the module doc)."""
        self._now = now
        if not self.target or (not self._due and
                               self._checked <= now < self._checked + CHECK_INTERVAL_S):
            return
        self._checked, self._due = now, False
        for s in self._services.values():
            elapsed = now - s.since
            if elapsed < 0:  # the clock stepped back: start the interval afresh
                s.since = now
            elif elapsed >= ADAPT_INTERVAL_S or (s.rate >= self.ceiling and self._over(s)):
                self._adapt(s, elapsed, now)

    def _over(self, s: ServiceRate) -> tuple[bool, bool]:
        """Whether the service's predictions, and its items, are above their bounds in
        the current or the last window: only then may it be sampled."""
        return (max(s.window_predictions, s.last_predictions) > self.target,
                max(s.window_items, s.last_items) > self.max_examined)

    def _adapt(self, s: ServiceRate, elapsed: float, now: float) -> None:
        """Set the rate that examines about ``target`` predictions (and at most
        ``max_examined`` items) per window at the interval's volume; start a new interval."""
        per_window = self.window / max(elapsed, CHECK_INTERVAL_S)
        predictions = s.interval_predictions * per_window
        items = s.interval_items * per_window
        over_predictions, over_items = self._over(s)
        want = self.ceiling
        if over_predictions and predictions > self.target:
            want = min(want, self.target / predictions)
        if over_items and items > self.max_examined:
            want = min(want, self.max_examined / items)
        s.rate = max(min(want, s.rate * MAX_RISE), MIN_RATE)
        s.since, s.interval_items, s.interval_predictions = now, 0, 0.0

    def close_window(self) -> None:
        """Start a new window's counts; forget services silent for the whole window."""
        for name, s in list(self._services.items()):
            if not s.window_items:
                del self._services[name]
                continue
            s.last_items, s.last_predictions = s.window_items, s.window_predictions
            s.window_items, s.window_predictions = 0, 0.0


@dataclass
class Sample:
    """The examined items of one batch, in batch order, with what grouping needs."""

    ml: list[dict[str, Any]]  # per item: its ml.* attributes over its resource's
    resource_index: list[int]  # per item: index of its resource
    services: list[str]  # per resource: service.name
    items: list[Any]  # per item: the span / log record itself (for example trace ids)
    rates: dict[str, ServiceRate]  # per service: the entry whose rate chose its items


def read_sample(batch: Batch, sampler: AdaptiveSampler, rng: random.Random) -> Sample:
    """Choose each service's items at its rate and read only the chosen ones.

    Counts every item into its service's volume. The returned item
    references are only valid while the batch is (the caller must not keep them).
    """
    logs = batch.signal is Signal.LOGS
    uniform = rng.random
    out = Sample([], [], [], [], {})
    ml, ridx, items = out.ml, out.resource_index, out.items
    for r, res in enumerate(batch.resources()):
        service = service_name(res.resource)
        out.services.append(service)
        entry = out.rates[service] = sampler.service(service)
        rate = entry.rate
        # Gaps between chosen items are geometric: floor(log(U) / log(1 - rate)).
        log_skip = math.log1p(-rate) if rate < 1.0 else 0.0
        base: dict[str, Any] | None = None
        for scope in (res.scope_logs if logs else res.scope_spans):
            group = scope.log_records if logs else scope.spans
            n = len(group)
            sampler.count_items(entry, n)
            if rate >= 1.0:
                chosen: Any = group
            else:
                chosen = []
                i = int(math.log(1.0 - uniform()) / log_skip)
                while i < n:
                    chosen.append(group[i])
                    i += 1 + int(math.log(1.0 - uniform()) / log_skip)
            for item in chosen:
                if base is None:
                    base = ml_attributes(res.resource.attributes)
                own = ml_attributes(item.attributes)
                ml.append({**base, **own} if base else own)
                ridx.append(r)
                items.append(item)
    return out


