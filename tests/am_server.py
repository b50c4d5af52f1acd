"""A real Alertmanager (Debian ``prometheus-alertmanager`` 0.25) for integration tests.

``running_alertmanager(tmp_path)`` starts one on a free 127.0.0.1 port with
clustering disabled and its own storage directory, waits until ``/-/ready``, and
stops it afterwards. Without the binary the test is skipped, unless ``CI=true``:
there a missing binary is a failure, so CI cannot pass by skipping.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

AM_BINARY = os.environ.get("ALERTMANAGER_BIN", "/usr/bin/prometheus-alertmanager")
_CONFIG = """\
route:
  receiver: "null"
  group_wait: 1h
receivers:
  - name: "null"
"""


def require_alertmanager() -> str:
    """The binary's path; skips (or fails under ``CI=true``) when it is not installed."""
    path = shutil.which(AM_BINARY)
    if path is None:
        reason = (f"{AM_BINARY} not found: install the Debian package prometheus-alertmanager "
                  "(apt-get install prometheus-alertmanager)")
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Alertmanager:
    """One Alertmanager process; ``url`` is its base URL once started."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, timeout: float = 20.0) -> None:
        binary = require_alertmanager()
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "alertmanager.yml"
        config.write_text(_CONFIG)
        self.port = free_port()
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--cluster.listen-address=",
             "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=open(self.workdir / "stderr.log", "wb"))  # noqa: SIM115
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with aiohttp.ClientSession() as session:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError("alertmanager exited: "
                                       + (self.workdir / "stderr.log").read_text()[-2000:])
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"{self.url}/-/ready") as r:
                        if r.status == 200:
                            return
                if loop.time() > deadline:
                    raise TimeoutError(f"alertmanager not ready on {self.url} in {timeout}s")
                await asyncio.sleep(0.1)

    async def alerts(self) -> list[dict[str, Any]]:
        """``GET /api/v2/alerts``: the alerts Alertmanager holds as active now."""
        async with aiohttp.ClientSession() as session, \
                session.get(f"{self.url}/api/v2/alerts") as r:
            r.raise_for_status()
            return list(await r.json())

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


@contextlib.asynccontextmanager
async def running_alertmanager(workdir: Path) -> AsyncIterator[Alertmanager]:
    """Start an Alertmanager in ``workdir`` for the duration of the block."""
    am = Alertmanager(workdir)
    try:
        await am.start()
        yield am
    finally:
        am.stop()
