"""SQLite storage behind one persistent sending queue.

One file per queue (``<state_dir>/queues/<component>.db``), WAL mode, one table of
serialised batches. Every SQLite call runs on a thread the store owns, never on the
event loop. Writes are group-committed: the appends and deletes that arrive while a
commit is running go together into the next round (one multi-row INSERT and one
DELETE, each a transaction of its own), so many concurrent ``put`` calls share one
commit (and, with ``synchronous = "full"``, one fsync) while each caller still
resumes only after its own row is committed. WAL checkpoints run on a second thread.

Faults: a file that SQLite reports corrupt (or that is not a database) is renamed to
``*.corrupt-<unix time>`` and a fresh queue is started (the rename is logged). An
INSERT that fails (disk full, I/O error) fails the appends of its round, which are
not in the queue; a DELETE that fails is retried with a later round. A second
process (or a second sender in this one) opening the same file is refused by an
exclusive ``flock`` on ``<file>.lock``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cramjam

from agent.telemetry import ComponentTelemetry

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id       INTEGER PRIMARY KEY,  -- delivery order, assigned by the store
    signal   TEXT    NOT NULL,
    items    INTEGER NOT NULL,
    enqueued REAL    NOT NULL,     -- Unix time, for the oldest-age gauge
    size     INTEGER NOT NULL,     -- bytes of the serialised request
    codec    INTEGER NOT NULL,     -- 0: data is the request; 1: LZ4 block of it
    data     BLOB    NOT NULL
)"""

# Rows are LZ4-compressed on the store's thread: OTLP requests shrink 4-5x (repeated
# keys and resources), which cuts what SQLite copies into the WAL and the database.
_CODEC_RAW, _CODEC_LZ4 = 0, 1


def _encode(data: bytes) -> tuple[int, bytes]:
    packed = bytes(cramjam.lz4.compress_block(data))
    return (_CODEC_LZ4, packed) if len(packed) < len(data) else (_CODEC_RAW, data)


def _decode(codec: int, data: bytes) -> bytes:
    """The stored request; ``ValueError`` when the row cannot be decompressed."""
    if codec == _CODEC_RAW:
        return bytes(data)
    if codec != _CODEC_LZ4:
        raise ValueError(f"unknown row codec {codec}")
    try:
        return bytes(cramjam.lz4.decompress_block(data))
    except Exception as e:  # cramjam's DecompressionError: the row is damaged
        raise ValueError(f"damaged compressed row: {e}") from e

# SQLite primary result codes that mean "this file cannot be trusted".
_CORRUPT_CODES = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}

# Keep the WAL from growing without bound after a burst (it is reused, not shrunk,
# below this size).
_JOURNAL_SIZE_LIMIT = 64 * 2**20

# Rows per statement: one statement is one transaction and one GIL hand-off (see
# ``_write``). Each statement must also stay within the build's bound-variable limit,
# read at open: 32766 since SQLite 3.32, but 999 before (RHEL 8 ships 3.26), where a
# round of 1000 appends (7 variables a row) or 10000 deletes would fail every time.
_MAX_APPENDS_PER_COMMIT = 1000
_MAX_DELETES_PER_COMMIT = 10000
_VARIABLES_PER_APPEND = 7

# A checkpoint copies the WAL into the database file and, unless synchronous is
# "off", fsyncs both: milliseconds to tens of milliseconds. SQLite runs it inside the
# commit that crosses its threshold, stalling every put waiting on that commit. So a
# second thread checkpoints (PASSIVE: writers carry on meanwhile) whenever this much
# was appended, and SQLite's own checkpoint stays only as a safety net at a larger
# WAL size (in 4 KiB pages), for when the background one cannot keep up.
_CHECKPOINT_EVERY_BYTES = 4 * 2**20
_INLINE_CHECKPOINT_PAGES = 16384


class QueueStorageError(Exception):
    """The queue's file cannot be used (raised by ``open``; the message names the path)."""


@dataclass(frozen=True)
class StoredBatch:
    """A row found in the file at open: everything but the payload."""

    id: int
    signal: str
    items: int
    nbytes: int
    enqueued: float


class SqliteStore:
    """The rows of one queue, in a SQLite file used from one dedicated thread."""

    # Test seam: when set, lowers the connection's bound-variable limit to this, as an
    # old SQLite build has it (``Connection.setlimit``).
    variable_limit: int | None = None

    def __init__(self, path: Path, synchronous: str, telemetry: ComponentTelemetry) -> None:
        self.path = path
        self._synchronous = synchronous.upper()
        self._tel = telemetry
        self._executor: ThreadPoolExecutor | None = None
        self._con: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        # Group commit: rows waiting for the next transaction, with their callers' futures.
        self._appends: list[tuple[tuple[str, int, float, bytes], asyncio.Future[int]]] = []
        self._deletes: list[int] = []
        self._writer: asyncio.Task[None] | None = None
        self._next_id = 1  # the id of the next appended row (ids give delivery order)
        # Rows per round, sized at open from the build's bound-variable limit.
        self._max_appends = _MAX_APPENDS_PER_COMMIT
        self._max_deletes = _MAX_DELETES_PER_COMMIT
        # Background checkpoints: their own thread and connection.
        self._ckpt_executor: ThreadPoolExecutor | None = None
        self._ckpt_con: sqlite3.Connection | None = None
        self._ckpt_task: asyncio.Task[None] | None = None
        self._appended_since_ckpt = 0

    # ----------------------------------------------------------------- lifecycle

    async def open(self) -> list[StoredBatch]:
        """Open (or create) the file and return the rows it holds, oldest first.

        Raises ``QueueStorageError`` naming the path when the directory or file cannot
        be written, or when another owner holds the file.
        """
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"queue-{self.path.stem}")
        try:
            return await self._call(self._open)
        except BaseException:
            self._shutdown_thread()
            raise

    async def close(self) -> None:
        """Commit what is pending (deletes of delivered batches), close, release the file."""
        if self._executor is None:
            return
        if self._writer is not None:
            await asyncio.shield(self._writer)
        if self._deletes:
            await self._write_pending()
        if self._ckpt_task is not None:
            await asyncio.shield(self._ckpt_task)
        with contextlib.suppress(sqlite3.Error):
            await self._call(self._close)
        self._shutdown_thread()

    # ----------------------------------------------------------------- operations

    def append(self, signal: str, items: int, enqueued: float, data: bytes) -> asyncio.Future[int]:
        """Queue a row for the next commit; the future gives its id once committed.

        The future fails with ``sqlite3.Error`` when the commit does (the row is then
        not stored). It resolves even if the caller stops waiting for it.
        """
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._appends.append(((signal, items, enqueued, data), fut))
        self._kick()
        return fut

    def delete(self, row_id: int) -> None:
        """Delete a row with the next commit (a crash before then re-delivers it)."""
        self._deletes.append(row_id)
        self._kick()

    async def load(self, row_id: int) -> bytes | None:
        """The payload of a row, or None when it is gone."""
        return await self._call(self._load, row_id)

    # ----------------------------------------------------------------- group commit

    def _kick(self) -> None:
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_pending())

    async def _write_pending(self) -> None:
        """Commit everything pending, one round at a time, until nothing is left."""
        while self._appends or self._deletes:
            appends = self._appends[:self._max_appends]
            del self._appends[:self._max_appends]
            deletes = self._deletes[:self._max_deletes]
            del self._deletes[:self._max_deletes]
            first_id = self._next_id
            self._next_id += len(appends)
            try:
                append_error, delete_error = await self._call(
                    self._write, first_id, [row for row, _ in appends], deletes)
            except sqlite3.Error as e:  # closed under us: fail the round as a whole
                append_error = delete_error = e
            for i, (_, fut) in enumerate(appends):
                if fut.done():
                    continue
                if append_error is None:
                    fut.set_result(first_id + i)
                else:
                    fut.set_exception(append_error)
            if delete_error is not None:
                # Delivered rows must still go; a later commit retries their deletes.
                self._deletes[:0] = deletes
            if append_error is None:
                self._appended_since_ckpt += sum(len(row[3]) for row, _ in appends)
                if self._appended_since_ckpt >= _CHECKPOINT_EVERY_BYTES and (
                        self._ckpt_task is None or self._ckpt_task.done()):
                    self._appended_since_ckpt = 0
                    self._ckpt_task = asyncio.get_running_loop().create_task(self._checkpoint())
            if (append_error or delete_error) and not self._appends:
                return  # nothing new to try: do not spin on a full disk

    async def _checkpoint(self) -> None:
        """Checkpoint the WAL from the checkpoint thread; a failure waits for the next one."""
        if self._ckpt_executor is None:
            self._ckpt_executor = ThreadPoolExecutor(
                1, thread_name_prefix=f"queue-{self.path.stem}-ckpt")
        with contextlib.suppress(sqlite3.Error):
            await asyncio.get_running_loop().run_in_executor(self._ckpt_executor,
                                                             self._checkpoint_sync)

    # ----------------------------------------------------------------- thread side

    async def _call(self, fn: Any, *args: Any) -> Any:
        if self._executor is None:
            raise sqlite3.OperationalError("queue store is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _shutdown_thread(self) -> None:
        # Blocks the loop at most for a write or checkpoint in progress: a shutdown path.
        ckpt, self._ckpt_executor = self._ckpt_executor, None
        if ckpt is not None:
            ckpt.submit(self._close_checkpointer)
            ckpt.shutdown(wait=True)
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _open(self) -> list[StoredBatch]:
        directory = self.path.parent
        if not directory.parent.is_dir():
            raise QueueStorageError(f"state directory {directory.parent} does not exist "
                                    "(create it, or set service.state_dir)")
        try:
            directory.mkdir(exist_ok=True)
            lock_fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise QueueStorageError(f"cannot write queue directory {directory}: "
                                    f"{e.strerror or e}") from e
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock_fd)
            raise QueueStorageError(f"queue file {self.path} is in use by another sender "
                                    "(another agent on the same state directory?)") from None
        self._lock_fd = lock_fd
        try:
            return self._connect()
        except sqlite3.DatabaseError as e:
            # Our own integrity-check failure carries no code: it is corruption too.
            code = getattr(e, "sqlite_errorcode", sqlite3.SQLITE_CORRUPT) & 0xFF
            if code not in _CORRUPT_CODES:
                raise QueueStorageError(f"cannot open queue file {self.path}: {e}") from e
            self._quarantine(e)
        try:
            return self._connect()
        except sqlite3.Error as e:
            raise QueueStorageError(f"cannot open queue file {self.path}: {e}") from e

    def _connect(self) -> list[StoredBatch]:
        # Autocommit: every statement is its own transaction (see ``_write``).
        con = sqlite3.connect(self.path, isolation_level=None)
        try:
            if self.variable_limit is not None:
                con.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, self.variable_limit)
            variables = con.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
            self._max_appends = max(1, min(_MAX_APPENDS_PER_COMMIT,
                                           variables // _VARIABLES_PER_APPEND))
            self._max_deletes = max(1, min(_MAX_DELETES_PER_COMMIT, variables))
            con.execute("PRAGMA journal_mode=WAL")
            con.execute(f"PRAGMA synchronous={self._synchronous}")
            con.execute(f"PRAGMA journal_size_limit={_JOURNAL_SIZE_LIMIT}")
            con.execute(f"PRAGMA wal_autocheckpoint={_INLINE_CHECKPOINT_PAGES}")
            check = con.execute("PRAGMA quick_check").fetchall()
            if check != [("ok",)]:
                raise sqlite3.DatabaseError(f"integrity check failed: {check[:3]}")
            con.execute(_SCHEMA)
            rows = con.execute("SELECT id, signal, items, size, enqueued "
                               "FROM batches ORDER BY id").fetchall()
        except BaseException:
            con.close()
            raise
        self._con = con
        self._next_id = rows[-1][0] + 1 if rows else 1
        return [StoredBatch(*r) for r in rows]

    def _quarantine(self, error: sqlite3.Error) -> None:
        """Move a corrupt file (and its WAL) aside so that the queue can start empty."""
        suffix = f".corrupt-{int(time.time())}"
        for extra in ("", "-wal", "-shm"):
            src = Path(f"{self.path}{extra}")
            if src.exists():
                src.rename(f"{src}{suffix}")
        self._tel.error("queue file corrupt, moved aside; starting an empty queue",
                        path=str(self.path), moved_to=f"{self.path}{suffix}", error=str(error))

    def _write(self, first_id: int, rows: list[tuple[str, int, float, bytes]],
               deletes: list[int]) -> tuple[sqlite3.Error | None, sqlite3.Error | None]:
        """Delete then insert, each as ONE statement in autocommit mode.

        A single statement is atomic on its own, and it is one ``sqlite3_step``: the
        thread releases and retakes the GIL once, where BEGIN / per-row execute /
        COMMIT would retake it per call, each time waiting for the busy event loop
        thread to hand it over. Returns the errors of the insert and of the delete.
        """
        con = self._con
        assert con is not None
        delete_error = append_error = None
        if deletes:
            try:
                con.execute(f"DELETE FROM batches WHERE id IN ({','.join('?' * len(deletes))})",
                            deletes)
            except sqlite3.Error as e:
                delete_error = e
        if rows:
            params: list[object] = []
            for i, (signal, items, enqueued, data) in enumerate(rows):
                codec, stored = _encode(data)
                params.extend((first_id + i, signal, items, enqueued, len(data), codec, stored))
            try:
                con.execute("INSERT INTO batches (id, signal, items, enqueued, size, codec, data) "
                            "VALUES " + ",".join(["(?,?,?,?,?,?,?)"] * len(rows)), params)
            except sqlite3.Error as e:
                append_error = e
        return append_error, delete_error

    def _checkpoint_sync(self) -> None:
        if self._ckpt_con is None:
            self._ckpt_con = sqlite3.connect(self.path, isolation_level=None)
            self._ckpt_con.execute(f"PRAGMA synchronous={self._synchronous}")
        self._ckpt_con.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def _close_checkpointer(self) -> None:
        if self._ckpt_con is not None:
            self._ckpt_con.close()
            self._ckpt_con = None

    def _load(self, row_id: int) -> bytes | None:
        assert self._con is not None
        row = self._con.execute("SELECT codec, data FROM batches WHERE id = ?",
                                (row_id,)).fetchone()
        return None if row is None else _decode(row[0], row[1])

    def _close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None
