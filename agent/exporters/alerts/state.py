"""Alerts and their persistence.

An ``Alert`` is one rule's alert for one label set, in one of three states:
``pending`` (the condition holds, not yet for ``for``), ``firing``, and ``resolved``
(kept for a while so Alertmanager keeps hearing that it ended, and until every
notifier's peer acknowledged the resolve). ``StateFile`` writes every alert to
``<state_dir>/alerts/<component id>.json`` atomically (a temporary file renamed over
the old one), so a restart neither resets a ``for`` timer nor forgets a trigger or a
resolve that a peer has not acknowledged. Times are the evaluation clock's Unix seconds.

File versions: 2 adds ``delivered`` to each alert. Version 1 files are still read;
their alerts count as delivered in their current state to the notifiers named by the
caller (version 1 sent each transition once and kept no record of the answer, and
repeating every firing alert to Slack on upgrade would be a burst of duplicates).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

State = Literal["pending", "firing", "resolved"]
# What a peer was told last: an alert is never sent while pending.
Delivered = Literal["firing", "resolved"]
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


@dataclass
class Alert:
    """One alert.

    ``last_sent`` maps a notifier id to when it was last handed this alert (Alertmanager
    re-sends on a schedule). ``delivered`` maps the id of a notifier that reports
    transitions (Slack, PagerDuty, webhook) to the last state its peer answered for;
    while it differs from ``state`` the notifier offers the alert again.
    """

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
    delivered: dict[str, Delivered] = field(default_factory=dict)
    # Set on alerts read back from disk until their group reports again (not persisted).
    restored: bool = field(default=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        del d["restored"]
        d["value"] = None if math.isnan(self.value) else self.value
        return d

    def owes_resolve(self) -> bool:
        """Whether some notifier's peer was told this label set fires and not yet that it
        stopped: the alert must be kept (resolved) until that resolve is delivered."""
        return "firing" in self.delivered.values()

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
            delivered={str(k): _delivered(v) for k, v in d.get("delivered", {}).items()},
            restored=True,
        )


def _delivered(value: Any) -> Delivered:
    if value == "firing":
        return "firing"
    if value == "resolved":
        return "resolved"
    raise ValueError(f"unknown delivered state {value!r}")


def state_path(state_dir: Path, component_id: str) -> Path:
    """``<state_dir>/alerts/<id>.json``, the id made safe as a file name (``/`` -> ``_``)."""
    return state_dir / "alerts" / (re.sub(r"[^A-Za-z0-9_.\-]", "_", component_id) + ".json")


class StateFile:
    """Reads and atomically writes the alerts of one exporter instance."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self, assume_delivered: Iterable[str] = ()) -> tuple[list[Alert], list[str]]:
        """The saved alerts, and a description of each record (or file) that was unusable.

        A missing file is an empty state; a corrupt one is reported, not raised: losing
        alert state must not stop the agent from starting. Alerts of a version 1 file
        count as delivered, in their current state, to the ``assume_delivered`` notifiers.
        """
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return [], []
        except (OSError, ValueError) as e:
            return [], [f"{self.path}: unreadable, starting without saved alerts: {e}"]
        version = raw.get("version") if isinstance(raw, dict) else None
        if version not in READABLE_VERSIONS:
            return [], [f"{self.path}: not an alert state file of version "
                        f"{' or '.join(map(str, READABLE_VERSIONS))}"]
        assumed = list(assume_delivered) if version == 1 else []
        alerts, problems = [], []
        for i, rec in enumerate(raw.get("alerts", [])):
            try:
                a = Alert.from_json(rec)
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                problems.append(f"{self.path}: alerts[{i}] skipped: {e!r}")
                continue
            if a.state == "firing" or a.state == "resolved":
                state: Delivered = a.state
                a.delivered.update(dict.fromkeys(assumed, state))
            alerts.append(a)
        return alerts, problems

    def save(self, records: list[dict[str, Any]]) -> None:
        """Write all alerts (``Alert.to_json`` of each, taken by the caller while nothing
        changes them): temporary file, fsync, rename over the previous state."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        data = json.dumps({"version": FORMAT_VERSION, "alerts": records}, separators=(",", ":"))
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
