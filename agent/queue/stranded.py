"""Queue files that no running sender owns: a renamed or removed persistent exporter.

A persistent queue's file is named after its exporter's id (``otlp/up`` ->
``otlp-up.db``). Rename the exporter, or remove it, and its file stays in
``<state_dir>/queues`` with the batches that were acknowledged but not yet sent: no
sender opens it, so they are never delivered. After every start and reload the agent
names such files, with what they hold, so that nobody loses that data silently.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from agent.component import Host
from agent.telemetry import log

# The host service (``Host.services``) where senders record the files they opened.
QUEUE_FILES = "queue_files"


class QueueFiles(set[str]):
    """The names of the queue files the senders of one running graph opened."""


def queue_directory(state_dir: Path) -> Path:
    """Where persistent queue files live: ``<state_dir>/queues``."""
    return state_dir / "queues"


def claim(host: Host, path: Path) -> None:
    """Record that a sender of this graph owns the queue file ``path``."""
    host.service(QUEUE_FILES, QueueFiles).add(path.name)


@dataclass(frozen=True)
class StrandedFile:
    """A queue file nobody owns; ``rows``/``items`` are None when it cannot be read."""

    path: Path
    rows: int | None
    items: int | None

    @property
    def exporter(self) -> str:
        """The exporter id the file belongs to (``otlp-up~s1.db`` -> ``otlp/up``)."""
        return self.path.name.removesuffix(".db").split("~", 1)[0].replace("-", "/", 1)


def stranded_queue_files(directory: Path, owned: set[str]) -> list[StrandedFile]:
    """The ``*.db`` files in ``directory`` not in ``owned`` that hold batches (or cannot
    be read), with their row and item counts. Read-only; does I/O, so call it off the
    event loop."""
    if not directory.is_dir():
        return []
    found = []
    for path in sorted(directory.glob("*.db")):
        if path.name in owned:
            continue
        rows = items = None
        try:
            con = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
            try:
                rows, items = con.execute(
                    "SELECT count(*), coalesce(sum(items), 0) FROM batches").fetchone()
            finally:
                con.close()
        except sqlite3.Error:
            pass  # not a queue file we can read: still worth naming
        if rows != 0:  # an emptied file holds nothing to lose
            found.append(StrandedFile(path, rows, items))
    return found


async def warn_stranded_queue_files(host: Host) -> list[StrandedFile]:
    """Log one warning naming the queue files no sender of the running graph opened."""
    owned = host.service(QUEUE_FILES, QueueFiles)
    directory = queue_directory(host.state_dir)
    try:
        stranded = await asyncio.to_thread(stranded_queue_files, directory, set(owned))
    except OSError as e:  # a check, not a reason to refuse the config
        log(logging.WARNING, "cannot look for unowned queue files", path=str(directory),
            error=str(e))
        return []
    if stranded:
        log(logging.WARNING,
            "queue files that no configured exporter owns: their batches are not sent",
            files=[{"path": str(f.path), "exporter": f.exporter, "batches": f.rows,
                    "items": f.items} for f in stranded],
            hint="to deliver them, give a persistent exporter that id again (exporters."
                 "<exporter>) and reload; to discard them, delete the files")
    return stranded
