"""The dead-letter file: documents Elasticsearch refused for good, as JSON lines."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any


class DeadLetterFile:
    """Appends refused documents to ``path`` until it holds ``max_size`` bytes.

    Each line is ``{"time", "index", "id", "status", "error", "document"}`` with the
    document exactly as it was sent, so it can be fixed and replayed. Writes run in a
    worker thread; ``write`` returns how many entries did not fit.
    """

    def __init__(self, path: Path, max_size: int) -> None:
        self.path = path
        self.max_size = max_size
        self._lock = asyncio.Lock()

    async def write(self, entries: list[dict[str, Any]]) -> int:
        async with self._lock:
            return await asyncio.to_thread(self._append, entries)

    def _append(self, entries: list[dict[str, Any]]) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with open(self.path, "ab") as f:
            size = f.tell()
            for n, entry in enumerate(entries):
                line = json.dumps({"time": now, **entry}, separators=(",", ":"),
                                  ensure_ascii=False).encode() + b"\n"
                if size + len(line) > self.max_size:
                    return len(entries) - n
                f.write(line)
                size += len(line)
        return 0
