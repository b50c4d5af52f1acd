"""A real Prometheus (the Debian package, 2.42) on 127.0.0.1 for integration tests.

``PromServer`` writes a temp config (scraping the given targets every second with
``honor_labels``), starts ``prometheus`` with exemplar storage and the remote write
receiver on a free port, waits until it is ready, and stops it. ``stop`` then
``start`` again keeps the data dir and port: that is how the remote-write tests take
the backend away and bring it back.

``prometheus_binary()`` skips the calling test when the binary is missing, except
under ``CI=true``, where a missing binary fails the test: CI must run these.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest


def prometheus_binary(name: str = "prometheus") -> str:
    """Path of ``prometheus`` (or ``promtool``); skip, or fail under CI, when missing."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}")
                                  else None)
    if path is None:
        reason = f"{name} binary not found (apt-get install prometheus)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason + " and CI=true: integration tests must run in CI")
        pytest.skip(reason)
    return path


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PromServer:
    """One Prometheus process; see the module docstring."""

    def __init__(self, workdir: Path, *, scrape_targets: tuple[str, ...] = (),
                 scrape_interval: str = "1s") -> None:
        self.binary = prometheus_binary()
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.remote_write_url = f"{self.url}/api/v1/write"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "prometheus.log"
        config: dict[str, Any] = {
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": "10s"},
            "scrape_configs": [{
                "job_name": "mlagent",
                "honor_labels": True,
                "scrape_interval": scrape_interval,
                "scrape_timeout": scrape_interval,
                "static_configs": [{"targets": list(scrape_targets)}],
            }] if scrape_targets else [],
        }
        self.config_path = workdir / "prometheus.yml"
        workdir.mkdir(parents=True, exist_ok=True)
        # JSON is YAML: no YAML writer needed.
        self.config_path.write_text(json.dumps(config))

    async def start(self, timeout: float = 60.0) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={self.config_path}",
             f"--storage.tsdb.path={self.data_dir}",
             f"--web.listen-address=127.0.0.1:{self.port}",
             "--enable-feature=exemplar-storage", "--web.enable-remote-write-receiver",
             "--log.level=warn"],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"prometheus exited with {self.proc.returncode}: "
                                       f"{self.log_path.read_text()[-2000:]}")
                try:
                    async with http.get(f"{self.url}/-/ready") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"prometheus not ready in {timeout}s")
                await asyncio.sleep(0.1)

    async def stop(self) -> None:
        """SIGTERM and wait (Prometheus flushes its head on a clean stop)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)

    async def __aenter__(self) -> PromServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------------- API

    async def api(self, path: str, **params: Any) -> Any:
        """GET ``/api/v1/<path>`` and return its ``data`` (raises on an error status)."""
        async with aiohttp.ClientSession() as http, http.get(
                f"{self.url}/api/v1/{path}", params=params) as r:
            body = await r.json()
        if body.get("status") != "success":
            raise AssertionError(f"prometheus {path} {params}: {body}")
        return body["data"]

    async def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query; the ``result`` list of a vector."""
        return (await self.api("query", query=promql))["result"]

    async def values(self, promql: str) -> dict[frozenset[tuple[str, str]], float]:
        """Instant query as ``{frozenset(labels): value}``."""
        return {frozenset(r["metric"].items()): float(r["value"][1])
                for r in await self.query(promql)}

    async def wait_for(self, promql: str, predicate: Any, timeout: float = 30.0) -> Any:
        """Poll ``promql`` until ``predicate(values)`` holds; returns those values."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            last = await self.values(promql)
            if predicate(last):
                return last
            if time.monotonic() > deadline:
                raise AssertionError(f"{promql}: condition not met in {timeout}s; last={last}")
            await asyncio.sleep(0.25)

    async def exemplars(self, promql: str) -> list[dict[str, Any]]:
        """``/api/v1/query_exemplars`` over the last hour."""
        now = time.time()
        return await self.api("query_exemplars", query=promql, start=str(now - 3600),
                              end=str(now + 60))

    async def targets(self) -> list[dict[str, Any]]:
        return (await self.api("targets"))["activeTargets"]
