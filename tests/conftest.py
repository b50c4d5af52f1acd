"""Shared fixtures: free ports and an agent started through the CLI as a real process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AgentProcess:
    """``python -m agent run --config FILE`` as a subprocess, with its stderr captured."""

    def __init__(self, config_path: Path, env: dict[str, str] | None = None) -> None:
        self.config_path = config_path
        self.log_path = config_path.with_suffix(".log")
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        full_env = {**os.environ, **(env or {})}
        full_env.pop("STATE_DIRECTORY", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config",
                                      str(config_path)], cwd=ROOT, env=full_env,
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, health: str, timeout: float = 30) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"http://{health}/readyz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"agent not ready in {timeout}s:\n{self.log()}")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def log_records(self) -> list[dict]:
        out = []
        for line in self.log().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out


@pytest.fixture
def start_agent(tmp_path) -> Iterator:
    """``start_agent(toml_text, env=None) -> AgentProcess``; stopped at teardown."""
    started: list[AgentProcess] = []

    def start(text: str, env: dict[str, str] | None = None, name: str = "agent") -> AgentProcess:
        cfg = tmp_path / f"{name}.toml"
        cfg.write_text(text)
        a = AgentProcess(cfg, env)
        started.append(a)
        return a

    yield start
    for a in started:
        a.stop()
