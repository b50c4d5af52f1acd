"""A fake NVML implementing ``agent.receivers.host.nvml.NvmlApi``.

Each ``FakeGpu`` holds the raw values NVML would answer (percent, mW, mJ, MiB...),
and ``errors`` maps a field name (an ``NvmlApi`` method) to the NVML return code
that field raises, as a real driver would through ``pynvml.NVMLError``.
``lose(index)`` makes every later call on that GPU answer ``NVML_ERROR_GPU_IS_LOST``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pynvml


@dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    util_gpu: int = 37
    util_memory: int = 12
    used: int = 30 * 2**30
    free: int = 50 * 2**30
    total: int = 80 * 2**30
    power_mw: int = 215_500
    energy_mj: int = 9_876_543
    temperature_c: int = 54
    sm_clock_mhz: int = 1980
    processes: list[tuple[int, int | None]] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    lost: bool = False


class FakeNvml:
    """NVML with the GPUs given; ``init_error`` simulates a machine without NVML."""

    def __init__(self, gpus: list[FakeGpu], *, init_error: int | None = None) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.initialised = False
        self.calls: dict[str, int] = {}

    def _check(self, handle: int, name: str) -> FakeGpu:
        self.calls[name] = self.calls.get(name, 0) + 1
        gpu = self.gpus[handle]
        if gpu.lost:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        if name in gpu.errors:
            raise pynvml.NVMLError(gpu.errors[name])
        return gpu

    def lose(self, index: int) -> None:
        self.gpus[index].lost = True

    def init(self) -> None:
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)
        self.initialised = True

    def shutdown(self) -> None:
        self.initialised = False

    def device_count(self) -> int:
        return len(self.gpus)

    def handle(self, index: int) -> int:
        return index

    def uuid(self, handle: int) -> str:
        return self._check(handle, "uuid").uuid

    def name(self, handle: int) -> str:
        return self._check(handle, "name").name

    def utilization(self, handle: int) -> tuple[int, int]:
        g = self._check(handle, "utilization")
        return g.util_gpu, g.util_memory

    def memory(self, handle: int) -> tuple[int, int, int]:
        g = self._check(handle, "memory")
        return g.used, g.free, g.total

    def power_mw(self, handle: int) -> int:
        return self._check(handle, "power_mw").power_mw

    def energy_mj(self, handle: int) -> int:
        return self._check(handle, "energy_mj").energy_mj

    def temperature_c(self, handle: int) -> int:
        return self._check(handle, "temperature_c").temperature_c

    def sm_clock_mhz(self, handle: int) -> int:
        return self._check(handle, "sm_clock_mhz").sm_clock_mhz

    def processes(self, handle: int) -> list[tuple[int, int | None]]:
        return list(self._check(handle, "processes").processes)
