"""The deployment manifest: which model each service runs, written by a deployment tool.

Format (JSON, or TOML when the file name ends in ``.toml``)::

    {"services": {"ranker": {"ml.model.version": "v4", "ml.model.name": "ranker-xgb"}}}

    [services.ranker]
    "ml.model.version" = "v4"
    "ml.model.name" = "ranker-xgb"

Each service's table holds resource attributes (string, number or boolean values).
The file is polled by ``(mtime, size)`` off the event loop; a change is re-read and
swapped in whole. A file that cannot be read or parsed keeps the previous contents
(warned, rate-limited); a file that disappears means an empty manifest.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any

from agent.telemetry import ComponentTelemetry

Entries = dict[str, dict[str, str | int | float | bool]]


class ManifestError(ValueError):
    """The manifest's contents do not follow the format above."""


def parse_manifest(text: str, *, toml: bool) -> Entries:
    """Parse manifest text into ``{service.name: {attribute: value}}``."""
    try:
        raw: Any = tomllib.loads(text) if toml else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ManifestError(f"not valid {'TOML' if toml else 'JSON'}: {e}") from None
    services = raw.get("services") if isinstance(raw, dict) else None
    if not isinstance(services, dict):
        raise ManifestError("expected a top-level 'services' table")
    out: Entries = {}
    for name, attrs in services.items():
        if not isinstance(attrs, dict):
            raise ManifestError(f"services.{name}: expected a table of attributes")
        for key, value in attrs.items():
            if not isinstance(value, str | int | float | bool):
                raise ManifestError(f"services.{name}.{key}: expected a string, number or "
                                    f"boolean, got {type(value).__name__}")
        out[str(name)] = dict(attrs)
    return out


class Manifest:
    """The latest good contents of the manifest file. ``entries`` is swapped, never mutated."""

    def __init__(self, path: Path, max_bytes: int, telemetry: ComponentTelemetry) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.telemetry = telemetry
        self.entries: Entries = {}
        self._seen: tuple[int, int] | None = None  # (mtime_ns, size) last read
        self._missing_said = False

    def poll(self) -> bool:
        """Re-read the file when it changed (blocking I/O). True when ``entries`` changed."""
        try:
            st = os.stat(self.path)
        except OSError:
            if not self._missing_said:
                self._missing_said = True
                self.telemetry.info("model manifest not found; versions from it are unknown",
                                    path=str(self.path))
            self._seen = None
            changed, self.entries = bool(self.entries), {}
            return changed
        self._missing_said = False
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._seen:
            return False
        self._seen = stamp
        if st.st_size > self.max_bytes:
            self.telemetry.warn("manifest ignored", "too large", path=str(self.path),
                                size=st.st_size, limit=self.max_bytes)
            return False
        try:
            text = self.path.read_text(encoding="utf-8")
            entries = parse_manifest(text, toml=self.path.suffix.lower() == ".toml")
        except (OSError, UnicodeDecodeError, ManifestError) as e:
            # A deployment tool caught mid-write looks like this; the next change retries.
            self.telemetry.warn("manifest ignored", "unreadable", path=str(self.path), error=e)
            return False
        self.entries = entries
        self.telemetry.info("model manifest loaded", path=str(self.path), services=len(entries))
        return True
