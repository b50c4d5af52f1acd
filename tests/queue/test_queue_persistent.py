"""The persistent (SQLite) sending queue: restarts, SIGKILL, corruption, full disks."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from agent.component import Host, Kind, PermanentError, RetryableError, Signal
from agent.pdata import batch_from_bytes
from agent.queue import QueueConfig, QueuedSender, QueueStorageError
from agent.queue.store import SqliteStore
from agent.telemetry import Telemetry
from agent.testing import make_host, settings_for
from tests.queue.queue_doubles import FAST_RETRY, Backend, batch, names

PERSISTENT = QueueConfig(persistent=True, consumers=2)


def make_sender(backend: Backend, *, queue: QueueConfig = PERSISTENT, cid: str = "otlp/up",
                tel: Telemetry | None = None, name: str = "") -> tuple[QueuedSender, Telemetry]:
    tel = tel or Telemetry()
    return QueuedSender(settings_for(cid, Kind.EXPORTER, tel), queue, FAST_RETRY, backend.send,
                        name=name), tel


def db_path(state: Path) -> Path:
    return state / "queues" / "otlp-up.db"


def rows_in(state: Path) -> int:
    con = sqlite3.connect(db_path(state))
    try:
        return con.execute("SELECT count(*) FROM batches").fetchone()[0]
    finally:
        con.close()


async def test_queued_batches_survive_a_restart_and_are_delivered_once(tmp_path):
    down = Backend()
    down.down = True
    sender, _ = make_sender(down)
    await sender.start(make_host(tmp_path))
    for i in range(25):
        await sender.put(batch(f"b{i}", spans=2))
    await sender.shutdown(deadline=0.05)
    assert down.received == []
    assert rows_in(tmp_path) == 25

    up = Backend()
    sender, tel = make_sender(up)
    await sender.start(make_host(tmp_path))
    assert tel.snapshot("otlp/up")["mlagent_agent_queue_size{signal=traces}"] > 0
    await up.wait_for(25)
    await sender.shutdown()
    assert sorted(names(up.received)) == sorted(f"b{i}" for i in range(25))
    assert rows_in(tmp_path) == 0

    # A third start finds nothing left to send.
    again = Backend()
    sender, _ = make_sender(again)
    await sender.start(make_host(tmp_path))
    await asyncio.sleep(0.05)
    await sender.shutdown()
    assert again.calls == 0


async def test_every_acknowledged_batch_survives_sigkill(tmp_path):
    child = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("killed_child.py")), str(tmp_path)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])
    acked: set[str] = set()
    sent_by_child: set[str] = set()
    try:
        assert child.stdout is not None
        for line in child.stdout:
            kind, n = line.split()
            (acked if kind == "A" else sent_by_child).add(n)
            if len(acked) >= 150:
                break
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    # Lines written before the kill but not yet read count as well.
    for line in child.stdout.read().splitlines():
        if line.count(" ") == 1:
            kind, n = line.split()
            (acked if kind == "A" else sent_by_child).add(n)
    assert len(acked) >= 150

    up = Backend()
    sender, _ = make_sender(up)
    await sender.start(make_host(tmp_path))
    async with asyncio.timeout(10):
        while not acked <= sent_by_child | set(names(up.received)):
            await asyncio.sleep(0.01)
    await sender.shutdown()
    missing = acked - sent_by_child - set(names(up.received))
    assert not missing


async def test_corrupt_queue_file_is_quarantined_and_a_fresh_queue_starts(tmp_path):
    (tmp_path / "queues").mkdir()
    garbage = os.urandom(8192)
    db_path(tmp_path).write_bytes(garbage)
    up = Backend()
    sender, _ = make_sender(up)
    await sender.start(make_host(tmp_path))
    await sender.put(batch("after"))
    await up.wait_for(1)
    await sender.shutdown()
    moved = list((tmp_path / "queues").glob("otlp-up.db.corrupt-*"))
    assert len(moved) == 1
    assert moved[0].read_bytes() == garbage  # kept for a post-mortem


async def test_rows_are_stored_compressed_and_restored_intact(tmp_path):
    down = Backend()
    down.down = True
    sender, _ = make_sender(down)
    await sender.start(make_host(tmp_path))
    original = batch("big", spans=200)
    await sender.put(original)
    await sender.shutdown(deadline=0.05)
    con = sqlite3.connect(db_path(tmp_path))
    ((codec, size, stored),) = con.execute("SELECT codec, size, length(data) FROM batches")
    con.close()
    assert codec == 1 and size == len(original.to_bytes()) and stored < size / 2

    up = Backend()
    sender, _ = make_sender(up)
    await sender.start(make_host(tmp_path))
    await up.wait_for(1)
    await sender.shutdown()
    assert up.received[0].to_bytes() == original.to_bytes()


async def test_unreadable_row_is_dropped_and_counted_and_the_rest_delivered(tmp_path):
    down = Backend()
    down.down = True
    sender, _ = make_sender(down)
    await sender.start(make_host(tmp_path))
    for i in range(3):
        await sender.put(batch(f"b{i}", spans=2))
    await sender.shutdown(deadline=0.05)
    con = sqlite3.connect(db_path(tmp_path))
    with con:
        # Damaged on disk: not a valid compressed block any more.
        con.execute("UPDATE batches SET data = x'ffffffff' WHERE id = (SELECT min(id) FROM batches)")
    con.close()

    up = Backend()
    sender, tel = make_sender(up)
    await sender.start(make_host(tmp_path))
    await up.wait_for(2)
    await sender.shutdown()
    assert sorted(names(up.received)) == ["b1", "b2"]
    assert tel.snapshot("otlp/up")[
        "mlagent_agent_dropped_items_total{reason=corrupt,signal=traces}"] == 2
    assert rows_in(tmp_path) == 0


async def test_missing_state_directory_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope"
    sender, _ = make_sender(Backend())
    with pytest.raises(QueueStorageError, match=str(missing)):
        await sender.start(Host(state_dir=missing))
    await sender.shutdown()


async def test_unwritable_state_directory_is_a_clear_error(tmp_path):
    if os.geteuid() == 0:
        # Root ignores permissions: use a read-only tmpfs, mounted outside pytest's
        # tmp_path (whose clean-up renames old directories, mounts included).
        state = Path(tempfile.mkdtemp(prefix="mlagent-ro-state-"))
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(state)],
                          capture_output=True).returncode:
            state.rmdir()
            pytest.skip("cannot mount a read-only tmpfs")
    else:
        state = tmp_path / "state"
        state.mkdir()
        state.chmod(0o500)
    try:
        sender, _ = make_sender(Backend())
        with pytest.raises(QueueStorageError, match=str(state / "queues")):
            await sender.start(make_host(state))
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", "-l", str(state)], check=True)
            state.rmdir()
        else:
            state.chmod(0o700)


async def test_second_sender_on_the_same_file_is_refused(tmp_path):
    first, _ = make_sender(Backend())
    await first.start(make_host(tmp_path))
    second, _ = make_sender(Backend())
    with pytest.raises(QueueStorageError, match="in use"):
        await second.start(make_host(tmp_path))
    # Several queues of one component are told apart by name.
    third, _ = make_sender(Backend(), name="logs")
    await third.start(make_host(tmp_path))
    await third.shutdown()
    await first.shutdown()


@pytest.fixture
def tiny_disk():
    """A 1 MiB tmpfs as state directory (needs root to mount).

    Mounted outside pytest's tmp_path, whose clean-up renames old directories and
    would leave a mount behind under a new name.
    """
    state = Path(tempfile.mkdtemp(prefix="mlagent-tiny-disk-"))
    if os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(state)],
            capture_output=True).returncode:
        state.rmdir()
        pytest.skip("cannot mount a tmpfs (needs root)")
    yield state
    subprocess.run(["umount", "-l", str(state)], check=True)
    state.rmdir()


@pytest.fixture
def small_file_limit(monkeypatch):
    """Cap every queue file at 64 pages (256 KiB): SQLite then fails writes with
    SQLITE_FULL, exactly as on a full disk (works without root)."""
    connect = SqliteStore._connect

    def capped(self):
        rows = connect(self)
        self._con.execute("PRAGMA max_page_count = 64")
        return rows

    monkeypatch.setattr(SqliteStore, "_connect", capped)


async def fill_until_refused(state: Path) -> tuple[list[str], Telemetry]:
    """Put padded batches with the backend down until a put is refused."""
    down = Backend()
    down.down = True
    tel = Telemetry()
    sender, _ = make_sender(down, tel=tel, queue=QueueConfig(persistent=True, consumers=1,
                                                              max_bytes=2**30))
    await sender.start(make_host(state))
    acked = []
    with pytest.raises(RetryableError):
        for i in range(10_000):  # ~2 KB each: the space runs out long before
            b = batch(f"b{i}", spans=1)
            b.request.resource_spans[0].scope_spans[0].spans[0].attributes.add(
                key="pad").value.string_value = uuid.uuid4().hex * 64
            await sender.put(b)
            acked.append(f"b{i}")
    assert acked
    assert tel.snapshot("otlp/up")[
        "mlagent_agent_refused_items_total{reason=disk_full,signal=traces}"] == 1
    await sender.shutdown(deadline=0.05)
    return acked, tel


async def test_full_disk_refuses_with_retryable_error_and_keeps_what_is_queued(tiny_disk):
    acked, _ = await fill_until_refused(tiny_disk)
    up = Backend()
    sender, _ = make_sender(up)
    await sender.start(make_host(tiny_disk))
    await up.wait_for(len(acked))
    await sender.shutdown()
    assert sorted(names(up.received)) == sorted(acked)


async def test_full_file_refuses_then_accepts_again_once_delivered(tmp_path, small_file_limit):
    acked, _ = await fill_until_refused(tmp_path)
    up = Backend()
    sender, _ = make_sender(up)
    await sender.start(make_host(tmp_path))
    await up.wait_for(len(acked))
    assert sorted(names(up.received)) == sorted(acked)
    await sender.put(batch("after"))  # delivered rows freed their pages
    await up.wait_for(len(acked) + 1)
    await sender.shutdown()


@pytest.fixture
def old_sqlite(monkeypatch):
    """SQLite before 3.32 (RHEL 8's 3.26): at most 999 variables in one statement."""
    monkeypatch.setattr(SqliteStore, "variable_limit", 999)


async def test_a_burst_is_taken_on_an_sqlite_limited_to_999_variables(tmp_path, old_sqlite):
    down = Backend()
    down.down = True
    sender, tel = make_sender(down)
    await sender.start(make_host(tmp_path))
    # 300 puts at once (many receivers' requests): one commit round, 2100 variables.
    await asyncio.gather(*(sender.put(batch(f"b{i}")) for i in range(300)))
    await sender.shutdown(deadline=0.05)
    assert rows_in(tmp_path) == 300
    assert not any(k.startswith("mlagent_agent_refused") and v
                   for k, v in tel.snapshot("otlp/up").items())


async def test_deletes_held_back_by_a_full_disk_catch_up_on_an_old_sqlite(
        tmp_path, old_sqlite, monkeypatch):
    """Deletes that piled up while they failed go in rounds the build accepts."""
    down = Backend()
    down.down = True
    sender, _ = make_sender(down)
    await sender.start(make_host(tmp_path))
    for k in range(12):
        await asyncio.gather(*(sender.put(batch(f"b{k}-{i}")) for i in range(100)))
    await sender.shutdown(deadline=0.05)

    disk_full = True
    write = SqliteStore._write

    def failing_deletes(self, first_id, rows, deletes):
        if disk_full and deletes:
            return write(self, first_id, rows, [])[0], sqlite3.OperationalError(
                "database or disk is full")
        return write(self, first_id, rows, deletes)

    monkeypatch.setattr(SqliteStore, "_write", failing_deletes)
    up = Backend()
    sender, _ = make_sender(up)
    await sender.start(make_host(tmp_path))
    await up.wait_for(1100, timeout=20)
    disk_full = False  # space is back while the backlog still drains
    await up.wait_for(1200, timeout=20)
    await sender.shutdown()
    assert rows_in(tmp_path) == 0  # nothing left to be sent again at the next start


async def test_only_files_no_running_sender_owns_and_that_hold_batches_are_named(tmp_path):
    from agent.queue.stranded import warn_stranded_queue_files

    down = Backend()
    down.down = True
    for cid, n in (("otlp/old", 2), ("otlp/emptied", 0)):
        stale, _ = make_sender(down, cid=cid)
        await stale.start(make_host(tmp_path))
        for i in range(n):
            await stale.put(batch(f"{cid}-{i}"))
        await stale.shutdown(deadline=0.05)
    host = make_host(tmp_path)
    running, _ = make_sender(down)  # otlp/up, with a batch of its own
    await running.start(host)
    await running.put(batch("mine"))
    try:
        stranded = await warn_stranded_queue_files(host)
    finally:
        await running.shutdown(deadline=0.05)
    assert [(f.path.name, f.exporter, f.rows, f.items) for f in stranded] == [
        ("otlp-old.db", "otlp/old", 2, 2)]


async def test_put_returns_only_after_its_row_is_committed(tmp_path):
    down = Backend()
    down.down = True
    sender, _ = make_sender(down)
    await sender.start(make_host(tmp_path))
    for i in range(1, 4):
        await sender.put(batch(f"c{i}"))
        # Read by another connection right away: the acknowledged row is there.
        assert rows_in(tmp_path) == i
    # Concurrent puts share commits and are all acknowledged.
    await asyncio.gather(*(sender.put(batch(f"g{i}")) for i in range(200)))
    assert rows_in(tmp_path) == 203
    await sender.shutdown(deadline=0.05)


async def test_restored_batches_go_through_a_custom_decoder(tmp_path):
    down = Backend()
    down.down = True
    sender, _ = make_sender(down)
    await sender.start(make_host(tmp_path))
    await sender.put(batch("custom"))
    await sender.shutdown(deadline=0.05)

    decoded = []

    def decode(sig, data):
        decoded.append(sig)
        return batch_from_bytes(sig, data)

    up = Backend()
    sender = QueuedSender(settings_for("otlp/up", Kind.EXPORTER), PERSISTENT, FAST_RETRY,
                          up.send, decode=decode)
    await sender.start(make_host(tmp_path))
    await up.wait_for(1)
    await sender.shutdown()
    assert decoded == [Signal.TRACES]
    assert names(up.received) == ["custom"]


async def test_dropped_batches_are_deleted_and_not_sent_again(tmp_path):
    failing = Backend()
    failing.errors = [PermanentError("never")]
    sender, tel = make_sender(failing, queue=QueueConfig(persistent=True, consumers=1))
    await sender.start(make_host(tmp_path))
    await sender.put(batch("bad"))
    await sender.put(batch("good"))
    await failing.wait_for(1)
    await sender.shutdown()
    assert rows_in(tmp_path) == 0
    assert tel.snapshot("otlp/up")[
        "mlagent_agent_dropped_items_total{reason=permanent_error,signal=traces}"] == 1


async def test_oldest_age_grows_while_the_backend_is_down(tmp_path):
    down = Backend()
    down.down = True
    sender, tel = make_sender(down)
    await sender.start(make_host(tmp_path))
    await sender.put(batch("stuck"))
    async with asyncio.timeout(5):
        while tel.snapshot("otlp/up").get("mlagent_agent_retries_total{signal=traces}", 0) < 3:
            await asyncio.sleep(0.005)
    snap = tel.snapshot("otlp/up")
    assert snap["mlagent_agent_queue_oldest_age_seconds{signal=traces}"] > 0
    assert snap["mlagent_agent_queue_size{signal=traces}"] == 1
    await sender.shutdown(deadline=0.05)


async def test_cancelled_shutdown_still_releases_the_file_for_a_reload(tmp_path):
    hanging = Backend()
    hanging.gate = asyncio.Event()  # the send in flight never finishes
    sender, _ = make_sender(hanging)
    await sender.start(make_host(tmp_path))
    await sender.put(batch("in-flight"))
    stopping = asyncio.create_task(sender.shutdown(deadline=60))
    await asyncio.sleep(0.05)
    stopping.cancel()  # the graph's own shutdown deadline passed
    with pytest.raises(asyncio.CancelledError):
        await stopping

    up = Backend()
    sender, _ = make_sender(up)
    await sender.start(make_host(tmp_path))  # the reloaded graph opens the same file
    await up.wait_for(1)
    await sender.shutdown()
    assert names(up.received) == ["in-flight"]
