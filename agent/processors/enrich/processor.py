"""The ``enrich`` processor: host identity, model version, hardware, log–trace correlation.

Cost model (DESIGN.md §2): per-item Python work is what makes a pipeline slow, so
everything that can be said of a resource is written once per resource:

- host identity (``host.name``, ``host.id``, ``os.type``) when the sender did not set it;
- ``ml.model.version`` when the resource lacks it, resolved from ``model_versions``,
  then the manifest, then ``unknown_version``. Items that carry their own version win
  over the resource's (readers of predictions merge span over resource),
  but a resource-level fallback would then disagree with them for a reader that only
  looks at the resource. So each service is probed (its items scanned) at most once per
  ``item_probe_interval``: a service whose items carry versions gets the fallback on
  each item that lacks it, every batch; the others get one resource attribute and
  their items are never touched;
- the hardware snapshot (traces and logs): host CPU and memory utilisation, and the
  utilisation and memory of the GPUs the sending process uses (found by
  ``process.pid`` in NVML's per-process memory, or named by a ``gpu.id`` attribute).

Senders repeat the same resource in every batch, so what enrichment makes of a
resource is worked out once and cached as serialised bytes keyed by the resource's
own serialisation (a "plan"; rebuilt when the hardware reading or the manifest
changes). The hot path per resource is one serialisation, one dict lookup and one
parse. Log–trace correlation is per record by nature, but only records without a
trace id are looked at.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from agent.component import Capabilities, Consumer, Host, Settings, Signal, cancel_tasks
from agent.hardware import HardwareSnapshot, HostReading, host_identity
from agent.pdata import Batch, LogBatch, TraceBatch, anyvalue_to_python, python_to_anyvalue
from agent.processors.enrich.config import EnrichConfig
from agent.processors.enrich.manifest import Entries, Manifest

VERSION = "ml.model.version"
# Distinct resources whose enrichment is remembered (a few per sending process; the
# bound is for senders that put changing values in their resource).
PLAN_CACHE_SIZE = 1024

# Where a log record's trace context may hide, besides the W3C ``traceparent``:
# plain, OTLP/JSON camelCase, ECS, and opentelemetry-instrumentation-logging names.
TRACE_ID_KEYS = ("trace_id", "traceId", "trace.id", "otelTraceID")
SPAN_ID_KEYS = ("span_id", "spanId", "span.id", "otelSpanID")
_CONTEXT_KEYS = frozenset(("traceparent", *TRACE_ID_KEYS, *SPAN_ID_KEYS))
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")


def parse_traceparent(value: str) -> tuple[bytes, bytes, int] | None:
    """W3C ``traceparent`` -> (trace id, span id, flags); None when malformed or all-zero."""
    m = _TRACEPARENT.match(value.strip().lower())
    if m is None or m.group(1) == "ff" or (m.group(1) == "00" and m.group(5)):
        return None
    trace_id, span_id = bytes.fromhex(m.group(2)), bytes.fromhex(m.group(3))
    if not any(trace_id) or not any(span_id):
        return None
    return trace_id, span_id, int(m.group(4), 16)


def parse_hex_id(value: Any, nbytes: int) -> bytes | None:
    """A hex trace id (16 bytes) or span id (8 bytes); None unless valid and non-zero."""
    if not isinstance(value, str) or len(value) != 2 * nbytes:
        return None
    try:
        out = bytes.fromhex(value)
    except ValueError:
        return None
    return out if any(out) else None


def find_context(fields: Mapping[str, Any]) -> tuple[bytes, bytes | None, int | None] | None:
    """Trace context from a mapping of fields: (trace id, span id, flags) or None."""
    tp = fields.get("traceparent")
    if isinstance(tp, str) and (parsed := parse_traceparent(tp)) is not None:
        return parsed
    trace_id = next((t for k in TRACE_ID_KEYS if (t := parse_hex_id(fields.get(k), 16))), None)
    if trace_id is None:
        return None
    span_id = next((s for k in SPAN_ID_KEYS if (s := parse_hex_id(fields.get(k), 8))), None)
    return trace_id, span_id, None


class _Plan(NamedTuple):
    """What enrichment makes of one resource, as serialised ``Resource`` messages."""

    enriched: bytes  # identity, manifest attributes, hardware
    versioned: bytes  # the same plus the fallback ml.model.version
    version: str | None  # the fallback version; None when none is to be written
    service: str | None


def _scalar(value: Any) -> Any:
    """The Python value of an ``AnyValue`` holding a string or an int (else None)."""
    which = value.WhichOneof("value")
    if which == "string_value":
        return value.string_value
    if which == "int_value":
        return value.int_value
    return None


class EnrichProcessor:
    """See the module docstring. One instance per pipeline, so one signal."""

    capabilities = Capabilities(mutates_data=True)

    def __init__(self, settings: Settings, config: EnrichConfig,
                 next: Mapping[Signal, Consumer]) -> None:
        self.settings = settings
        self.config = config
        self.telemetry = settings.telemetry
        (self.signal, self.next), = next.items()
        self.snapshot: HardwareSnapshot | None = None
        self.manifest = (Manifest(config.manifest, config.manifest_max_bytes, settings.telemetry)
                         if config.manifest is not None else None)
        self._identity: list[tuple[str, str]] = []
        # service.name -> (items carry versions, monotonic time of the next probe)
        self._probes: dict[str | None, tuple[bool, float]] = {}
        # serialised resource -> what enrichment makes of it; valid for one reading
        # and one version of the manifest.
        self._plans: dict[bytes, _Plan] = {}
        self._plans_reading: HostReading | None = None
        self._plans_entries: Entries | None = None
        self._correlated = settings.telemetry.counter(
            "mlagent_enrich_log_records_correlated",
            "Log records given a trace context by the enrich processor, by source.",
            ("source",))
        self._task: asyncio.Task[None] | None = None

    async def start(self, host: Host) -> None:
        if self.config.host_identity:
            self._identity = list((await asyncio.to_thread(host_identity)).items())
        # Read for hardware attributes, and written with the pids of senders so that the
        # host receiver samples them.
        self.snapshot = HardwareSnapshot.of(host)
        if self.manifest is not None:
            await asyncio.to_thread(self.manifest.poll)
            self._task = asyncio.create_task(self._watch(self.manifest),
                                             name=f"{self.settings.id} manifest")

    async def _watch(self, manifest: Manifest) -> None:
        while True:
            await asyncio.sleep(self.config.manifest_poll_interval)
            try:
                await asyncio.to_thread(manifest.poll)
            except Exception as e:  # never let the watcher die; the old entries stay
                self.telemetry.error("manifest poll failed", error=repr(e))

    async def shutdown(self) -> None:
        task, self._task = self._task, None
        await cancel_tasks(task)

    async def consume(self, batch: Batch) -> None:
        try:
            resources = self.enrich(batch)
        except Exception as e:
            # A bug here must not lose data: the batch goes on, possibly half-enriched.
            self.telemetry.error("enrichment failed; batch forwarded as is", error=repr(e))
            resources = None
        if resources is None:
            batch.invalidate()
        else:  # only resources changed: the received bytes stay, resources spliced in
            batch.resources_replaced(resources)
        await self.next.consume(batch)

    # ------------------------------------------------------------------ enrichment

    def enrich(self, batch: Batch) -> list[bytes | None] | None:
        """Enrich ``batch`` in place (does not call ``invalidate``).

        Returns each resource's new encoding (None where unchanged) when nothing but
        resources changed, else None (items were written too).
        """
        reading = self.snapshot.latest if (self.snapshot and self.config.hardware) else None
        entries = self.manifest.entries if self.manifest is not None else None
        if reading is not self._plans_reading or entries is not self._plans_entries:
            # Plans embed the reading and the manifest: rebuild them after either changes.
            self._plans.clear()
            self._plans_reading, self._plans_entries = reading, entries
        now = time.monotonic()
        new: list[bytes | None] = []
        items_touched = False
        if isinstance(batch, TraceBatch):
            for rs in batch.request.resource_spans:
                res, touched = self._resource(rs.resource, rs.scope_spans, "spans", reading, now)
                new.append(res)
                items_touched |= touched
        elif isinstance(batch, LogBatch):
            for rl in batch.request.resource_logs:
                self._resource(rl.resource, rl.scope_logs, "log_records", reading, now)
                if self.config.correlate_logs:
                    self._correlate(rl.scope_logs)
            items_touched = True  # correlation may have written records
        else:
            for rm in batch.resources():
                # Metrics: no per-point versions and no hardware (the host receiver
                # reports it as series; changing resource attributes would churn them).
                res, _ = self._resource(rm.resource, None, "", None, now)
                new.append(res)
        return None if items_touched else new

    def _resource(self, resource: Any, scopes: Any, field: str, reading: HostReading | None,
                  now: float) -> tuple[bytes | None, bool]:
        """Enrich one resource (and, where its service versions items, its items).

        Returns the resource's new encoding (None if unchanged) and whether items may
        have been written.
        """
        # Senders repeat the same resource in every batch: its serialised form keys a
        # plan holding the enriched resource, so the common case is one dict lookup
        # and one parse instead of a Python pass over the attributes.
        key = resource.SerializeToString()
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plan(resource, scopes is None, reading)
            if len(self._plans) >= PLAN_CACHE_SIZE:
                self._plans.clear()
            self._plans[key] = plan
        items_touched = False
        if plan.version is not None:
            items_touched = self._version_on_items(scopes, field, plan.service, plan.version,
                                                   now)
            if not items_touched:
                resource.ParseFromString(plan.versioned)
                return plan.versioned, False
        if plan.enriched != key:
            resource.ParseFromString(plan.enriched)
            return plan.enriched, items_touched
        return None, items_touched

    def _plan(self, original: Any, metrics: bool, reading: HostReading | None) -> _Plan:
        """Work out what enrichment does to a resource (the slow path, once per resource)."""
        resource = Resource()
        resource.CopyFrom(original)
        attrs = resource.attributes
        present = {kv.key: kv.value for kv in attrs}
        for key, value in self._identity:
            self._put(attrs, present, key, value)
        service = _scalar(present["service.name"]) if "service.name" in present else None
        pid = _scalar(present["process.pid"]) if "process.pid" in present else None
        if isinstance(pid, str):
            pid = int(pid) if pid.isdigit() else None
        if pid is not None and self.snapshot is not None:
            # Plans are rebuilt with every new reading, so a live sender is re-noted.
            self.snapshot.note_process(pid, service)

        entry = self.manifest.entries.get(service, {}) if self.manifest and service else {}
        for key, manifest_value in entry.items():
            if key != VERSION and key not in present:
                python_to_anyvalue(manifest_value, attrs.add(key=key).value)
        if reading is not None:
            gpu_ref = _scalar(present["gpu.id"]) if "gpu.id" in present else None
            for key, value in hardware_attributes(reading, pid, gpu_ref):
                self._put(attrs, present, key, value)

        version = None
        if VERSION not in present:
            version = self.config.model_versions.get(service) if service else None
            if version is None and VERSION in entry:
                version = str(entry[VERSION])
            if metrics:  # only versions someone knows, on the resource
                if version is not None:
                    attrs.add(key=VERSION).value.string_value = version
                version = None
            else:
                version = version or self.config.unknown_version
        enriched = resource.SerializeToString()
        if version is None:
            return _Plan(enriched, enriched, None, service)
        attrs.add(key=VERSION).value.string_value = version
        return _Plan(enriched, resource.SerializeToString(), version, service)

    def _put(self, attrs: Any, present: dict[str, Any], key: str, value: Any) -> None:
        existing = present.get(key)
        if existing is None:
            python_to_anyvalue(value, attrs.add(key=key).value)
        elif self.config.override:
            python_to_anyvalue(value, existing)

    def _version_on_items(self, scopes: Any, field: str, service: str | None, version: str,
                          now: float) -> bool:
        """Put the fallback version on each item lacking it, if the service versions items.

        Returns False when the version belongs on the resource instead (the items of
        this service were found not to carry it at the last probe).
        """
        probe = self._probes.get(service)
        if probe is not None and not probe[0] and now < probe[1]:
            return False
        items = [it for sc in scopes for it in getattr(sc, field)]
        lacking = [it for it in items if not _has_key(it.attributes, VERSION)]
        carries = len(lacking) < len(items)
        self._probes.pop(service, None)
        self._probes[service] = (carries, now + self.config.item_probe_interval)
        if len(self._probes) > self.config.max_services:
            del self._probes[next(iter(self._probes))]
        if carries:
            for it in lacking:
                it.attributes.add(key=VERSION).value.string_value = version
        return carries

    def _correlate(self, scope_logs: Any) -> None:
        for sl in scope_logs:
            for rec in sl.log_records:
                if rec.trace_id:
                    continue
                source, ctx = self._context_of(rec)
                if ctx is None:
                    continue
                trace_id, span_id, flags = ctx
                rec.trace_id = trace_id
                if span_id is not None and not rec.span_id:
                    rec.span_id = span_id
                if flags is not None:
                    rec.flags = (rec.flags & ~0xFF) | flags
                self._correlated.labels(source).inc()

    def _context_of(self, rec: Any) -> tuple[str, tuple[bytes, bytes | None, int | None] | None]:
        fields = {kv.key: kv.value.string_value for kv in rec.attributes
                  if kv.key in _CONTEXT_KEYS}
        if fields and (ctx := find_context(fields)) is not None:
            return "attributes", ctx
        body = rec.body
        which = body.WhichOneof("value")
        if which == "string_value":
            text = body.string_value
            if (len(text) > self.config.max_json_body_bytes
                    or not text.lstrip().startswith("{")):
                return "", None
            try:
                parsed = json.loads(text)
            except ValueError:
                return "", None
            if isinstance(parsed, dict):
                return "json_body", find_context(parsed)
        elif which == "kvlist_value":
            fields = {kv.key: anyvalue_to_python(kv.value) for kv in body.kvlist_value.values
                      if kv.key in _CONTEXT_KEYS}
            return "map_body", find_context(fields)
        return "", None


def _has_key(attrs: Iterable[Any], key: str) -> bool:
    return any(kv.key == key for kv in attrs)


def hardware_attributes(reading: HostReading, pid: int | None,
                        gpu_ref: Any = None) -> list[tuple[str, Any]]:
    """The resource attributes describing the hardware a sending process runs on.

    ``gpu_ref`` is the resource's ``gpu.id`` (an index, a UUID, or several separated by
    commas); without it the GPUs are those where NVML sees ``pid`` holding memory.
    """
    out: list[tuple[str, Any]] = []
    if reading.cpu_utilization is not None:
        out.append(("host.cpu.utilization", reading.cpu_utilization))
    if reading.memory_utilization is not None:
        out.append(("host.memory.utilization", reading.memory_utilization))
    if gpu_ref is not None:
        found = (reading.gpu(ref) for ref in str(gpu_ref).split(","))
        gpus = tuple(g for g in found if g is not None)
    elif pid is not None:
        gpus = reading.gpus_of_process(pid)
        if gpus:
            out.append(("gpu.id", ",".join(str(g.index) for g in gpus)))
    else:
        gpus = ()
    utils = [g.utilization for g in gpus if g.utilization is not None]
    if utils:
        out.append(("gpu.utilization", sum(utils) / len(utils)))
    used = [g.memory_used for g in gpus if g.memory_used is not None]
    if used:
        out.append(("gpu.memory.used", sum(used)))
    return out
