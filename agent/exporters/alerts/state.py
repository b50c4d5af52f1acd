"""Alerts and their persistence.

An ``Alert`` is one rule's alert for one label set, in one of three states:
``pending`` (the condition holds, not yet for ``for``), ``firing``, and ``resolved``
(kept for a while so Alertmanager keeps hearing that it ended). ``StateFile`` writes
every alert to ``<state_dir>/alerts/<component id>.json`` atomically (a temporary
file renamed over the old one), so a restart neither resets a ``for`` timer nor
forgets to send a resolve. Times are the evaluation clock's Unix seconds.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

State = Literal["pending", "firing", "resolved"]
FORMAT_VERSION = 1


@dataclass
class Alert:
    """One alert. ``last_sent`` maps a notifier id to when it was last handed this alert."""

    fingerprint: str
    rule: str
    labels: dict[str, str]
    annotations: dict[str, str]
    state: State
    active_since: float
    last_true: float
    value: float = math.nan
    fired_at: float | None = None
    resolved_at: float | None = None
    last_sent: dict[str, float] = field(default_factory=dict)
    # Set on alerts read back from disk until their group reports again (not persisted).
    restored: bool = field(default=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        del d["restored"]
        d["value"] = None if math.isnan(self.value) else self.value
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Alert:
        """Raises ``KeyError`` / ``TypeError`` / ``ValueError`` on a malformed record."""
        if d["state"] not in ("pending", "firing", "resolved"):
            raise ValueError(f"unknown state {d['state']!r}")
        return cls(
            fingerprint=str(d["fingerprint"]), rule=str(d["rule"]),
            labels={str(k): str(v) for k, v in d["labels"].items()},
            annotations={str(k): str(v) for k, v in d["annotations"].items()},
            state=d["state"], active_since=float(d["active_since"]),
            last_true=float(d["last_true"]),
            value=math.nan if d.get("value") is None else float(d["value"]),
            fired_at=None if d.get("fired_at") is None else float(d["fired_at"]),
            resolved_at=None if d.get("resolved_at") is None else float(d["resolved_at"]),
            last_sent={str(k): float(v) for k, v in d.get("last_sent", {}).items()},
            restored=True,
        )


def state_path(state_dir: Path, component_id: str) -> Path:
    """``<state_dir>/alerts/<id>.json``, the id made safe as a file name (``/`` -> ``_``)."""
    return state_dir / "alerts" / (re.sub(r"[^A-Za-z0-9_.\-]", "_", component_id) + ".json")


class StateFile:
    """Reads and atomically writes the alerts of one exporter instance."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> tuple[list[Alert], list[str]]:
        """The saved alerts, and a description of each record (or file) that was unusable.

        A missing file is an empty state; a corrupt one is reported, not raised: losing
        alert state must not stop the agent from starting.
        """
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return [], []
        except (OSError, ValueError) as e:
            return [], [f"{self.path}: unreadable, starting without saved alerts: {e}"]
        if not isinstance(raw, dict) or raw.get("version") != FORMAT_VERSION:
            return [], [f"{self.path}: not a version {FORMAT_VERSION} alert state file"]
        alerts, problems = [], []
        for i, rec in enumerate(raw.get("alerts", [])):
            try:
                alerts.append(Alert.from_json(rec))
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                problems.append(f"{self.path}: alerts[{i}] skipped: {e!r}")
        return alerts, problems

    def save(self, alerts: list[Alert]) -> None:
        """Write all alerts: temporary file, fsync, rename over the previous state."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        data = json.dumps({"version": FORMAT_VERSION, "alerts": [a.to_json() for a in alerts]},
                          separators=(",", ":"))
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
