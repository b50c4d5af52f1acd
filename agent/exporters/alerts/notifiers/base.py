"""What every notifier shares: the clock, the bounded per-destination channel, HTTP status rules.

A notifier turns an evaluation's ``Update`` into payloads (``notify``, synchronous,
never blocks) and offers them to its channels. A ``Channel`` is one destination URL
with its own bounded queue and its own task that sends with retries, so a slow or
failing destination never holds up the evaluation, the pipeline, or any other
notifier. Every outcome is counted: ``mlagent_agent_alert_notifications{notifier,
outcome}`` and the component's ``sent`` / ``send_failed`` / ``dropped`` events
(signal label ``alerts``, items = alerts).

Notifiers that report transitions (``EventNotifier``: Slack, PagerDuty, webhook) do
not trust a message to arrive: each alert records the last state its peer answered
for (``Alert.delivered``, persisted with the alert), and at start and every
evaluation an alert whose recorded state differs from its own is offered again,
unless a message about it is still queued or in flight. So a trigger or resolve
lost to an outage longer than the retry budget, a full queue or a shutdown is sent
once the peer is back, and a restart does not forget it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import aiohttp

from agent.component import PermanentError, RetryableError, Status, cancel_tasks
from agent.exporters.alerts.config import NotifierConfig
from agent.exporters.alerts.evaluator import Update
from agent.exporters.alerts.state import Alert, Delivered
from agent.httputil import parse_retry_after
from agent.queue.sender import MAX_HINT_S
from agent.telemetry import ComponentTelemetry

SIGNAL = "alerts"  # the telemetry signal label of notification items

# Called once per offered payload with whether the peer answered for it: True when it
# accepted it, refused it for good (a 4xx: the same message would be refused again) or
# the payload broke the sender; False when it was dropped unanswered (retries
# exhausted, queue full, shutdown), so that it is worth offering again.
Done = Callable[[bool], None]


class Clock(Protocol):
    """Time as the exporter sees it; tests inject a fake one to run in seconds."""

    def time(self) -> float:
        """Unix seconds: alert timestamps and rule timing."""
        ...

    def monotonic(self) -> float:
        """Seconds for rate limits and retry deadlines."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait between retries and for rate limits."""
        ...


class SystemClock:
    """The real clock."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


@dataclass
class NotifyContext:
    """What the exporter lends its notifiers. ``session`` exists between start and shutdown."""

    component_id: str
    telemetry: ComponentTelemetry
    clock: Clock
    eval_interval: float
    external_url: str = ""
    session: aiohttp.ClientSession | None = None
    # Host.report_status bound to this component (set at start).
    report: Callable[[Status, str | None], None] = lambda _status, _error: None
    outcomes: Any = field(init=False)
    _failing: dict[str, str] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.outcomes = self.telemetry.counter(
            "mlagent_agent_alert_notifications",
            "Alert notifications by notifier and outcome (sent, failed attempt, dropped, "
            "resent: offered again because the peer never acknowledged it).",
            ("notifier", "outcome"))

    def count(self, notifier: str, outcome: str, n: int = 1) -> None:
        self.outcomes.labels(notifier, outcome).inc(n)

    def failing(self, notifier: str, problem: str | None) -> None:
        """Record that ``notifier`` lost alerts (``problem``) or delivers again (None);
        the component reports itself degraded while any notifier is failing."""
        was = dict(self._failing)
        if problem is None:
            self._failing.pop(notifier, None)
        else:
            self._failing[notifier] = problem
        if self._failing != was:
            self.report(Status.DEGRADED if self._failing else Status.OK,
                        "; ".join(f"{k}: {v}" for k, v in sorted(self._failing.items())) or None)


def rfc3339(t: float) -> str:
    """Unix seconds as an RFC 3339 UTC timestamp with milliseconds."""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def post_json(ctx: NotifyContext, url: str, payload: Any, timeout: float,
                    headers: dict[str, str] | None = None) -> None:
    """POST ``payload`` as JSON; 2xx returns, 429 and 5xx raise ``RetryableError``
    (with the peer's ``Retry-After``), every other status raises ``PermanentError``."""
    if ctx.session is None:
        raise RetryableError("notifier is not started")
    async with ctx.session.post(url, json=payload, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
        body = await resp.text(errors="replace")
        if 200 <= resp.status < 300:
            return
        detail = f"HTTP {resp.status} from {url}: {body[:300]}"
        if resp.status == 429 or resp.status >= 500:
            raise RetryableError(detail, retry_after=parse_retry_after(
                resp.headers.get("Retry-After"), ctx.clock.time()))
        raise PermanentError(detail)


class Channel:
    """One destination: a bounded queue and one task that sends from it, with retries.

    ``send(payload)`` raises ``RetryableError`` (retried with backoff, honouring
    ``retry_after`` up to ``MAX_HINT_S``) or ``PermanentError`` (dropped, counted,
    logged). Connection errors and timeouts are retryable. Retries stop once
    ``retry.max_elapsed_time`` has passed since the first attempt (0: never), with a
    last attempt at that deadline. ``min_interval`` spaces attempts (rate limits).
    """

    def __init__(self, ctx: NotifyContext, notifier_id: str, cfg: NotifierConfig,
                 send: Callable[[Any], Awaitable[None]], *, min_interval: float = 0.0) -> None:
        self.ctx = ctx
        self.nid = notifier_id
        self.cfg = cfg
        self._send = send
        self.min_interval = min_interval
        self._q: asyncio.Queue[tuple[Any, int, Done | None]] = asyncio.Queue(
            maxsize=cfg.queue_size)
        self._task: asyncio.Task[None] | None = None
        self._next_slot = -float("inf")

    def offer(self, payload: Any, n_alerts: int, done: Done | None = None) -> None:
        """Queue a payload about ``n_alerts`` alerts, or drop and count it when full.

        ``done`` is called exactly once with the outcome (see ``Done``); at once when
        the queue is full, otherwise from the channel's task or its shutdown.
        """
        try:
            self._q.put_nowait((payload, n_alerts, done))
        except asyncio.QueueFull:
            self._dropped(n_alerts, "queue_full", None)
            if done is not None:
                done(False)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"{self.ctx.component_id}-{self.nid}")

    async def drain(self) -> None:
        """Wait until everything queued so far was delivered or dropped (once started)."""
        if self._task is not None:
            await self._q.join()

    async def shutdown(self, deadline: float) -> None:
        """Deliver what is queued within ``deadline`` seconds, then cancel and count the rest."""
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._q.join(), deadline)
            await cancel_tasks(self._task)
            self._task = None
        left = 0
        while not self._q.empty():
            _payload, n, done = self._q.get_nowait()
            left += n
            if done is not None:
                done(False)
        if left:
            self._dropped(left, "shutdown", None)

    async def _run(self) -> None:
        while True:
            payload, n, done = await self._q.get()
            answered = False
            try:
                answered = await self._deliver(payload, n)
            except asyncio.CancelledError:
                self._dropped(n, "shutdown", None)
                raise
            except Exception as e:  # never let one bad payload stop the channel
                self._dropped(n, "error", e)
                answered = True  # offering it again would only repeat the error
            finally:
                # Before task_done: whoever drains the queue sees the outcome recorded.
                if done is not None:
                    done(answered)
                self._q.task_done()

    async def _deliver(self, payload: Any, n: int) -> bool:
        """Send with retries; whether the peer answered (accepted or refused for good)."""
        clock, retry = self.ctx.clock, self.cfg.retry
        started = clock.monotonic()
        interval = retry.initial_interval
        while True:
            wait = self._next_slot - clock.monotonic()
            if wait > 0:
                await clock.sleep(wait)
            self._next_slot = clock.monotonic() + self.min_interval
            try:
                await self._send(payload)
            except PermanentError as e:
                self._dropped(n, "rejected", e)
                return True
            except (RetryableError, aiohttp.ClientError, TimeoutError, OSError) as e:
                self.ctx.count(self.nid, "failed", n)
                self.ctx.telemetry.send_failed(SIGNAL, n, f"{self.nid}:{type(e).__name__}", e)
                elapsed, limit = clock.monotonic() - started, retry.max_elapsed_time
                if not retry.enabled or (limit > 0 and elapsed >= limit):
                    self._dropped(n, "retries_exhausted", e)
                    return False
                # The peer's Retry-After wins, up to the bound the sending queue applies
                # (a hostile "Retry-After: 86400" must not park the channel); our own
                # backoff grows only when it is used. A hint of 0 or less ("Retry-After:
                # 0", a date in the past) is no hint, as in QueuedSender: taken literally
                # it would retry in a tight loop.
                hint = getattr(e, "retry_after", None)
                if hint is not None and hint > 0:
                    delay = min(hint, max(retry.max_interval, MAX_HINT_S))
                else:
                    delay = interval * (1 + retry.randomization_factor * (2 * random.random() - 1))
                    interval = min(interval * retry.multiplier, retry.max_interval)
                if limit > 0:  # a last attempt at the deadline, never a drop before it
                    delay = min(delay, limit - elapsed)
                self.ctx.telemetry.retried(SIGNAL)
                await clock.sleep(delay)
            else:
                self.ctx.count(self.nid, "sent", n)
                self.ctx.telemetry.sent(SIGNAL, n)
                self.ctx.failing(self.nid, None)
                return True

    def _dropped(self, n: int, reason: str, error: BaseException | None) -> None:
        self.ctx.count(self.nid, "dropped", n)
        self.ctx.telemetry.dropped(SIGNAL, n, f"{self.nid}:{reason}", error)
        if reason != "shutdown":
            self.ctx.failing(self.nid, f"{reason}: {error}" if error else reason)


class Notifier:
    """One configured notifier (``type`` or ``type/name``). Subclasses implement ``notify``."""

    def __init__(self, notifier_id: str, ctx: NotifyContext) -> None:
        self.id = notifier_id
        self.ctx = ctx
        self.channels: list[Channel] = []

    def notify(self, update: Update) -> None:
        """Pick what to send from ``update`` and queue it. Must not block or raise."""
        raise NotImplementedError

    def resume(self, alerts: list[Alert]) -> None:
        """Called once after ``start`` with the alerts restored from disk: offer what the
        peer has not acknowledged yet. Must not block or raise. Nothing by default."""

    def start(self) -> None:
        for ch in self.channels:
            ch.start()

    async def drain(self) -> None:
        for ch in self.channels:
            await ch.drain()

    async def shutdown(self, deadline: float) -> None:
        await asyncio.gather(*(ch.shutdown(deadline) for ch in self.channels))


def transitions_to_send(update: Update, send_resolved: bool) -> list[Any]:
    """The transitions the ``log`` notifier reports."""
    return [a for a in update.transitions if a.state == "firing" or send_resolved]


class EventNotifier(Notifier):
    """A notifier that tells its peer about transitions and makes sure the peer heard.

    ``due`` picks the alerts whose peer-side state (``Alert.delivered[id]``, or what is
    queued or in flight) differs from their own: a firing alert the peer has not
    acknowledged as firing, a resolved one it acknowledged as firing but not as
    resolved (a peer that never heard of an alert gets no resolve). Pending alerts are
    not sent. Subclasses build the payloads and queue them with ``offer``. At most one
    message per alert is queued or in flight, so what is held stays within the queue.
    """

    def __init__(self, notifier_id: str, ctx: NotifyContext, cfg: NotifierConfig) -> None:
        super().__init__(notifier_id, ctx)
        self.cfg = cfg
        # fingerprint -> (state offered, the offer's token) for messages not yet settled.
        self._queued: dict[str, tuple[Delivered, object]] = {}

    def notify(self, update: Update) -> None:
        changed = {a.fingerprint for a in update.transitions}
        self.send(self.due(update.alerts), changed)

    def unsettled(self, fingerprint: str) -> bool:
        """Whether a message about this alert is queued or in flight."""
        return fingerprint in self._queued

    def resume(self, alerts: list[Alert]) -> None:
        self.send(self.due(alerts), set())

    def send(self, alerts: list[Alert], changed: set[str]) -> None:
        """Queue one or more messages reporting the current state of ``alerts``; those
        whose fingerprint is not in ``changed`` are offered again (counted ``resent``)."""
        raise NotImplementedError

    def due(self, alerts: list[Alert]) -> list[Alert]:
        """The alerts to report now (see the class docstring)."""
        out = []
        for a in alerts:
            if a.state == "pending":
                continue
            queued = self._queued.get(a.fingerprint)
            heard = queued[0] if queued is not None else a.delivered.get(self.id)
            if a.state == "firing":
                if heard != "firing":
                    out.append(a)
            elif heard == "firing":
                if self.cfg.send_resolved:
                    out.append(a)
                elif queued is None:  # nothing to send by configuration: settled
                    a.delivered[self.id] = "resolved"
        return out

    def offer(self, channel: Channel, payload: Any, alerts: list[Alert],
              changed: set[str]) -> None:
        """Queue ``payload`` about ``alerts`` (in their current state) on ``channel``,
        and record the peer's answer on each alert when it comes."""
        token = object()
        sent: list[tuple[Alert, Delivered]] = []
        for a in alerts:
            state: Delivered = "firing" if a.state == "firing" else "resolved"
            sent.append((a, state))
            self._queued[a.fingerprint] = (state, token)
        again = sum(a.fingerprint not in changed for a in alerts)
        if again:
            self.ctx.count(self.id, "resent", again)

        def done(answered: bool) -> None:
            for a, state in sent:
                if answered:
                    a.delivered[self.id] = state
                if self._queued.get(a.fingerprint, (None, None))[1] is token:
                    del self._queued[a.fingerprint]

        channel.offer(payload, len(alerts), done)
