"""The agent as users run it: CLI process, sd_notify, SIGTERM drain, SIGHUP reload, state dir."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port

SPAN_JSON = {
    "resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "ranker"}}]},
        "scopeSpans": [{"spans": [{
            "traceId": "5b8efff798038103d269b633813fc60c",
            "spanId": "eee19b7ec3c1b174",
            "name": "predict", "kind": 2,
            "startTimeUnixNano": "1700000000000000000", "endTimeUnixNano": "1700000000500000000",
        }]}],
    }]
}


def config(tmp: Path, grpc: int, http: int, health: int, *, out: str = "out.jsonl",
           batch_timeout: str = "50ms", extra: str = "") -> str:
    return f"""
[receivers.otlp]
grpc.endpoint = "127.0.0.1:{grpc}"
http.endpoint = "127.0.0.1:{http}"
[processors.batch]
timeout = "{batch_timeout}"
send_batch_size = 100000
[exporters.file]
path = "{tmp / out}"
[service]
state_dir = "{tmp / 'state'}"
shutdown_timeout = "10s"
health.endpoint = "127.0.0.1:{health}"
[service.pipelines.traces]
receivers = ["otlp"]
processors = ["batch"]
exporters = ["file"]
{extra}
"""


def post_span(http: int, span_id: str = "eee19b7ec3c1b174", timeout: float = 30) -> int:
    body = json.loads(json.dumps(SPAN_JSON))
    body["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["spanId"] = span_id
    req = urllib.request.Request(f"http://127.0.0.1:{http}/v1/traces", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status


def span_ids_in(path: Path) -> list[str]:
    if not path.exists():
        return []
    ids = []
    for line in path.read_text().splitlines():
        for rs in json.loads(line).get("resourceSpans", []):
            for ss in rs.get("scopeSpans", []):
                ids.extend(s["spanId"] for s in ss.get("spans", []))
    return ids


def wait_for(pred, timeout: float = 15, what: str = "condition") -> None:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class NotifySocket:
    """A test NOTIFY_SOCKET that collects the agent's sd_notify datagrams."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        """Everything received so far (never blocks: the watchdog pings keep coming)."""
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.messages

    def wait_for(self, text: str, timeout: float = 20) -> None:
        wait_for(lambda: any(text in m for m in self.drain()), timeout, f"sd_notify {text!r}")


@pytest.fixture
def ports():
    return free_port(), free_port(), free_port()


def test_notify_ready_status_watchdog_and_stopping(tmp_path, ports, start_agent) -> None:
    grpc, http, health = ports
    ns = NotifySocket(tmp_path / "notify.sock")
    agent = start_agent(config(tmp_path, grpc, http, health),
                        env={"NOTIFY_SOCKET": str(ns.path), "WATCHDOG_USEC": "200000"})
    ns.wait_for("READY=1")
    assert any(m.startswith("READY=1") and "STATUS=running 1 pipelines" in m for m in ns.drain())
    ns.wait_for("WATCHDOG=1")
    with urllib.request.urlopen(f"http://127.0.0.1:{health}/status", timeout=5) as r:
        status = json.load(r)
    assert status["ready"] is True
    assert status["components"]["receivers.otlp"]["status"] == "ok"
    assert status["pipelines"]["traces"]["exporters"] == ["file"]
    listening = [r for r in agent.log_records() if r["msg"].startswith("mlagent running")]
    assert len(listening) == 1 and f"127.0.0.1:{grpc}" in listening[0]["msg"]
    assert agent.stop() == 0
    ns.wait_for("STOPPING=1")


class SlowUpstream:
    """An OTLP/HTTP JSON upstream that holds every request until ``release`` is set."""

    def __init__(self) -> None:
        import http.server

        self.release = threading.Event()
        self.span_ids: list[str] = []
        self.arrived = threading.Semaphore(0)
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.arrived.release()
                outer.release.wait(30)
                for rs in body.get("resourceSpans", []):
                    for ss in rs.get("scopeSpans", []):
                        outer.span_ids.extend(sp["spanId"] for sp in ss.get("spans", []))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()


def test_sigterm_drains_the_batch_processor(tmp_path, ports, start_agent) -> None:
    """A batch still held in the batch processor at SIGTERM is flushed and delivered,
    and its sender is acknowledged only then."""
    grpc, http, health = ports
    up = SlowUpstream()
    text = config(tmp_path, grpc, http, health, batch_timeout="1h").replace(
        f'[exporters.file]\npath = "{tmp_path / "out.jsonl"}"',
        f'[exporters.otlp]\nendpoint = "http://127.0.0.1:{up.port}"\nprotocol = "http/json"\n'
        'compression = "none"\nsending_queue.enabled = false').replace('exporters = ["file"]', 'exporters = ["otlp"]')
    text = text.replace("send_batch_size = 100000", "send_batch_size = 100000\nmax_in_flight = 1")
    agent = start_agent(text)
    agent.wait_ready(f"127.0.0.1:{health}")
    results: dict[str, object] = {}

    def send(span_id: str) -> None:
        try:
            results[span_id] = post_span(http, span_id)
        except Exception as e:  # pragma: no cover - reported below
            results[span_id] = e

    try:
        first = threading.Thread(target=send, args=("0000000000000001",))
        first.start()
        assert up.arrived.acquire(timeout=15)  # the first flush is held at the upstream
        second = threading.Thread(target=send, args=("0000000000000002",))
        second.start()
        time.sleep(0.5)  # the second request now waits in the batch processor
        assert first.is_alive() and second.is_alive()
        agent.signal(signal.SIGTERM)
        time.sleep(0.3)
        up.release.set()
        first.join(30)
        second.join(30)
        assert results == {"0000000000000001": 200, "0000000000000002": 200}
        assert agent.proc.wait(30) == 0
        assert sorted(up.span_ids) == ["0000000000000001", "0000000000000002"]
    finally:
        up.close()


async def test_components_drain_within_the_configured_shutdown_timeout(tmp_path, ports) -> None:
    """``service.shutdown_timeout`` reaches every component's host, so a memory queue
    (the file exporter's) drains for that long instead of a fixed 5 s."""
    from agent.component import Kind
    from agent.service import Agent, load

    (tmp_path / "state").mkdir()
    path = tmp_path / "agent.toml"
    path.write_text(config(tmp_path, *ports).replace('shutdown_timeout = "10s"',
                                                     'shutdown_timeout = "42s"'))
    agent = Agent(load(path), str(path), env={})
    await agent._start_graph(agent.config)
    try:
        assert agent.graph is not None
        assert agent.graph.host.shutdown_timeout == 42
        exporter = agent.graph.instances(Kind.EXPORTER)["exporter:file"]
        assert exporter.sender._drain_deadline == 42
    finally:
        assert agent.graph is not None
        await agent.graph.shutdown(5)


async def test_queue_files_no_exporter_owns_are_named_at_start_and_reload(
        tmp_path, ports, caplog) -> None:
    """A persistent exporter renamed from ``otlp/old``: its file still holds acknowledged
    batches that nothing sends. Start and reload say so, with how much it holds."""
    from agent.component import Kind, RetryableError
    from agent.queue import QueueConfig, QueuedSender, RetryConfig
    from agent.service import Agent, load
    from agent.telemetry import Telemetry
    from agent.testing import make_host, settings_for, span, trace_batch

    async def down(_batch) -> None:
        raise RetryableError("backend down", retry_after=10)

    state = tmp_path / "state"
    old = QueuedSender(settings_for("otlp/old", Kind.EXPORTER, Telemetry()),
                       QueueConfig(persistent=True), RetryConfig(max_elapsed_time=0), down)
    await old.start(make_host(state))
    for i in range(3):
        await old.put(trace_batch([span(f"s{i}"), span(f"t{i}")]))
    await old.shutdown(deadline=0.05)

    path = tmp_path / "agent.toml"
    path.write_text(config(tmp_path, *ports))
    agent = Agent(load(path), str(path), env={})

    def warnings() -> list[dict]:
        return [r.fields for r in caplog.records
                if r.levelname == "WARNING" and "no configured exporter owns" in r.getMessage()]

    await agent._start_graph(agent.config)
    try:
        (start,) = warnings()
        assert start["files"] == [{"path": str(state / "queues" / "otlp-old.db"),
                                   "exporter": "otlp/old", "batches": 3, "items": 6}]
        assert "reload" in start["hint"]
        assert await agent.reload()
        assert len(warnings()) == 2
    finally:
        assert agent.graph is not None
        await agent.graph.shutdown(5)


def test_sighup_with_broken_config_keeps_serving(tmp_path, ports, start_agent) -> None:
    grpc, http, health = ports
    ns = NotifySocket(tmp_path / "notify.sock")
    agent = start_agent(config(tmp_path, grpc, http, health), env={"NOTIFY_SOCKET": str(ns.path)})
    ns.wait_for("READY=1")
    agent.config_path.write_text(agent.config_path.read_text().replace("[processors.batch]",
                                                                       "[processors.batch]\nbogus = 1"))
    agent.signal(signal.SIGHUP)
    ns.wait_for("RELOADING=1")
    wait_for(lambda: any("reload refused" in r["msg"] for r in agent.log_records()),
             what="reload refused log")
    refused = next(r for r in agent.log_records() if "reload refused" in r["msg"])
    assert "processors.batch.bogus: unknown key" in refused["errors"]
    assert any("MONOTONIC_USEC=" in m for m in ns.drain() if "RELOADING=1" in m)
    assert post_span(http) == 200
    wait_for(lambda: span_ids_in(tmp_path / "out.jsonl") == ["eee19b7ec3c1b174"], what="span")
    assert agent.stop() == 0


def test_sighup_with_changed_pipeline_takes_effect(tmp_path, ports, start_agent) -> None:
    grpc, http, health = ports
    agent = start_agent(config(tmp_path, grpc, http, health))
    agent.wait_ready(f"127.0.0.1:{health}")
    assert post_span(http, "0000000000000001") == 200
    wait_for(lambda: span_ids_in(tmp_path / "out.jsonl") == ["0000000000000001"], what="first span")
    agent.config_path.write_text(config(tmp_path, grpc, http, health, out="new.jsonl"))
    agent.signal(signal.SIGHUP)
    wait_for(lambda: any(r["msg"] == "reloaded" for r in agent.log_records()), what="reloaded")
    agent.wait_ready(f"127.0.0.1:{health}")
    assert post_span(http, "0000000000000002") == 200
    wait_for(lambda: span_ids_in(tmp_path / "new.jsonl") == ["0000000000000002"], what="new file")
    assert span_ids_in(tmp_path / "out.jsonl") == ["0000000000000001"]
    assert agent.stop() == 0


def test_sighup_whose_new_config_cannot_start_restores_the_old_one(tmp_path, ports, start_agent) -> None:
    """A config that validates but cannot start (its port is taken) is rolled back."""
    grpc, http, health = ports
    agent = start_agent(config(tmp_path, grpc, http, health))
    agent.wait_ready(f"127.0.0.1:{health}")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        agent.config_path.write_text(config(tmp_path, grpc, busy, health, out="new.jsonl"))
        agent.signal(signal.SIGHUP)
        wait_for(lambda: any("restoring the previous one" in r["msg"] for r in agent.log_records()),
                 what="rollback")
    agent.wait_ready(f"127.0.0.1:{health}")
    assert post_span(http) == 200
    wait_for(lambda: span_ids_in(tmp_path / "out.jsonl") == ["eee19b7ec3c1b174"], what="old pipeline")
    assert agent.stop() == 0


def test_unusable_state_dir_refuses_to_start(tmp_path, ports, start_agent) -> None:
    grpc, http, health = ports
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the state directory should be")
    text = config(tmp_path, grpc, http, health).replace(f'"{tmp_path / "state"}"',
                                                       f'"{blocker / "state"}"')
    agent = start_agent(text)
    assert agent.proc.wait(30) == 1
    assert f"state directory {blocker / 'state'} is not usable" in agent.log()


def test_second_agent_on_same_state_dir_is_refused(tmp_path, ports, start_agent) -> None:
    grpc, http, health = ports
    first = start_agent(config(tmp_path, grpc, http, health), name="first")
    first.wait_ready(f"127.0.0.1:{health}")
    second = start_agent(config(tmp_path, free_port(), free_port(), free_port()), name="second")
    assert second.proc.wait(30) == 1
    assert "in use by another mlagent" in second.log()


def test_invalid_config_exits_1_with_every_error(tmp_path, ports, start_agent) -> None:
    agent = start_agent("[exporters.file]\npaht = 'x'\n")
    assert agent.proc.wait(30) == 1
    log = agent.log()
    assert "exporters.file.paht: unknown key (did you mean 'path'?)" in log
    assert "service.pipelines: at least one pipeline is required" in log


def test_port_in_use_is_a_clear_startup_error(tmp_path, ports, start_agent) -> None:
    grpc, http, health = ports
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        s.bind(("127.0.0.1", http))
        s.listen()
        agent = start_agent(config(tmp_path, grpc, http, health))
        assert agent.proc.wait(30) == 1
    assert "receivers.otlp" in agent.log() and str(http) in agent.log()


@pytest.mark.skipif(not os.path.exists("/usr/bin/systemd-analyze"), reason="no systemd-analyze")
def test_systemd_unit_verifies(tmp_path) -> None:
    import shutil
    import subprocess

    unit = (Path(__file__).parent.parent / "systemd" / "mlagent.service").read_text()
    exe = shutil.which("mlagent")
    assert exe, "mlagent console script not installed"
    (tmp_path / "mlagent.service").write_text(unit.replace("/usr/local/bin/mlagent", exe))
    r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "mlagent.service")],
                       capture_output=True, text=True)
    problems = [line for line in (r.stdout + r.stderr).splitlines()
                if "mlagent.service" in line]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr
