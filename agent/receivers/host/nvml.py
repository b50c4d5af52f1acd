"""NVML access for the host receiver: a thin interface over ``pynvml`` and the sampler.

``Nvml`` is the only code that calls ``pynvml``; everything else goes through the
``NvmlApi`` protocol, so tests inject a double (``tests/nvml_double.py``) that
raises the same ``pynvml.NVMLError`` codes a real driver does.

``GpuSampler`` turns NVML answers into ``GpuReading``s and owns the failure policy:

- NVML missing (no library, no driver, no GPU): sampling is off, said once.
- a field answering ``NVML_ERROR_NOT_SUPPORTED`` on a GPU (power on many consumer
  boards, energy before Volta): never asked again for that GPU, said once.
- ``NVML_ERROR_GPU_IS_LOST`` (fell off the bus, Xid 79): the GPU is dropped from
  sampling, said once; the other GPUs carry on.
- any other NVML error on a field: that field is skipped this round (rate-limited warning).

All methods block (NVML calls take milliseconds and can hang on a sick GPU): call
them from a worker thread. A lock serialises sampling against ``close``.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

import pynvml

from agent.hardware import GpuReading
from agent.telemetry import ComponentTelemetry


class NvmlApi(Protocol):
    """The NVML calls the host receiver makes. Every method may raise ``pynvml.NVMLError``.

    Handles are opaque values returned by ``handle`` and passed back unchanged.
    """

    def init(self) -> None: ...
    def shutdown(self) -> None: ...
    def device_count(self) -> int: ...
    def handle(self, index: int) -> Any: ...
    def uuid(self, handle: Any) -> str: ...
    def name(self, handle: Any) -> str: ...
    def utilization(self, handle: Any) -> tuple[int, int]:
        """(gpu %, memory bandwidth %) over NVML's last sample period."""
    def memory(self, handle: Any) -> tuple[int, int, int]:
        """(used, free, total) framebuffer bytes."""
    def power_mw(self, handle: Any) -> int: ...
    def energy_mj(self, handle: Any) -> int:
        """Energy since the driver loaded, millijoules (monotonic)."""
    def temperature_c(self, handle: Any) -> int: ...
    def sm_clock_mhz(self, handle: Any) -> int: ...
    def processes(self, handle: Any) -> list[tuple[int, int | None]]:
        """Compute processes on the GPU: (pid, used bytes or None when not reported)."""


def _text(value: str | bytes) -> str:
    # Older pynvml releases return bytes for strings.
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


class Nvml:
    """``NvmlApi`` over the real ``pynvml`` module (nvidia-ml-py)."""

    def init(self) -> None:
        pynvml.nvmlInit()

    def shutdown(self) -> None:
        pynvml.nvmlShutdown()

    def device_count(self) -> int:
        return int(pynvml.nvmlDeviceGetCount())

    def handle(self, index: int) -> Any:
        return pynvml.nvmlDeviceGetHandleByIndex(index)

    def uuid(self, handle: Any) -> str:
        return _text(pynvml.nvmlDeviceGetUUID(handle))

    def name(self, handle: Any) -> str:
        return _text(pynvml.nvmlDeviceGetName(handle))

    def utilization(self, handle: Any) -> tuple[int, int]:
        r = pynvml.nvmlDeviceGetUtilizationRates(handle)
        return int(r.gpu), int(r.memory)

    def memory(self, handle: Any) -> tuple[int, int, int]:
        m = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return int(m.used), int(m.free), int(m.total)

    def power_mw(self, handle: Any) -> int:
        return int(pynvml.nvmlDeviceGetPowerUsage(handle))

    def energy_mj(self, handle: Any) -> int:
        return int(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))

    def temperature_c(self, handle: Any) -> int:
        return int(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))

    def sm_clock_mhz(self, handle: Any) -> int:
        return int(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM))

    def processes(self, handle: Any) -> list[tuple[int, int | None]]:
        return [(int(p.pid), p.usedGpuMemory)
                for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)]


def _error_name(e: pynvml.NVMLError) -> str:
    try:
        return str(e)
    except Exception:  # pynvml's __str__ calls into the library, which may be gone
        return f"NVML error {getattr(e, 'value', '?')}"


class _Gpu:
    """A GPU being sampled: its handle and the fields it does not support."""

    def __init__(self, index: int, handle: Any, uuid: str, name: str) -> None:
        self.index = index
        self.handle = handle
        self.uuid = uuid
        self.name = name
        self.unsupported: set[str] = set()


# The per-GPU readings, in sampling order: names of NvmlApi methods taking a handle.
_FIELDS = ("utilization", "memory", "power_mw", "energy_mj", "temperature_c", "sm_clock_mhz",
           "processes")


class GpuSampler:
    """Samples every GPU through an ``NvmlApi``; see the module docstring for failures."""

    def __init__(self, nvml: NvmlApi, telemetry: ComponentTelemetry) -> None:
        self.nvml = nvml
        self.telemetry = telemetry
        self.enabled = False
        self._opened = False
        self._gpus: list[_Gpu] = []
        self._lock = threading.Lock()

    def open(self) -> bool:
        """Initialise NVML and enumerate GPUs once. False (said once) when unavailable."""
        with self._lock:
            if self._opened:
                return self.enabled
            self._opened = True
            try:
                self.nvml.init()
            except (pynvml.NVMLError, OSError) as e:
                self.telemetry.info("GPU sampling is off: NVML is not available",
                                    reason=_error_name(e) if isinstance(e, pynvml.NVMLError)
                                    else str(e))
                return False
            try:
                count = self.nvml.device_count()
            except pynvml.NVMLError as e:
                self.telemetry.warn("gpu enumeration failed", _error_name(e))
                count = 0
            for i in range(count):
                try:
                    h = self.nvml.handle(i)
                    self._gpus.append(_Gpu(i, h, self.nvml.uuid(h), self.nvml.name(h)))
                except pynvml.NVMLError as e:
                    # A GPU that cannot even be identified is not sampled; the others are.
                    self.telemetry.warn("gpu enumeration failed", _error_name(e), gpu=i)
            if not self._gpus:
                self.telemetry.info("GPU sampling is off: no GPU found")
                self._shutdown_nvml()
                return False
            self.enabled = True
            self.telemetry.info("GPU sampling is on", gpus=[g.name for g in self._gpus])
            return True

    @property
    def gpu_count(self) -> int:
        return len(self._gpus)

    def sample(self) -> list[GpuReading]:
        """One reading per GPU still present (empty when sampling is off)."""
        with self._lock:
            if not self.enabled:
                return []
            out = []
            for gpu in list(self._gpus):
                reading = self._sample_gpu(gpu)
                if reading is not None:
                    out.append(reading)
            return out

    def _sample_gpu(self, gpu: _Gpu) -> GpuReading | None:
        values: dict[str, Any] = {}
        for name in _FIELDS:
            if name in gpu.unsupported:
                continue
            try:
                values[name] = getattr(self.nvml, name)(gpu.handle)
            except pynvml.NVMLError as e:
                code = getattr(e, "value", None)
                if code == pynvml.NVML_ERROR_GPU_IS_LOST:
                    self._gpus.remove(gpu)
                    self.telemetry.error("GPU lost: no longer sampled", gpu=gpu.index,
                                         uuid=gpu.uuid)
                    return None
                if code == pynvml.NVML_ERROR_NOT_SUPPORTED:
                    gpu.unsupported.add(name)
                    self.telemetry.info("GPU field not supported: not sampled", gpu=gpu.index,
                                        field=name)
                else:
                    self.telemetry.warn("gpu read failed", f"{name}: {_error_name(e)}",
                                        gpu=gpu.index)
        util = values.get("utilization")
        mem = values.get("memory")
        power = values.get("power_mw")
        energy = values.get("energy_mj")
        temp = values.get("temperature_c")
        clock = values.get("sm_clock_mhz")
        return GpuReading(
            index=gpu.index, uuid=gpu.uuid, name=gpu.name,
            utilization=util[0] / 100.0 if util else None,
            memory_bandwidth_utilization=util[1] / 100.0 if util else None,
            memory_used=mem[0] if mem else None,
            memory_free=mem[1] if mem else None,
            memory_total=mem[2] if mem else None,
            power=power / 1000.0 if power is not None else None,
            energy=energy / 1000.0 if energy is not None else None,
            temperature=float(temp) if temp is not None else None,
            sm_clock=float(clock) if clock is not None else None,
            processes=dict(values.get("processes") or ()),
        )

    def close(self) -> None:
        """Shut NVML down (idempotent; waits for a sample in progress)."""
        with self._lock:
            if self.enabled:
                self._shutdown_nvml()
            self.enabled = False
            self._gpus.clear()

    def _shutdown_nvml(self) -> None:
        try:
            self.nvml.shutdown()
        except pynvml.NVMLError as e:
            self.telemetry.warn("nvml shutdown failed", _error_name(e))
