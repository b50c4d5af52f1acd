"""Configuration of the ``enrich`` processor."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from agent.config import ByteSize, Duration


@dataclass
class EnrichConfig:
    """``[processors.enrich]``. See README.md for what each step writes."""

    # host.name, host.id, os.type on every resource.
    host_identity: bool = True
    # Overwrite host identity and hardware attributes a sender already set.
    override: bool = False
    # service.name -> ml.model.version, used when neither the item nor its resource has one.
    model_versions: dict[str, str] = field(default_factory=dict)
    # A deployment manifest (JSON, or TOML when the name ends in .toml) consulted after
    # model_versions; re-read when its mtime or size changes.
    manifest: Path | None = None
    manifest_poll_interval: Duration = 5.0
    manifest_max_bytes: ByteSize = 1 << 20
    # The version written when no source knows one.
    unknown_version: str = "unknown"
    # How often a service's spans/logs are scanned for their own ml.model.version. A
    # service found to set it on items gets per-item fallbacks; the others get one
    # resource attribute per batch without their items being touched.
    item_probe_interval: Duration = 10.0
    # Most services remembered by that probe (oldest forgotten first).
    max_services: int = 1000
    # host.cpu.utilization, host.memory.utilization, gpu.* on trace and log resources,
    # from the host receiver's latest sample.
    hardware: bool = True
    # Fill missing trace_id/span_id of log records from traceparent / trace_id / span_id
    # attributes or the same fields in a JSON (or map) body.
    correlate_logs: bool = True
    # JSON string bodies longer than this are not parsed for trace context.
    max_json_body_bytes: ByteSize = 16384

    def validate(self) -> list[str]:
        errors = []
        if self.manifest_poll_interval < 0.1:
            errors.append("manifest_poll_interval: must be at least 100ms")
        if self.max_services < 1:
            errors.append("max_services: must be at least 1")
        if not self.unknown_version:
            errors.append("unknown_version: must not be empty")
        for svc, version in self.model_versions.items():
            if not isinstance(version, str) or not version:
                errors.append(f"model_versions.{svc}: must be a non-empty string")
        return errors
