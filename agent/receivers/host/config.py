"""Configuration of the ``host`` receiver (psutil system and process metrics, NVML GPUs)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from agent.config import Duration


@dataclass
class HostConfig:
    """``[receivers.host]``. See README.md for the metrics emitted."""

    interval: Duration = 10.0
    # Per-core CPU utilisation points (one series per logical CPU).
    per_core: bool = True
    # Regexes (case-insensitive, searched in the process name and its command line)
    # selecting inference processes to sample, besides the pids that the enrich
    # processor learns from the ``process.pid`` resource attribute.
    process_name_patterns: list[str] = field(default_factory=list)
    # Most processes sampled per interval (pids from enrich first, then name matches).
    max_processes: int = 64
    # Most disks, filesystems and network interfaces reported, each.
    max_devices: int = 64
    # Filesystem types not reported (pseudo and read-only image filesystems).
    exclude_filesystem_types: list[str] = field(default_factory=lambda: [
        "tmpfs", "devtmpfs", "overlay", "squashfs", "proc", "sysfs", "cgroup", "cgroup2",
        "nsfs", "autofs"])
    # Disks whose name starts with one of these are not reported (loop and ram devices).
    exclude_disk_prefixes: list[str] = field(default_factory=lambda: ["loop", "ram"])
    # Network interfaces not reported.
    exclude_interfaces: list[str] = field(default_factory=lambda: ["lo"])
    # Sample GPUs through NVML (off by itself, said once, where there is no driver).
    gpu: bool = True

    def validate(self) -> list[str]:
        errors = []
        if self.interval < 0.1:
            errors.append(f"interval: {self.interval}s is too short (at least 100ms)")
        if self.max_processes < 0:
            errors.append("max_processes: must not be negative")
        if self.max_devices < 0:
            errors.append("max_devices: must not be negative")
        for i, p in enumerate(self.process_name_patterns):
            try:
                re.compile(p)
            except re.error as e:
                errors.append(f"process_name_patterns[{i}]: {p!r} is not a regex: {e}")
        return errors
