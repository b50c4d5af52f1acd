"""Lifecycle: load -> build graph -> start -> serve signals -> stop. And sd_notify.

``Agent.run`` is the whole life of the daemon. Only the CLI turns its outcome into
an exit status: after start-up nothing here exits the process.

- SIGTERM / SIGINT: stop intake, flush, drain within ``service.shutdown_timeout``,
  then return 0 (names what had to be cancelled, if anything).
- SIGHUP: re-read the config. An invalid one is logged with every error and the
  running graph keeps serving. A valid one replaces the graph: the old graph drains
  completely into its exporters (persistent queues keep what they hold), then the
  new one starts. Senders see a short refusal window (connection refused), which
  the OTel SDKs retry; nothing that was acknowledged is lost. A new graph that fails
  to start is replaced by the previous config again; if that fails too, the agent
  stops with status 1 (systemd's Restart=on-failure then restarts it).
- systemd ``Type=notify``: READY=1 once listeners are bound; RELOADING=1 +
  MONOTONIC_USEC around reloads; STOPPING=1; STATUS= text; WATCHDOG=1 every
  WATCHDOG_USEC/2 while no request into the pipeline has been stuck longer than
  ``service.watchdog_stall``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web

from agent.component import Host, Kind, cancel_tasks
from agent.config import AgentConfig, ConfigError, load_config, load_config_file, split_endpoint
from agent.graph import Graph, StartError
from agent.queue.stranded import warn_stranded_queue_files
from agent.registry import factories
from agent.telemetry import Telemetry, log, setup_logging

DEFAULT_CONFIG_RESOURCE = "default_config.toml"


def default_config_text() -> str:
    """The embedded default config (``config/agent.toml`` in the source tree)."""
    return resources.files("agent").joinpath(DEFAULT_CONFIG_RESOURCE).read_text(encoding="utf-8")


def load(path: str | os.PathLike[str] | None) -> AgentConfig:
    """The config at ``path``, or the embedded default. Raises ``ConfigError``."""
    if path is None:
        return load_config(default_config_text(), factories(), source="<embedded default>")
    return load_config_file(path, factories())


# ----------------------------------------------------------------------------- state dir


class StateDirError(Exception):
    """The state directory cannot be used; the message says which path and why."""


def resolve_state_dir(config: AgentConfig | None,
                      env: Mapping[str, str] | None = None) -> Path:
    """``$STATE_DIRECTORY`` (systemd), else ``service.state_dir``, else the XDG state dir.

    The ``reference`` commands call it without a config to find a running agent's
    default state directory.
    """
    env = os.environ if env is None else env
    if env.get("STATE_DIRECTORY"):
        return Path(env["STATE_DIRECTORY"].split(":")[0])
    if config is not None and config.service.state_dir is not None:
        return Path(config.service.state_dir)
    base = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "mlagent"


def prepare_state_dir(path: Path) -> Any:
    """Create ``path`` if missing, prove it writable, and lock it against a second agent.

    Returns the open lock file (keep it open for the agent's lifetime).
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise StateDirError(f"state directory {path} is not usable: {e.strerror or e} "
                            "(set service.state_dir, or run under systemd with "
                            "StateDirectory=mlagent)") from None
    lock = open(path / "agent.lock", "a+")  # noqa: SIM115 -- held for the agent's lifetime
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise StateDirError(f"state directory {path} is in use by another mlagent "
                            "(each agent needs its own state_dir)") from None
    return lock


# ----------------------------------------------------------------------------- sd_notify


class Notifier:
    """sd_notify without libsystemd: datagrams to ``$NOTIFY_SOCKET``. No-op without it."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        self.address = ("\0" + addr[1:]) if addr.startswith("@") else addr
        self._sock: socket.socket | None = None
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        self.watchdog_interval: float | None = None
        if usec and usec.isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1e6 / 2

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *lines: str) -> None:
        if not self.address:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as e:  # systemd gone or socket misconfigured: say so, keep running
            log(logging.WARNING, "sd_notify failed", error=str(e), socket=self.address)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def preflight(config: AgentConfig) -> list[str]:
    """Errors of the checks that need I/O (see ``Factory``), as ``section.id: error``."""
    errors = []
    for path, component in config.components.items():
        check = getattr(component.factory, "preflight", None)
        if check is not None:
            errors += [f"{path}: {e}" for e in check(component.config)]
    return errors


# ----------------------------------------------------------------------------- the agent


class Agent:
    """The daemon: one config, one graph at a time, the health endpoint, signals."""

    def __init__(self, config: AgentConfig, config_path: str | None,
                 env: dict[str, str] | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.env = dict(os.environ) if env is None else env
        self.telemetry = Telemetry()
        self.notifier = Notifier(self.env)
        self.state_dir = resolve_state_dir(config, self.env)
        self.graph: Graph | None = None
        self._stop = asyncio.Event()
        self._reload_requested = asyncio.Event()
        self._health: web.AppRunner | None = None
        self._lock: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        # Held while a reload swaps the graph, so a SIGTERM meanwhile waits for the
        # swap instead of cancelling a drain halfway.
        self._swap = asyncio.Lock()
        self.reloads = 0
        self._exit_status = 0  # 1 once a reload could not restore the previous config

    # ---------------------------------------------------------------- running

    async def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT, stop. Returns the process exit status."""
        # Handlers first: a SIGTERM during start-up still stops cleanly, and a SIGHUP
        # then is served once the graph runs.
        loop = asyncio.get_running_loop()
        for sig, handler in ((signal.SIGTERM, self._stop.set), (signal.SIGINT, self._stop.set),
                             (signal.SIGHUP, self._reload_requested.set)):
            loop.add_signal_handler(sig, handler)
        try:
            self._lock = prepare_state_dir(self.state_dir)
            await self._start_graph(self.config)
            await self._start_health()
        except (StateDirError, StartError, ConfigError, OSError) as e:
            log(logging.ERROR, f"cannot start: {e}")
            await self._stop_all()
            return 1
        self._announce()
        self.notifier.send("READY=1", f"STATUS={self._status_line()}")
        self._tasks = [asyncio.create_task(self._reload_loop(), name="reload")]
        if self.notifier.watchdog_interval:
            self._tasks.append(asyncio.create_task(self._watchdog(), name="watchdog"))
        await self._stop.wait()

        self.notifier.send("STOPPING=1", "STATUS=draining")
        log(logging.INFO, "stopping: draining pipelines",
            deadline_s=self.config.service.shutdown_timeout)
        # A second SIGTERM (systemd's stop after a timeout, an impatient script) must not
        # kill the drain halfway; SIGKILL remains the way to stop without draining.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, lambda: log(logging.INFO, "already stopping"))
        async with self._swap:
            await cancel_tasks(*self._tasks)
        cancelled = await self._stop_all()
        log(logging.INFO, "stopped", cancelled=cancelled)
        return self._exit_status

    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        self._reload_requested.set()

    async def _start_graph(self, config: AgentConfig) -> None:
        host = Host(state_dir=self.state_dir, shutdown_timeout=config.service.shutdown_timeout)
        graph = Graph(config, self.telemetry, host)
        self.graph = graph
        await graph.start()
        # A renamed or removed persistent exporter leaves its queue file unsent.
        await warn_stranded_queue_files(host)

    async def _stop_all(self) -> list[str]:
        cancelled: list[str] = []
        if self.graph is not None:
            cancelled = await self.graph.shutdown(self.config.service.shutdown_timeout)
            if cancelled:
                log(logging.WARNING, "drain deadline passed; cancelled shutdown of components",
                    components=cancelled)
        if self._health is not None:
            await self._health.cleanup()
            self._health = None
        self.notifier.close()
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        return cancelled

    # ---------------------------------------------------------------- reload

    async def _reload_loop(self) -> None:
        while True:
            await self._reload_requested.wait()
            self._reload_requested.clear()
            async with self._swap:
                try:
                    await self.reload()
                except Exception as e:  # the loop must serve the next SIGHUP whatever happened
                    log(logging.ERROR, "reload failed unexpectedly", error=repr(e))

    async def reload(self) -> bool:
        """Re-read the config file and swap the graph. Returns whether the new config runs."""
        self.notifier.send("RELOADING=1", f"MONOTONIC_USEC={_monotonic_usec()}",
                           "STATUS=reloading")
        try:
            new = load(self.config_path)
        except ConfigError as e:
            log(logging.ERROR, "reload refused: the new config is invalid; "
                "the running config stays", source=e.source, errors=e.errors)
            self.notifier.send("READY=1", f"STATUS={self._status_line()} (last reload refused)")
            return False
        problems = await asyncio.to_thread(preflight, new)
        if problems:
            log(logging.ERROR, "reload refused: the new config cannot start; "
                "the running config stays", source=new.source, errors=problems)
            self.notifier.send("READY=1", f"STATUS={self._status_line()} (last reload refused)")
            return False
        if resolve_state_dir(new, self.env) != self.state_dir:
            log(logging.WARNING, "reload: a new state directory takes effect on restart only",
                state_dir=str(self.state_dir))
        old = self.config
        assert self.graph is not None
        cancelled = await self.graph.shutdown(old.service.shutdown_timeout)
        if cancelled:
            log(logging.WARNING, "reload: drain deadline passed", components=cancelled)
        ok = True
        try:
            await self._start_graph(new)
            self.config = new
        except Exception as e:
            ok = False
            log(logging.ERROR, "reload failed to start the new config; restoring the previous one",
                error=str(e))
            try:
                await self._start_graph(old)
            except Exception as e2:
                # Serving nothing while looking alive is the worst outcome: stop, with
                # status 1, so that the service manager restarts the agent and says so.
                log(logging.ERROR, "could not restore the previous config either; stopping "
                    "with status 1", error=str(e2))
                self._exit_status = 1
                self._stop.set()
                return False
        self.reloads += 1
        if ok:
            log(logging.INFO, "reloaded", source=new.source, pipelines=sorted(new.pipelines))
        self.notifier.send("READY=1", f"STATUS={self._status_line()}")
        return ok

    # ---------------------------------------------------------------- watchdog

    async def _watchdog(self) -> None:
        assert self.notifier.watchdog_interval is not None
        while True:
            await asyncio.sleep(self.notifier.watchdog_interval)
            graph = self.graph
            stuck = graph.oldest_inflight_age() if graph is not None else 0.0
            if stuck > self.config.service.watchdog_stall:
                log(logging.ERROR, "watchdog: a request has been stuck in the pipeline; "
                    "withholding WATCHDOG=1", stuck_s=round(stuck, 1))
                continue
            self.notifier.send("WATCHDOG=1")

    # ---------------------------------------------------------------- health

    async def _start_health(self) -> None:
        hc = self.config.service.health
        if not hc.enabled:
            return
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/status", self._status)
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        host, port = split_endpoint(hc.endpoint)
        site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise StartError(f"service.health: cannot listen on {hc.endpoint}: "
                             f"{e.strerror or e}") from None
        self._health = runner

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def _readyz(self, _: web.Request) -> web.Response:
        ready = self.graph is not None and self.graph.ready
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def _status(self, _: web.Request) -> web.Response:
        body: dict[str, Any] = (self.graph.status() if self.graph is not None
                                else {"ready": False})
        body["config"] = self.config.source
        body["state_dir"] = str(self.state_dir)
        body["reloads"] = self.reloads
        return web.Response(text=json.dumps(body, indent=2, default=str),
                            content_type="application/json")

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=self.telemetry.exposition(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    # ---------------------------------------------------------------- announcing

    def listening(self) -> dict[str, list[str]]:
        """Where the agent listens, by component: every ``endpoint`` in receiver and
        exporter configs that serve (receivers, the prometheus exporter), plus health."""
        out: dict[str, list[str]] = {}
        for key, cc in self.config.components.items():
            if cc.kind is Kind.RECEIVER or cc.type == "prometheus":
                eps = list(_endpoints(cc.config))
                if eps:
                    out[key] = eps
        if self.config.service.health.enabled:
            out["service.health"] = [self.config.service.health.endpoint]
        return out

    def _announce(self) -> None:
        where = self.listening()
        text = "; ".join(f"{k} on {', '.join(v)}" for k, v in where.items())
        log(logging.INFO, f"mlagent running: {text}", listening=where, config=self.config.source,
            state_dir=str(self.state_dir), pipelines=sorted(self.config.pipelines))

    def _status_line(self) -> str:
        where = self.listening()
        n = sum(len(v) for v in where.values())
        return f"running {len(self.config.pipelines)} pipelines, listening on {n} endpoints"


def _endpoints(cfg: Any) -> list[str]:
    """Every enabled ``endpoint`` string inside a (nested) dataclass config."""
    if not is_dataclass(cfg):
        return []
    if getattr(cfg, "enabled", True) is False:
        return []
    out: list[str] = []
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if f.name == "endpoint" and isinstance(v, str) and v:
            out.append(v)
        elif is_dataclass(v):
            out.extend(_endpoints(v))
    return out


def run_agent(config_path: str | None) -> int:
    """Load, validate, run. The CLI's ``run`` command."""
    try:
        config = load(config_path)
    except ConfigError as e:
        setup_logging()
        log(logging.ERROR, "invalid config", source=e.source, errors=e.errors)
        return 1
    tc = config.service.telemetry
    setup_logging(tc.log_level, tc.log_format)
    agent = Agent(config, config_path)
    runner_kwargs: dict[str, Any] = {}
    with contextlib.suppress(ImportError):
        import uvloop

        runner_kwargs["loop_factory"] = uvloop.new_event_loop
    with asyncio.Runner(**runner_kwargs) as runner:
        return runner.run(agent.run())
