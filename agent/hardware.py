"""The hardware snapshot service: the latest host and GPU readings, shared in memory.

The ``host`` receiver samples psutil and NVML every interval and publishes one
immutable ``HostReading`` here; the ``enrich`` processor reads it on its hot path
(one attribute read, no lock: publishing replaces the reference, and a reading never
changes after it is published). In the other direction, ``enrich`` tells the
service which inference processes send data (``process.pid`` on resources), so the
``host`` receiver can sample them.

Both components find the service with ``HardwareSnapshot.of(host)``, which creates
it on first use: the graph starts components downstream-first, so ``enrich`` (in a
traces pipeline) may start before ``host`` (a metrics receiver) and must not miss it.
Without a ``host`` receiver, ``latest`` stays ``None`` and ``enrich`` adds no
hardware attributes.
"""

from __future__ import annotations

import platform
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SERVICE_NAME = "hardware"

# How many processes the service remembers for the host receiver; the least recently
# seen is forgotten first. Bounded because pids come from untrusted senders.
DEFAULT_MAX_PROCESSES = 64


@dataclass(frozen=True)
class GpuReading:
    """One GPU at one sampling instant. A field is ``None`` when NVML could not read it.

    ``utilization`` is NVML's ``utilization.gpu``: the fraction of the sample period
    during which *some* kernel was running, not how busy the SMs were.
    """

    index: int
    uuid: str
    name: str
    utilization: float | None = None  # 0..1
    memory_bandwidth_utilization: float | None = None  # 0..1
    memory_used: int | None = None  # bytes
    memory_free: int | None = None  # bytes
    memory_total: int | None = None  # bytes
    power: float | None = None  # watts
    energy: float | None = None  # joules since the driver loaded (counter)
    temperature: float | None = None  # degrees Celsius
    sm_clock: float | None = None  # MHz
    # pid -> GPU memory that process holds on this GPU, in bytes (None: not reported).
    processes: Mapping[int, int | None] = field(default_factory=dict)


@dataclass(frozen=True)
class HostReading:
    """The whole machine at one sampling instant (immutable once published)."""

    time_unix_nano: int
    cpu_utilization: float | None  # 0..1, all cores
    memory_utilization: float | None  # 0..1, (total - available) / total
    gpus: tuple[GpuReading, ...] = ()

    def __post_init__(self) -> None:
        by_pid: dict[int, list[int]] = {}
        for pos, g in enumerate(self.gpus):
            for pid in g.processes:
                by_pid.setdefault(pid, []).append(pos)
        # Precomputed so that the per-resource lookup in enrich is one dict get.
        object.__setattr__(self, "_gpus_by_pid", {p: tuple(v) for p, v in by_pid.items()})

    def gpus_of_process(self, pid: int) -> tuple[GpuReading, ...]:
        """The GPUs on which ``pid`` holds memory (empty when none or unknown)."""
        return tuple(self.gpus[i] for i in self._gpus_by_pid.get(pid, ()))  # type: ignore[attr-defined]

    def gpu(self, ref: str | int) -> GpuReading | None:
        """A GPU by NVML index (``0``, ``"0"``) or UUID (``"GPU-..."``)."""
        for g in self.gpus:
            if g.uuid == ref or str(g.index) == str(ref).strip():
                return g
        return None


class HardwareSnapshot:
    """Latest readings (written by ``host``) and the processes seen (written by ``enrich``).

    ``latest`` is read without a lock; ``publish`` swaps it. The process table is
    touched from the event loop (enrich) and from the sampling thread (host), so it
    has a lock; it is bounded to ``max_processes`` entries.
    """

    def __init__(self, max_processes: int = DEFAULT_MAX_PROCESSES) -> None:
        self.latest: HostReading | None = None
        self.max_processes = max_processes
        self._processes: dict[int, str | None] = {}  # pid -> service.name, oldest first
        self._lock = threading.Lock()

    @classmethod
    def of(cls, host: Any) -> HardwareSnapshot:
        """The agent's snapshot service, registered in ``host.services`` on first use."""
        return host.service(SERVICE_NAME, cls)

    def publish(self, reading: HostReading) -> None:
        self.latest = reading

    def note_process(self, pid: int, service_name: str | None = None) -> None:
        """Remember that ``pid`` (of ``service_name``) sends telemetry through the agent."""
        with self._lock:
            known = self._processes.pop(pid, None)
            self._processes[pid] = service_name or known
            while len(self._processes) > self.max_processes:
                del self._processes[next(iter(self._processes))]

    def forget_process(self, pid: int) -> None:
        """Drop a pid that no longer exists (the host receiver found it gone)."""
        with self._lock:
            self._processes.pop(pid, None)

    def processes(self) -> dict[int, str | None]:
        """A copy of ``{pid: service.name or None}``, most recently seen last."""
        with self._lock:
            return dict(self._processes)


def host_identity() -> dict[str, str]:
    """``host.name``, ``host.id`` (from ``/etc/machine-id`` when readable) and ``os.type``.

    Does file I/O: call it at start, not per batch.
    """
    out = {"host.name": socket.gethostname()}
    try:
        machine_id = Path("/etc/machine-id").read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        machine_id = ""
    if machine_id:
        out["host.id"] = machine_id
    out["os.type"] = platform.system().lower() or "unknown"
    return out
