"""Pipelines -> a DAG of running components: wiring, fan-out, start and stop order, status.

Nodes are receivers (one per id), processors (one per id *per pipeline*), exporters
(one per id) and connectors (one per id, an exporter of some pipelines and a
receiver of others). Edges run from producer to consumer. Start is in reverse
topological order (every consumer runs before anything can send to it); stop is in
topological order (intake stops first, then each node flushes into consumers that
are still running), within one drain deadline for the whole graph.

Every consumer call crosses a ``_Guard``: an unexpected exception in a component is
logged once, counted, turns the component's status to degraded, and reaches the
caller as ``PermanentError`` -- the process keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.component import (
    Capabilities,
    Host,
    Kind,
    PermanentError,
    RetryableError,
    Settings,
    Signal,
    Status,
)
from agent.config import AgentConfig, ConfigError
from agent.pdata import Batch
from agent.telemetry import Telemetry


@dataclass
class Node:
    """One running component instance and what it feeds."""

    key: str  # unique: "receiver:otlp", "processor:batch@traces", ...
    id: str
    kind: Kind
    instance: Any
    downstream: set[str] = field(default_factory=set)
    status: Status = Status.STARTING
    last_error: str | None = None
    pipelines: set[str] = field(default_factory=set)

    @property
    def path(self) -> str:
        """The component's config path, e.g. ``exporters.otlp``."""
        return f"{self.kind}s.{self.id}"


class _Guard:
    """The graph boundary around one consumer: unexpected errors never escape as crashes."""

    def __init__(self, node: Node, graph: Graph) -> None:
        self._node = node
        self._graph = graph
        self._consume = node.instance.consume
        self.capabilities: Capabilities = getattr(node.instance, "capabilities", Capabilities())

    async def consume(self, batch: Batch) -> None:
        try:
            await self._consume(batch)
        except (PermanentError, RetryableError):
            raise
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the boundary: a component bug must not kill the agent
            self._graph.component_failed(self._node, e)
            raise PermanentError(f"{self._node.id}: internal error: {type(e).__name__}: {e}") from e

    def __repr__(self) -> str:
        return f"<guard {self._node.key}>"


class Fanout:
    """Hands one batch to several consumers; copies it for mutators when it is shared.

    Read-only consumers share the original. A mutating consumer gets its own copy
    unless every consumer mutates, in which case the last one takes the original.
    The call succeeds only when every consumer accepted the batch; otherwise it
    raises ``RetryableError`` if any consumer asked to retry (some consumers may
    then see the batch twice: at-least-once), else ``PermanentError``.

    A partial rejection (``PermanentError`` with ``rejected``) is passed on only when
    no consumer took the whole batch, as the largest ``rejected`` among them: when one
    did, the data is in the agent and the sender is answered success (the consumer
    that rejected part counted its drop).
    """

    def __init__(self, consumers: Sequence[Any] = ()) -> None:
        self.consumers: list[Any] = list(consumers)

    @property
    def capabilities(self) -> Capabilities:
        mut = [c.capabilities.mutates_data for c in self.consumers]
        return Capabilities(mutates_data=bool(mut) and all(mut))

    async def consume(self, batch: Batch) -> None:
        cs = self.consumers
        if len(cs) == 1:
            await cs[0].consume(batch)
            return
        if not cs:
            return
        all_mutate = all(c.capabilities.mutates_data for c in cs)
        batches = [
            batch if (not c.capabilities.mutates_data or (all_mutate and i == len(cs) - 1))
            else batch.copy()
            for i, c in enumerate(cs)
        ]
        results = await asyncio.gather(*(c.consume(b) for c, b in zip(cs, batches, strict=True)),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if not errors:
            return
        retryable = [e for e in errors if isinstance(e, RetryableError)]
        if retryable:
            hints = [e.retry_after for e in retryable if e.retry_after is not None]
            raise RetryableError("; ".join(str(e) for e in retryable),
                                 retry_after=max(hints) if hints else None)
        for e in errors:
            if not isinstance(e, Exception):
                raise e  # CancelledError and friends
        permanent = [e for e in errors if isinstance(e, PermanentError)]
        if len(permanent) == len(errors):
            partial = [e.rejected for e in permanent if e.rejected is not None]
            if len(partial) == len(permanent):  # each rejected only part of the batch
                if len(errors) < len(cs):
                    return  # another consumer took it all
                raise PermanentError("; ".join(str(e) for e in permanent),
                                     rejected=max(partial))
            raise PermanentError("; ".join(str(e) for e in permanent))
        raise errors[0]


class _Intake:
    """A receiver's entry into the graph: remembers when each in-flight request began,
    so the watchdog can tell a stuck pipeline from an idle one."""

    def __init__(self, fanout: Fanout, inflight: dict[int, float]) -> None:
        self._fanout = fanout
        self._inflight = inflight
        self.capabilities = Capabilities(mutates_data=False)

    async def consume(self, batch: Batch) -> None:
        key = id(batch)
        self._inflight[key] = time.monotonic()
        try:
            await self._fanout.consume(batch)
        finally:
            self._inflight.pop(key, None)


class _PipelineHead:
    """The entry of one pipeline: its first processor, or the exporter fan-out.

    Declares ``mutates_data`` when any processor in the pipeline mutates, so an
    upstream fan-out copies before handing the batch over.
    """

    def __init__(self, first: Any, mutates: bool) -> None:
        self._first = first
        self.capabilities = Capabilities(mutates_data=mutates)

    async def consume(self, batch: Batch) -> None:
        await self._first.consume(batch)


class Graph:
    """The running pipelines of one config. Build, ``start``, ``shutdown``."""

    def __init__(self, config: AgentConfig, telemetry: Telemetry, host: Host) -> None:
        self.config = config
        self.telemetry = telemetry
        self.host = host
        host.telemetry = telemetry
        self.nodes: dict[str, Node] = {}
        self._inflight: dict[int, float] = {}
        try:
            self._build()
        except ConfigError:
            raise
        except Exception as e:  # a factory's create() failing is a start-up error, not a crash
            raise StartError(f"cannot build the pipelines: {type(e).__name__}: {e}") from e
        self._order = self._topological_order()

    # ------------------------------------------------------------------ building

    def _settings(self, cid: str, kind: Kind) -> Settings:
        # Self-metrics and logs name components by their config path ("exporters.otlp"),
        # since a receiver and an exporter may share an id.
        return Settings(id=cid, kind=kind, telemetry=self.telemetry.component(f"{kind}s.{cid}"))

    def _guard(self, node: Node) -> _Guard:
        return _Guard(node, self)

    def _build(self) -> None:
        cfg = self.config
        pipes = cfg.pipelines
        # Fan-outs filled once every pipeline head exists (connectors and receivers feed heads).
        conn_out: dict[tuple[str, Signal], Fanout] = {}
        recv_out: dict[tuple[str, Signal], Fanout] = {}
        feeds: dict[str, list[str]] = {}  # producer key -> pipeline ids it feeds

        connectors = {k.split(".", 1)[1]: c for k, c in cfg.components.items()
                      if c.kind is Kind.CONNECTOR}
        for cid, cc in connectors.items():
            next_: dict[Signal, Any] = {}
            for sig, p in pipes.values():
                if cid in p.receivers:
                    next_[sig] = conn_out.setdefault((cid, sig), Fanout())
            inst = cc.factory.create(self._settings(cid, Kind.CONNECTOR), cc.config, next_)
            self.nodes[f"connector:{cid}"] = Node(f"connector:{cid}", cid, Kind.CONNECTOR, inst)

        for _key, cc in cfg.components.items():
            if cc.kind is Kind.EXPORTER:
                inst = cc.factory.create(self._settings(cc.id, Kind.EXPORTER), cc.config, {})
                self.nodes[f"exporter:{cc.id}"] = Node(f"exporter:{cc.id}", cc.id, Kind.EXPORTER, inst)

        # pipeline id -> (head consumer, keys of the nodes the head feeds into)
        heads: dict[str, tuple[_PipelineHead, set[str]]] = {}
        for pid, (sig, p) in pipes.items():
            targets, target_keys = [], []
            for eid in p.exporters:
                nkey = f"exporter:{eid}" if f"exporter:{eid}" in self.nodes else f"connector:{eid}"
                node = self.nodes[nkey]
                node.pipelines.add(pid)
                targets.append(self._guard(node))
                target_keys.append(nkey)
            consumer: Any = Fanout(targets) if len(targets) > 1 else targets[0]
            down_keys = set(target_keys)
            mutates = consumer.capabilities.mutates_data
            for prid in reversed(p.processors):
                cc = cfg.component("processors", prid)
                inst = cc.factory.create(self._settings(prid, Kind.PROCESSOR), cc.config, {sig: consumer})
                nkey = f"processor:{prid}@{pid}"
                node = Node(nkey, prid, Kind.PROCESSOR, inst, downstream=down_keys, pipelines={pid})
                self.nodes[nkey] = node
                consumer = self._guard(node)
                mutates = mutates or consumer.capabilities.mutates_data
                down_keys = {nkey}
            heads[pid] = (_PipelineHead(consumer, mutates), down_keys)

        for pid, (sig, p) in pipes.items():
            head, keys = heads[pid]
            for rid in p.receivers:
                if rid in connectors:
                    conn_out[(rid, sig)].consumers.append(head)
                    self.nodes[f"connector:{rid}"].downstream |= keys
                else:
                    recv_out.setdefault((rid, sig), Fanout()).consumers.append(head)
                    feeds.setdefault(rid, []).append(pid)
        for rid, pids in feeds.items():
            cc = cfg.component("receivers", rid)
            next_ = {sig: _Intake(fo, self._inflight) for (r, sig), fo in recv_out.items() if r == rid}
            inst = cc.factory.create(self._settings(rid, Kind.RECEIVER), cc.config, next_)
            down: set[str] = set()
            for pid in pids:
                down |= heads[pid][1]
            self.nodes[f"receiver:{rid}"] = Node(f"receiver:{rid}", rid, Kind.RECEIVER, inst,
                                                 downstream=down, pipelines=set(pids))

    def _topological_order(self) -> list[Node]:
        """Producers before consumers. A cycle through connectors is a config error."""
        indeg = {k: 0 for k in self.nodes}
        for n in self.nodes.values():
            for d in n.downstream:
                indeg[d] += 1
        ready = sorted(k for k, v in indeg.items() if v == 0)
        order: list[Node] = []
        while ready:
            k = ready.pop(0)
            order.append(self.nodes[k])
            for d in sorted(self.nodes[k].downstream):
                indeg[d] -= 1
                if indeg[d] == 0:
                    ready.append(d)
        if len(order) != len(self.nodes):
            stuck = sorted(k for k, v in indeg.items() if v > 0)
            raise ConfigError([f"service.pipelines: connectors form a cycle through {', '.join(stuck)}"],
                              self.config.source)
        return order

    # ------------------------------------------------------------------ status

    def set_status(self, node: Node, status: Status, error: str | None = None) -> None:
        """A component's health changed (components call it through ``Host.report_status``).

        Processors are one node per pipeline but one component: all their nodes change.
        """
        for n in self.nodes.values():
            if n.id == node.id and n.kind is node.kind:
                n.status = status
                if error is not None:
                    n.last_error = error
        self.telemetry.component_up.labels(node.path).set(1 if status is Status.OK else 0)

    def _host_for(self, node: Node) -> Host:
        """The shared host, with ``report_status`` bound to this node."""
        def report(_id: str, status: Status, error: str | None = None) -> None:
            self.set_status(node, status, error)

        return dataclasses.replace(self.host, report_status=report)

    def component_failed(self, node: Node, error: BaseException) -> None:
        self.telemetry.errors.labels(node.path).inc()
        self.telemetry.component(node.path).error("unexpected error", error=repr(error))
        self.set_status(node, Status.DEGRADED, f"{type(error).__name__}: {error}")

    def oldest_inflight_age(self) -> float:
        """Seconds the oldest request still inside the pipelines has been there (0 if none)."""
        if not self._inflight:
            return 0.0
        return time.monotonic() - min(self._inflight.values())

    @property
    def ready(self) -> bool:
        return all(n.status in (Status.OK, Status.DEGRADED) for n in self.nodes.values())

    def status(self) -> dict[str, Any]:
        """The JSON of ``/status``: pipelines, components with status, errors and counters."""
        comps: dict[str, Any] = {}
        for n in self._order:
            c = comps.setdefault(n.path, {"kind": str(n.kind), "status": str(n.status),
                                                      "last_error": n.last_error,
                                                      "pipelines": sorted(n.pipelines)})
            c["pipelines"] = sorted(set(c["pipelines"]) | n.pipelines)
            c["counters"] = self.telemetry.snapshot(n.path)
        pipes = {pid: {"signal": str(sig), "receivers": p.receivers, "processors": p.processors,
                       "exporters": p.exporters}
                 for pid, (sig, p) in self.config.pipelines.items()}
        return {"ready": self.ready, "pipelines": pipes, "components": comps}

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start consumers before producers. On failure, stop what started and raise."""
        started: list[Node] = []
        for node in reversed(self._order):
            try:
                await node.instance.start(self._host_for(node))
            except Exception as e:
                node.status = Status.FAILED
                node.last_error = str(e)
                for s in reversed(started):  # producers first
                    await _quiet_shutdown(s)
                raise StartError(f"{node.kind}s.{node.id}: failed to start: {e}") from e
            started.append(node)
            if node.status is Status.STARTING:
                self.set_status(node, Status.OK)

    async def shutdown(self, deadline: float) -> list[str]:
        """Stop producers before consumers within ``deadline`` seconds in all.

        Returns the ids of components whose shutdown had to be cancelled.
        """
        cancelled: list[str] = []
        end = time.monotonic() + deadline
        for node in self._order:
            left = max(0.0, end - time.monotonic())
            try:
                await asyncio.wait_for(node.instance.shutdown(), left if left > 0 else 0.001)
            except TimeoutError:
                cancelled.append(node.key)
            except Exception as e:
                self.component_failed(node, e)
            node.status = Status.STOPPED
            self.telemetry.component_up.labels(node.path).set(0)
        # Receivers stop intake at once and let their in-flight requests finish as the
        # pipelines drain; wait for those answers too, within what is left.
        for node in self._order:
            wait_closed = getattr(node.instance, "wait_closed", None)
            if wait_closed is None:
                continue
            left = max(0.001, end - time.monotonic())
            try:
                await asyncio.wait_for(wait_closed(), left)
            except TimeoutError:
                cancelled.append(node.key)
        return cancelled

    def instances(self, kind: Kind | None = None) -> Mapping[str, Any]:
        return {n.key: n.instance for n in self.nodes.values() if kind is None or n.kind is kind}


class StartError(Exception):
    """A component failed to start; the message names it and says why."""


async def _quiet_shutdown(node: Node) -> None:
    # Start-up is already failing; the start error is what the user needs to see.
    with contextlib.suppress(Exception):
        await asyncio.wait_for(node.instance.shutdown(), 5.0)
