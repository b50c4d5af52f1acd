"""A blocking, size-rotated append-only file. Called from a worker thread, never the loop."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import BinaryIO


class RotatingFile:
    """Appends records to ``path``; rotates to ``path.1`` .. ``path.<max_backups>`` by size.

    A record is never split across files: the file rotates *before* a record that
    would take it past ``max_size`` (a record larger than ``max_size`` gets a file
    of its own). Not thread-safe: the owner serialises calls.
    """

    def __init__(self, path: Path, max_size: int, max_backups: int) -> None:
        self.path = path
        self.max_size = max_size
        self.max_backups = max_backups
        self._f: BinaryIO | None = None
        self._size = 0

    def write(self, record: bytes) -> None:
        """Append one record and flush it to the OS (not to disk: see ``close``).

        On an ``OSError`` (disk full) the file is cut back to the last whole record
        so that a retry does not leave a torn record behind, and the error propagates.
        """
        f = self._open()
        if self._size and self._size + len(record) > self.max_size:
            self._rotate()
            f = self._open()
        try:
            f.write(record)
            f.flush()
        except OSError:
            self._abandon()
            raise
        self._size += len(record)

    def close(self) -> None:
        """Flush and fsync, then close. Idempotent."""
        f, self._f = self._f, None
        if f is None:
            return
        try:
            f.flush()
            os.fsync(f.fileno())
        finally:
            f.close()

    def _open(self) -> BinaryIO:
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "ab")  # noqa: SIM115 - kept open across writes
            self._size = self._f.tell()
        return self._f

    def _rotate(self) -> None:
        self.close()
        if self.max_backups == 0:
            self.path.unlink(missing_ok=True)
            return
        oldest = self._backup(self.max_backups)
        oldest.unlink(missing_ok=True)
        for i in range(self.max_backups - 1, 0, -1):
            src = self._backup(i)
            if src.exists():
                src.rename(self._backup(i + 1))
        self.path.rename(self._backup(1))

    def _backup(self, i: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{i}")

    def _abandon(self) -> None:
        """Drop the handle after a failed write and cut the file back to ``_size``."""
        f, self._f = self._f, None
        with contextlib.suppress(OSError):
            f.close()  # type: ignore[union-attr]
        with contextlib.suppress(OSError):
            os.truncate(self.path, self._size)
