"""The ``host`` receiver: system, process and GPU metrics every ``interval``.

Each tick samples psutil and NVML in a worker thread (both block), builds one
``MetricBatch`` and hands it to the metrics consumer, and publishes a
``HostReading`` to the hardware snapshot service for the ``enrich`` processor.
Names follow the OpenTelemetry semantic conventions (``system.*``, ``process.*``,
``hw.gpu.*``); README.md has the table with units and DCGM equivalents.

Rates (CPU utilisation) are computed from the difference between two samples, so
the first tick after start has no CPU points unless ``start`` primed them.
Counters (disk, network, energy) are cumulative since boot.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import psutil
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality, Metric

from agent.component import (
    Consumer,
    Host,
    Settings,
    Signal,
    cancel_tasks,
    emit,
)
from agent.hardware import GpuReading, HardwareSnapshot, HostReading, host_identity
from agent.pdata import MetricBatch, python_to_anyvalue
from agent.receivers.host.config import HostConfig
from agent.receivers.host.nvml import GpuSampler, Nvml, NvmlApi

SCOPE_NAME = "mlagent/host"
_CUMULATIVE = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE

GPU_UTILIZATION_DESCRIPTION = (
    "Fraction of the last sample period during which some kernel was running on the GPU "
    "(NVML utilization.gpu). It is not SM occupancy: one small kernel counts as 100%.")


class _MetricSet:
    """Builds the metrics of one ScopeMetrics: one ``Metric`` per name, points appended."""

    def __init__(self, scope_metrics: Any, time_ns: int) -> None:
        self._sm = scope_metrics
        self._time = time_ns
        self._by_name: dict[str, Metric] = {}

    def _metric(self, name: str, unit: str, description: str) -> Metric:
        m = self._by_name.get(name)
        if m is None:
            m = self._by_name[name] = self._sm.metrics.add(name=name, unit=unit,
                                                           description=description)
        return m

    def gauge(self, name: str, unit: str, description: str, value: float | None,
              attrs: Mapping[str, Any] | None = None) -> None:
        if value is None:
            return
        dp = self._metric(name, unit, description).gauge.data_points.add(
            time_unix_nano=self._time, as_double=float(value))
        _fill(dp.attributes, attrs)

    def counter(self, name: str, unit: str, description: str, value: float | None, start_ns: int,
                attrs: Mapping[str, Any] | None = None) -> None:
        if value is None:
            return
        m = self._metric(name, unit, description)
        m.sum.is_monotonic = True
        m.sum.aggregation_temporality = _CUMULATIVE
        dp = m.sum.data_points.add(time_unix_nano=self._time, start_time_unix_nano=start_ns,
                                   as_double=float(value))
        _fill(dp.attributes, attrs)


def _fill(target: Any, attrs: Mapping[str, Any] | None) -> None:
    for k, v in (attrs or {}).items():
        python_to_anyvalue(v, target.add(key=k).value)


class _CpuRate:
    """CPU utilisation per logical CPU from two ``psutil.cpu_times`` samples (vectorised)."""

    _BUSY_EXCLUDED = ("idle", "iowait")

    def __init__(self) -> None:
        self._prev: tuple[np.ndarray, np.ndarray] | None = None

    @staticmethod
    def _read() -> tuple[np.ndarray, np.ndarray]:
        times = psutil.cpu_times(percpu=True)
        fields = times[0]._fields
        arr = np.array([tuple(t) for t in times], dtype=np.float64)
        idle_cols = [fields.index(f) for f in _CpuRate._BUSY_EXCLUDED if f in fields]
        # guest time is already counted in user on Linux; excluding it avoids double counting.
        total_cols = [i for i, f in enumerate(fields) if f not in ("guest", "guest_nice")]
        return arr[:, total_cols].sum(axis=1), arr[:, idle_cols].sum(axis=1)

    def sample(self) -> tuple[float, np.ndarray] | None:
        """(total utilisation, per-core utilisation) since the last call; None the first time."""
        total, idle = self._read()
        prev, self._prev = self._prev, (total, idle)
        if prev is None or prev[0].shape != total.shape:
            return None
        d_total = total - prev[0]
        d_busy = d_total - (idle - prev[1])
        with np.errstate(divide="ignore", invalid="ignore"):
            per_core = np.clip(np.where(d_total > 0, d_busy / d_total, 0.0), 0.0, 1.0)
        all_total = float(d_total.sum())
        overall = min(max(float(d_busy.sum()) / all_total, 0.0), 1.0) if all_total > 0 else 0.0
        return overall, per_core


class HostReceiver:
    """Samples the machine every interval; see the module docstring.

    ``nvml`` replaces the real NVML (tests pass a double); ``None`` uses ``pynvml``.
    """

    def __init__(self, settings: Settings, config: HostConfig, next: Mapping[Signal, Consumer],
                 *, nvml: NvmlApi | None = None) -> None:
        self.settings = settings
        self.config = config
        self.telemetry = settings.telemetry
        self.next = next[Signal.METRICS]
        self.gpu = GpuSampler(nvml if nvml is not None else Nvml(), settings.telemetry)
        self.snapshot: HardwareSnapshot | None = None
        self._patterns = [re.compile(p, re.IGNORECASE) for p in config.process_name_patterns]
        self._identity: dict[str, str] = {}
        self._cpu = _CpuRate()
        # pid -> (psutil.Process, previous cpu seconds, previous monotonic time)
        self._procs: dict[int, tuple[psutil.Process, float, float]] = {}
        self._boot_ns = int(psutil.boot_time() * 1e9)
        self._task: asyncio.Task[None] | None = None

    async def start(self, host: Host) -> None:
        self.snapshot = HardwareSnapshot.of(host)
        # The service must remember at least as many senders as we are to sample.
        self.snapshot.max_processes = max(self.snapshot.max_processes, self.config.max_processes)
        await asyncio.to_thread(self._prime)
        self._task = asyncio.create_task(self._run(), name=f"{self.settings.id} sampler")

    def _prime(self) -> None:
        """Blocking start-up work: identity, first CPU sample, NVML initialisation."""
        self._identity = host_identity()
        self._cpu.sample()
        if self.config.gpu:
            self.gpu.open()
        else:
            self.telemetry.info("GPU sampling is off (gpu = false)")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_tick = loop.time()
        while True:
            # Ticks on a fixed grid, so a slow sample does not make the series drift.
            next_tick += self.config.interval
            await asyncio.sleep(max(0.0, next_tick - loop.time()))
            await self.collect()
            if loop.time() > next_tick + self.config.interval:
                next_tick = loop.time()

    async def collect(self) -> MetricBatch | None:
        """Sample once and send the batch downstream. Never raises (errors are counted)."""
        try:
            batch, reading = await asyncio.to_thread(self.sample)
        except Exception as e:  # psutil/NVML surprises must not stop the ticks
            self.telemetry.error("sampling failed", error=repr(e))
            return None
        if self.snapshot is not None:
            self.snapshot.publish(reading)
        n = batch.item_count
        self.telemetry.accepted(Signal.METRICS, n)
        # No retry on refusal: the next tick carries fresher values of the same series.
        await emit(self.next, batch, self.telemetry)
        return batch

    # ------------------------------------------------------------------ sampling (thread)

    def sample(self) -> tuple[MetricBatch, HostReading]:
        """Take one sample of everything (blocking). Returns the batch and the reading."""
        now = time.time_ns()
        batch = MetricBatch()
        rm = batch.request.resource_metrics.add()
        _fill(rm.resource.attributes, self._identity)
        sm = rm.scope_metrics.add()
        sm.scope.name = SCOPE_NAME
        ms = _MetricSet(sm, now)
        cpu_util = self._sample_cpu(ms)
        mem_util = self._sample_memory(ms)
        self._sample_disks(ms)
        self._sample_filesystems(ms)
        self._sample_network(ms)
        gpus = self.gpu.sample()
        self._emit_gpus(ms, gpus)
        self._sample_processes(batch, now)
        return batch, HostReading(now, cpu_util, mem_util, tuple(gpus))

    def _sample_cpu(self, ms: _MetricSet) -> float | None:
        rate = self._cpu.sample()
        overall = None
        if rate is not None:
            overall, per_core = rate
            ms.gauge("system.cpu.utilization", "1",
                     "Fraction of time all logical CPUs were busy (not idle or iowait).", overall)
            if self.config.per_core:
                for i, u in enumerate(per_core.tolist()):
                    ms.gauge("system.cpu.core.utilization", "1",
                             "Fraction of time one logical CPU was busy.", u,
                             {"cpu.logical_number": i})
        with contextlib.suppress(OSError, AttributeError):
            for window, value in zip(("1m", "5m", "15m"), psutil.getloadavg(), strict=True):
                ms.gauge(f"system.cpu.load_average.{window}", "{thread}",
                         f"Load average over {window}.", value)
        return overall

    def _sample_memory(self, ms: _MetricSet) -> float | None:
        vm = psutil.virtual_memory()
        for state in ("used", "free", "cached", "buffers"):
            value = getattr(vm, state, None)
            ms.gauge("system.memory.usage", "By", "Memory in use, by state.", value,
                     {"system.memory.state": state})
        ms.gauge("system.memory.limit", "By", "Total physical memory.", vm.total)
        util = (vm.total - vm.available) / vm.total if vm.total else None
        ms.gauge("system.memory.utilization", "1",
                 "Fraction of memory not available to new processes.", util)
        sw = psutil.swap_memory()
        if sw.total:
            for state in ("used", "free"):
                ms.gauge("system.paging.usage", "By", "Swap space, by state.", getattr(sw, state),
                         {"system.paging.state": state})
            ms.gauge("system.paging.utilization", "1", "Fraction of swap in use.",
                     sw.used / sw.total)
        return util

    def _sample_disks(self, ms: _MetricSet) -> None:
        counters = psutil.disk_io_counters(perdisk=True) or {}
        prefixes = tuple(self.config.exclude_disk_prefixes)
        names = [d for d in sorted(counters) if not d.startswith(prefixes)]
        for dev in names[: self.config.max_devices]:
            c = counters[dev]
            for direction, nbytes, ops in (("read", c.read_bytes, c.read_count),
                                           ("write", c.write_bytes, c.write_count)):
                attrs = {"system.device": dev, "disk.io.direction": direction}
                ms.counter("system.disk.io", "By", "Bytes transferred to and from a disk.",
                           nbytes, self._boot_ns, attrs)
                ms.counter("system.disk.operations", "{operation}", "Disk operations completed.",
                           ops, self._boot_ns, attrs)

    def _sample_filesystems(self, ms: _MetricSet) -> None:
        excluded = set(self.config.exclude_filesystem_types)
        seen: set[str] = set()
        for part in psutil.disk_partitions(all=False):
            if len(seen) >= self.config.max_devices:
                break
            if part.fstype in excluded or part.mountpoint in seen:
                continue
            try:
                usage = psutil.disk_usage(part.mountpoint)
            except OSError:  # unmounted meanwhile, or not readable by this user
                continue
            seen.add(part.mountpoint)
            base = {"system.device": part.device, "system.filesystem.mountpoint": part.mountpoint,
                    "system.filesystem.type": part.fstype}
            for state, value in (("used", usage.used), ("free", usage.free)):
                ms.gauge("system.filesystem.usage", "By", "Filesystem space, by state.", value,
                         {**base, "system.filesystem.state": state})
            ms.gauge("system.filesystem.utilization", "1", "Fraction of filesystem space used.",
                     usage.used / usage.total if usage.total else None, base)

    def _sample_network(self, ms: _MetricSet) -> None:
        counters = psutil.net_io_counters(pernic=True) or {}
        excluded = set(self.config.exclude_interfaces)
        names = [n for n in sorted(counters) if n not in excluded]
        for nic in names[: self.config.max_devices]:
            c = counters[nic]
            for direction, nbytes, packets in (("receive", c.bytes_recv, c.packets_recv),
                                               ("transmit", c.bytes_sent, c.packets_sent)):
                attrs = {"network.interface.name": nic, "network.io.direction": direction}
                ms.counter("system.network.io", "By", "Bytes received and sent.", nbytes,
                           self._boot_ns, attrs)
                ms.counter("system.network.packets", "{packet}", "Packets received and sent.",
                           packets, self._boot_ns, attrs)

    def _emit_gpus(self, ms: _MetricSet, gpus: list[GpuReading]) -> None:
        for g in gpus:
            attrs = {"hw.id": g.uuid, "hw.name": g.name, "gpu.id": str(g.index)}
            ms.gauge("hw.gpu.utilization", "1", GPU_UTILIZATION_DESCRIPTION, g.utilization, attrs)
            ms.gauge("hw.gpu.memory.bandwidth.utilization", "1",
                     "Fraction of the last sample period during which GPU memory was being read "
                     "or written (NVML utilization.memory).", g.memory_bandwidth_utilization, attrs)
            ms.gauge("hw.gpu.memory.usage", "By", "GPU framebuffer memory in use.",
                     g.memory_used, attrs)
            ms.gauge("hw.gpu.memory.free", "By", "GPU framebuffer memory free.",
                     g.memory_free, attrs)
            ms.gauge("hw.gpu.memory.limit", "By", "GPU framebuffer memory in total.",
                     g.memory_total, attrs)
            ms.gauge("hw.gpu.power", "W", "GPU power draw.", g.power, attrs)
            ms.counter("hw.gpu.energy", "J", "GPU energy consumed since the driver loaded.",
                       g.energy, self._boot_ns, attrs)
            ms.gauge("hw.gpu.temperature", "Cel", "GPU core temperature.", g.temperature, attrs)
            ms.gauge("hw.gpu.clock.sm", "MHz", "GPU streaming multiprocessor clock.",
                     g.sm_clock, attrs)
            for pid, used in g.processes.items():
                ms.gauge("hw.gpu.process.memory.usage", "By",
                         "GPU memory held by one process (as NVML sees its pid).", used,
                         {**attrs, "process.pid": pid})

    # ------------------------------------------------------------------ processes

    def _targets(self) -> dict[int, str | None]:
        """Processes to sample: pids enrich saw (with their service), then name matches."""
        limit = self.config.max_processes
        known = self.snapshot.processes() if self.snapshot is not None else {}
        # Most recently seen last; keep the newest when over the limit.
        targets = dict(list(known.items())[-limit:]) if limit else {}
        if self._patterns and len(targets) < limit:
            for p in psutil.process_iter(["name", "cmdline"]):
                if len(targets) >= limit:
                    break
                if p.pid in targets:
                    continue
                text = " ".join([p.info.get("name") or "", *(p.info.get("cmdline") or [])])
                if any(rx.search(text) for rx in self._patterns):
                    targets[p.pid] = None
        return targets

    def _sample_processes(self, batch: MetricBatch, now: int) -> None:
        targets = self._targets()
        for pid in [p for p in self._procs if p not in targets]:
            del self._procs[pid]
        ncpu = psutil.cpu_count() or 1
        for pid, service in targets.items():
            try:
                self._sample_process(batch, now, pid, service, ncpu)
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                self._procs.pop(pid, None)
                if self.snapshot is not None:
                    self.snapshot.forget_process(pid)
            except psutil.AccessDenied:
                continue  # another user's process: nothing we may read

    def _sample_process(self, batch: MetricBatch, now: int, pid: int, service: str | None,
                        ncpu: int) -> None:
        entry = self._procs.get(pid)
        proc = entry[0] if entry is not None else psutil.Process(pid)
        if not proc.is_running():  # the pid was reused by another process
            raise psutil.NoSuchProcess(pid)
        with proc.oneshot():
            t = proc.cpu_times()
            cpu_s = t.user + t.system
            mono = time.monotonic()
            rss = proc.memory_info().rss
            threads = proc.num_threads()
            fds = None
            with contextlib.suppress(psutil.AccessDenied, AttributeError):
                fds = proc.num_fds()
            name = proc.name()
        self._procs[pid] = (proc, cpu_s, mono)
        rm = batch.request.resource_metrics.add()
        resource = {**self._identity, "process.pid": pid, "process.executable.name": name}
        if service:
            resource["service.name"] = service
        _fill(rm.resource.attributes, resource)
        sm = rm.scope_metrics.add()
        sm.scope.name = SCOPE_NAME
        ms = _MetricSet(sm, now)
        # The pid also labels each point: backends that flatten resources into a
        # job/instance (Prometheus) would otherwise merge the processes of one host.
        point = {"process.pid": pid}
        if entry is not None and mono > entry[2]:
            util = (cpu_s - entry[1]) / ((mono - entry[2]) * ncpu)
            ms.gauge("process.cpu.utilization", "1",
                     "CPU time used by the process over elapsed time times logical CPUs.",
                     min(max(util, 0.0), 1.0), point)
        ms.gauge("process.memory.usage", "By", "Resident set size of the process.", rss, point)
        ms.gauge("process.thread.count", "{thread}", "Threads of the process.", threads, point)
        ms.gauge("process.open_file_descriptor.count", "{file_descriptor}",
                 "Open file descriptors of the process (files, sockets, pipes).", fds, point)

    async def shutdown(self) -> None:
        task, self._task = self._task, None
        await cancel_tasks(task)
        # Waits for a sample still running in its thread (the sampler holds a lock).
        await asyncio.to_thread(self.gpu.close)
