"""QueuedSender: the bounded, optionally persistent sending queue of an exporter.

``put`` takes a batch into the queue and returns once it is safe there (in memory,
or committed to SQLite for a persistent queue); ``consumers`` workers hand queued
batches to ``send`` and retry with backoff. See README.md for the delivery guarantee.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import re
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import NoReturn

from agent.component import (
    Host,
    PermanentError,
    PipelineError,
    RetryableError,
    Settings,
    Signal,
    cancel_tasks,
)
from agent.pdata import Batch, batch_from_bytes
from agent.queue.config import QueueConfig, RetryConfig
from agent.queue.memory import MemoryAccountant
from agent.queue.store import SqliteStore
from agent.queue.stranded import claim, queue_directory

# The wait suggested to a refused sender when our own queue is full or failing.
REFUSAL_RETRY_AFTER = 1.0
# The longest wait a peer's Retry-After / RetryInfo can impose on one attempt.
MAX_HINT_S = 300.0

__all__ = ["QueueConfig", "QueuedSender", "RetryConfig"]


@dataclass(eq=False)
class _Entry:
    """One queued batch. ``batch`` is None for a row restored from disk until loaded."""

    signal: Signal
    items: int
    nbytes: int
    enqueued: float  # Unix time
    batch: Batch | None
    row_id: int | None = None  # set once committed (persistent queues)
    seq: int = 0  # key in QueuedSender._live


@dataclass
class _Failure:
    """The final outcome of a delivery that did not (entirely) succeed."""

    reason: str
    error: BaseException
    items: int


class _Stopped(Exception):
    """A persistent queue stopped while a delivery was backing off; the row stays queued."""


def queue_file_name(component_id: str, name: str = "") -> str:
    """The file name of a component's queue: ``otlp/up`` -> ``otlp-up.db``.

    A type never contains ``-``, so the first ``-`` separates type and name and two
    ids never share a file; ``name`` tells apart several queues of one component.
    """
    stem = component_id.replace("/", "-") + (f"~{name}" if name else "")
    return re.sub(r"[^A-Za-z0-9_.~-]", "_", stem) + ".db"


class QueuedSender:
    """A queue bounded by items and bytes in front of ``send``, drained by workers.

    ``send(batch)`` delivers one batch; it raises ``RetryableError`` (retried with
    backoff, honouring ``retry_after``), ``PermanentError`` (dropped and counted,
    ``rejected`` items only when set), ``TimeoutError``/``OSError`` (retried). Any other
    exception is taken as a bug triggered by that batch: it is dropped and counted
    rather than retried forever. ``send`` may be called concurrently by the workers;
    with several consumers, delivery order is not guaranteed.

    With ``queue.enabled = false`` there is no queue: ``put`` sends (with retries, for
    at most ``block_timeout``) and raises the final error to its caller, so nothing is
    acknowledged that was not sent.
    ``name`` tells apart the files of several persistent queues of one component.
    ``decode(signal, data)`` rebuilds a batch restored from disk from its
    ``to_bytes()``; pass it when the queued batches are not OTLP requests (a
    ``Batch`` subclass around another message).
    """

    def __init__(self, settings: Settings, queue: QueueConfig, retry: RetryConfig,
                 send: Callable[[Batch], Awaitable[None]], *, name: str = "",
                 decode: Callable[[Signal, bytes], Batch] = batch_from_bytes) -> None:
        self.settings = settings
        self.tel = settings.telemetry
        self.qc = queue
        self.rc = retry
        self._send = send
        self._name = name
        self._decode = decode
        self._holder = settings.id + (f"~{name}" if name else "")
        self._q: asyncio.Queue[_Entry] = asyncio.Queue()  # unbounded: the counters bound it
        self._items = 0
        self._bytes = 0
        # Live entries (queued or in flight) per signal, oldest first.
        self._live: dict[Signal, OrderedDict[int, _Entry]] = {s: OrderedDict() for s in Signal}
        self._live_items = dict.fromkeys(Signal, 0)
        self._live_bytes = dict.fromkeys(Signal, 0)
        self._seq = itertools.count()
        self._space_freed = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._stopping = asyncio.Event()
        self._busy = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._workers: list[asyncio.Task[None]] = []
        self._store: SqliteStore | None = None
        self._memory = MemoryAccountant()
        self._closed = False
        self._drain_deadline = Host.shutdown_timeout  # the host's, once started

    # ----------------------------------------------------------------- lifecycle

    async def start(self, host: Host) -> None:
        """Open the persistent file (resuming what it holds) and start the workers.

        Raises ``QueueStorageError`` naming the path when the state directory is
        missing or unwritable, or the file is held by another sender.
        """
        self._drain_deadline = host.shutdown_timeout
        if not self.qc.enabled:
            return
        shared = MemoryAccountant.of(host)
        shared.add(self._memory.held)  # what was put before start
        self._memory = shared
        if self.qc.persistent:
            path = queue_directory(host.state_dir) / queue_file_name(self.settings.id, self._name)
            store = SqliteStore(path, self.qc.synchronous, self.tel)
            rows = await store.open()
            self._store = store
            claim(host, path)
            for row in rows:
                try:
                    signal = Signal(row.signal)
                except ValueError:
                    self.tel.dropped(row.signal, row.items, "corrupt", f"unknown signal in {path}")
                    store.delete(row.id)
                    continue
                entry = _Entry(signal, row.items, row.nbytes, row.enqueued, None, row.id)
                self._admit(entry, reserved=False, report=False)
            if rows:
                for signal in Signal:
                    self._report(signal)
                self.tel.info("resuming persistent queue", path=str(path), batches=len(rows),
                              items=self._items)
        self._memory.declare_bound(self._holder, self.qc.max_bytes)
        self._workers = [asyncio.create_task(self._worker(), name=f"{self.settings.id}-send-{i}")
                         for i in range(self.qc.consumers)]

    async def shutdown(self, deadline: float | None = None) -> None:
        """Stop intake and the workers within ``deadline`` seconds. Idempotent.

        ``deadline`` defaults to the host's ``shutdown_timeout`` (``service.shutdown_timeout``;
        the graph's own deadline still bounds the whole shutdown). A memory queue drains
        into ``send`` until the deadline; what is left then is dropped and counted
        (reason ``shutdown``). A persistent queue lets the attempts in flight finish
        within the deadline and starts no new ones: what is queued stays in the file
        for the next start.
        """
        if self._closed:
            return
        if deadline is None:
            # A tenth of the graph's deadline is left to the exporter's own close
            # (connections, sessions), which runs after this returns.
            deadline = 0.9 * self._drain_deadline
        self._closed = True
        self._stopping.set()
        settled = self._idle if self._store is not None else self._drained
        try:
            if self._workers:
                async with asyncio.timeout(deadline):
                    await settled.wait()
        except TimeoutError:
            self.tel.warn("shutdown", "deadline", items_left=self._items,
                          persistent=self._store is not None)
        finally:
            # Shielded: even when our caller's own deadline cancels us, the workers stop
            # and the file is released (a reloaded graph opens it again at once).
            await asyncio.shield(self._teardown())

    async def _teardown(self) -> None:
        await cancel_tasks(*self._workers)
        self._workers = []
        for signal, live in self._live.items():
            if not live:
                continue
            if self._store is None:
                self.tel.dropped(signal, self._live_items[signal], "shutdown")
            # What is left is forgotten at once (a persistent queue keeps it in the file).
            self._unreserve(self._live_items[signal], self._live_bytes[signal])
            live.clear()
            self._live_items[signal] = self._live_bytes[signal] = 0
            self._report(signal)
        if self._store is not None:
            await self._store.close()
        self._memory.forget_bound(self._holder)

    # ----------------------------------------------------------------- intake

    async def put(self, batch: Batch) -> None:
        """Take ``batch`` (ownership passes to the queue); return once it is queued.

        Raises ``RetryableError`` (counted as refused) when the queue stays full for
        ``block_timeout``, the agent's memory hard limit is reached, the queue file
        cannot be written (disk full), or the queue is stopping. With
        ``when_full = "drop_newest"`` a batch that does not fit is dropped and counted.
        """
        signal, n, nbytes = batch.signal, batch.item_count, batch.byte_size
        if not self.qc.enabled:
            await self._send_direct(batch)
            return
        if self._closed:
            self._refuse(signal, n, "stopping", "sending queue is stopped")
        if not await self._reserve(signal, n, nbytes):
            return  # dropped (when_full = "drop_newest"), counted
        if self._closed:  # shutdown began while we waited for room
            self._unreserve(n, nbytes)
            self._refuse(signal, n, "stopping", "sending queue is stopped")
        entry = _Entry(signal, n, nbytes, time.time(), batch)
        if self._store is None:
            if self.qc.persistent:  # put before start: nowhere durable to put it yet
                self._unreserve(n, nbytes)
                self._refuse(signal, n, "not_started", "persistent queue is not open yet")
            self._admit(entry, reserved=True)
            return
        data = batch.to_bytes()
        fut = self._store.append(signal.value, n, entry.enqueued, data)
        # The commit may finish after our caller gave up waiting: admit or release
        # the entry whatever happens to this coroutine.
        fut.add_done_callback(lambda f: self._committed(entry, f))
        try:
            await asyncio.shield(fut)
        except sqlite3.Error as e:
            reason = "disk_full" if getattr(e, "sqlite_errorcode", 0) == sqlite3.SQLITE_FULL \
                else "storage_error"
            self._refuse(signal, n, reason, f"cannot persist batch: {e}", e)

    async def _reserve(self, signal: Signal, n: int, nbytes: int) -> bool:
        """Wait for room for ``n`` items and ``nbytes`` bytes and account them.

        Returns False when the batch was dropped instead (``drop_newest``); raises
        ``RetryableError`` when refused.
        """
        qc = self.qc
        loop = asyncio.get_running_loop()
        deadline = loop.time() + qc.block_timeout
        while True:
            # One batch is taken into an empty queue whatever its size: it could never fit.
            if self._items == 0 or (self._items + n <= qc.max_items
                                    and self._bytes + nbytes <= qc.max_bytes):
                if not self._memory.try_add(nbytes):
                    self._refuse(signal, n, "memory_limit", "agent memory hard limit reached")
                break
            if qc.when_full == "drop_newest":
                self.tel.dropped(signal, n, "queue_full")
                return False
            remaining = deadline - loop.time()
            if remaining <= 0 or self._closed:
                self._refuse(signal, n, "queue_full", "sending queue is full")
            self._space_freed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._space_freed.wait()
        self._items += n
        self._bytes += nbytes
        self._drained.clear()
        return True

    def _refuse(self, signal: Signal, n: int, reason: str, message: str,
                error: BaseException | None = None) -> NoReturn:
        self.tel.refused(signal, n, reason, error)
        raise RetryableError(message, retry_after=REFUSAL_RETRY_AFTER) from error

    def _unreserve(self, n: int, nbytes: int) -> None:
        self._items -= n
        self._bytes -= nbytes
        self._memory.remove(nbytes)
        self._space_freed.set()
        if self._items == 0:
            self._drained.set()

    def _committed(self, entry: _Entry, fut: asyncio.Future[int]) -> None:
        """Done-callback of a persistent put's commit: admit the entry, or undo its room."""
        if fut.cancelled() or fut.exception() is not None:
            self._unreserve(entry.items, entry.nbytes)
            return
        entry.row_id = fut.result()
        if self._closed:  # committed after shutdown took stock: it waits in the file
            self._unreserve(entry.items, entry.nbytes)
            return
        self._admit(entry, reserved=True)

    def _admit(self, entry: _Entry, *, reserved: bool, report: bool = True) -> None:
        """Make ``entry`` visible to the workers and (unless ``report`` is False) the gauges.

        ``reserved`` is False for a row restored from disk, which no ``put`` accounted;
        its bytes count as held although they stay on disk until a worker loads them
        (an overestimate, on the safe side).
        """
        if not reserved:
            self._items += entry.items
            self._bytes += entry.nbytes
            self._memory.add(entry.nbytes)
            self._drained.clear()
        entry.seq = next(self._seq)
        self._live[entry.signal][entry.seq] = entry
        self._live_items[entry.signal] += entry.items
        self._live_bytes[entry.signal] += entry.nbytes
        self._q.put_nowait(entry)
        if report:
            self._report(entry.signal)

    def _release(self, entry: _Entry) -> None:
        """Forget a delivered, dropped or left-behind entry (once)."""
        if self._live[entry.signal].pop(entry.seq, None) is None:
            return
        self._live_items[entry.signal] -= entry.items
        self._live_bytes[entry.signal] -= entry.nbytes
        self._unreserve(entry.items, entry.nbytes)
        self._report(entry.signal)

    def _report(self, signal: Signal) -> None:
        """Update the queue gauges of ``signal`` (called on every change and retry)."""
        live = self._live[signal]
        age = max(0.0, time.time() - next(iter(live.values())).enqueued) if live else 0.0
        self.tel.queue(signal, size=self._live_items[signal], nbytes=self._live_bytes[signal],
                       capacity=self.qc.max_items, oldest_age=age)

    # ----------------------------------------------------------------- delivery

    async def _worker(self) -> None:
        persistent = self._store is not None
        while True:
            entry = await self._q.get()
            if persistent and self._stopping.is_set():
                return  # the row stays in the file
            self._busy += 1
            self._idle.clear()
            try:
                await self._process(entry)
            except _Stopped:
                return
            finally:
                self._busy -= 1
                if self._busy == 0:
                    self._idle.set()

    async def _process(self, entry: _Entry) -> None:
        """Deliver one entry, then forget it (and delete its row) unless stopped."""
        batch = entry.batch
        if batch is None:
            try:
                batch = await self._load(entry)
            except sqlite3.Error as e:  # cannot read the file now: the row stays, try later
                self.tel.send_failed(entry.signal, entry.items, "storage_error", e)
                await self._backoff(self.rc.initial_interval)
                self._q.put_nowait(entry)
                return
        if batch is not None:
            failure = await self._deliver(batch, entry)
            if failure is not None:
                self.tel.dropped(entry.signal, failure.items, failure.reason, failure.error)
        if self._store is not None and entry.row_id is not None:
            self._store.delete(entry.row_id)
        self._release(entry)

    async def _load(self, entry: _Entry) -> Batch | None:
        """Read a restored row's batch; None (dropped and counted) when it cannot be decoded.

        Raises ``sqlite3.Error`` when the file cannot be read.
        """
        assert self._store is not None and entry.row_id is not None
        try:
            data = await self._store.load(entry.row_id)
            if data is None:
                return None  # deleted meanwhile: nothing to deliver
            return self._decode(entry.signal, data)
        except sqlite3.Error:
            raise
        except Exception as e:  # a damaged row, DecodeError, or a custom decoder's error
            self.tel.dropped(entry.signal, entry.items, "corrupt", e)
            return None

    async def _deliver(self, batch: Batch, entry: _Entry | None = None) -> _Failure | None:
        """Send ``batch``, retrying as ``retry`` says. None when it was delivered.

        Raises ``_Stopped`` when a persistent queue stops during a backoff wait.
        """
        signal, n = batch.signal, batch.item_count
        rc = self.rc
        started = time.monotonic()
        interval = rc.initial_interval
        while True:
            try:
                # asyncio.timeout, not wait_for: in 3.11 wait_for swallows a
                # cancellation that races a send failing, and shutdown would hang.
                async with asyncio.timeout(self.qc.timeout):
                    await self._send(batch)
            except PermanentError as e:
                rejected = n if e.rejected is None else min(e.rejected, n)
                if rejected < n:
                    self.tel.sent(signal, n - rejected)
                return _Failure("permanent_error", e, rejected)
            except (RetryableError, TimeoutError, OSError) as e:
                reason = "timeout" if isinstance(e, TimeoutError) else \
                    "retryable_error" if isinstance(e, RetryableError) else "connection_error"
                self.tel.send_failed(signal, n, reason, e)
                elapsed = time.monotonic() - started
                limit = rc.max_elapsed_time
                if not rc.enabled or (limit > 0 and elapsed >= limit):
                    return _Failure("retries_exhausted", e, n)
                hint = e.retry_after if isinstance(e, RetryableError) else None
                # A hint of 0 or less ("Retry-After: 0", a date in the past) is no hint,
                # as in the collector's exporterhelper: taken literally, it retries in a
                # tight loop for as long as the peer keeps answering that way.
                delay = hint if hint is not None and hint > 0 else interval * (
                    1 + rc.randomization_factor * (2 * random.random() - 1))
                # A peer's hint is honoured up to a bound: "Retry-After: 86400" must not
                # park a worker (with retry-forever defaults, for good).
                delay = min(delay, max(rc.max_interval, MAX_HINT_S))
                if limit > 0:  # a last attempt at the limit, never a drop before it
                    delay = min(delay, limit - elapsed)
                self.tel.retried(signal)
                if entry is not None:
                    self._report(entry.signal)
                await self._backoff(delay)
                interval = min(interval * rc.multiplier, rc.max_interval)
            except Exception as e:  # a bug in send, triggered by this batch: do not loop on it
                return _Failure("send_error", e, n)
            else:
                self.tel.sent(signal, n)
                return None

    async def _backoff(self, delay: float) -> None:
        """Sleep ``delay``; a persistent queue that is stopping gives up (``_Stopped``)."""
        if self._store is None:
            await asyncio.sleep(delay)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._stopping.wait()
        if self._stopping.is_set():
            raise _Stopped

    async def _send_direct(self, batch: Batch) -> None:
        """No queue: send now and raise the final error, so the sender hears of it.

        The caller is a receiver's request, so retrying is bounded even when retries
        are not (``max_elapsed_time = 0``): after ``block_timeout`` (or
        ``max_elapsed_time`` when set and shorter) it gives up with ``RetryableError``,
        abandoning an attempt still running. Requests parked for good on a backend
        outage would pile up to the receiver's concurrency limit and stall the agent.
        """
        bound = self.qc.block_timeout
        if 0 < self.rc.max_elapsed_time < bound:
            bound = self.rc.max_elapsed_time
        if bound <= 0:  # "never wait": still one attempt
            bound = self.qc.timeout
        try:
            async with asyncio.timeout(bound):
                failure = await self._deliver(batch)
        except TimeoutError as e:
            gave_up = RetryableError(f"no sending queue, and not delivered within {bound:g}s",
                                     retry_after=REFUSAL_RETRY_AFTER)
            gave_up.__cause__ = e
            failure = _Failure("retries_exhausted", gave_up, batch.item_count)
        if failure is None:
            return
        self.tel.refused(batch.signal, failure.items, failure.reason, failure.error)
        if isinstance(failure.error, PipelineError):
            raise failure.error
        if failure.reason == "send_error":
            raise PermanentError(f"send failed: {failure.error}") from failure.error
        raise RetryableError(f"send failed: {failure.error}") from failure.error
