"""Shared harness: start a sink, an agent (through the CLI) and the load generator as processes.

Every benchmark in this folder is a comparison of pipelines measured in ONE run on the
same machine, reported as ratios (this machine is shared and noisy; absolute figures
move between runs, ratios much less).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

HERE = Path(__file__).parent
ROOT = HERE.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Result:
    name: str
    acked_spans: int
    exported_spans: int
    seconds: float
    refused: int
    errors: int
    peak_rss_mib: float
    es: dict[str, int] | None = None  # the Elasticsearch sink's counts, when one ran

    @property
    def accepted_per_s(self) -> float:
        return self.acked_spans / self.seconds

    @property
    def exported_per_s(self) -> float:
        return self.exported_spans / self.seconds

    def line(self) -> str:
        return (f"{self.name:<28} accepted {self.accepted_per_s:>10,.0f} spans/s   "
                f"exported {self.exported_per_s:>10,.0f} spans/s   "
                f"refused {self.refused:>5}  errors {self.errors:>3}  "
                f"peak RSS {self.peak_rss_mib:>6.0f} MiB")


def wait_http(url: str, timeout: float = 30) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not become ready")


def run_pipeline(name: str, pipeline_toml: str, duration: float = 15, concurrency: int = 8,
                 loadgen_args: tuple[str, ...] = (), es_sink: bool = False) -> Result:
    """Run ``pipeline_toml`` (with {SINK}, {GRPC}, {HTTP}, {HEALTH}, {PROM}, {STATE} placeholders)
    under load for ``duration`` seconds; count what the sink received."""
    sink_port, grpc_port, http_port, health = free_port(), free_port(), free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "agent.toml"
        values = {"{SINK}": f"127.0.0.1:{sink_port}", "{GRPC}": f"127.0.0.1:{grpc_port}",
                  "{HTTP}": f"127.0.0.1:{http_port}", "{HEALTH}": f"127.0.0.1:{health}",
                  "{PROM}": f"127.0.0.1:{free_port()}", "{STATE}": tmp}
        es = None
        if es_sink:
            es_port = free_port()
            values["{ES}"] = f"http://127.0.0.1:{es_port}"
            es = subprocess.Popen([sys.executable, str(HERE / "es_sink.py"), "--port",
                                   str(es_port)], stdout=subprocess.PIPE, text=True)
            es.stdout.readline()  # type: ignore[union-attr]
        text = pipeline_toml
        for k, v in values.items():
            text = text.replace(k, v)
        cfg.write_text(text)
        sink = subprocess.Popen([sys.executable, str(HERE / "sink.py"), "--port", str(sink_port)],
                                stdout=subprocess.PIPE, text=True)
        sink.stdout.readline()  # type: ignore[union-attr]
        agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg)],
                                 cwd=ROOT, stderr=subprocess.DEVNULL)
        peak = [0.0]
        stop = threading.Event()

        def sample() -> None:
            p = psutil.Process(agent.pid)
            while not stop.is_set():
                try:
                    peak[0] = max(peak[0], p.memory_info().rss / 2**20)
                except psutil.Error:
                    return
                time.sleep(0.2)

        try:
            wait_http(f"http://127.0.0.1:{health}/readyz")
            t = threading.Thread(target=sample, daemon=True)
            t.start()
            out = subprocess.run([sys.executable, str(HERE / "loadgen.py"), "--target",
                                  f"127.0.0.1:{grpc_port}", "--duration", str(duration),
                                  "--concurrency", str(concurrency), *loadgen_args],
                                 capture_output=True, text=True, check=True)
            load = json.loads(out.stdout.strip().splitlines()[-1])
        finally:
            agent.send_signal(signal.SIGTERM)
            agent.wait(60)
            stop.set()
            sink.send_signal(signal.SIGTERM)
            sink_out, _ = sink.communicate(timeout=30)
            es_stats = None
            if es is not None:
                es.send_signal(signal.SIGTERM)
                es_out, _ = es.communicate(timeout=30)
                es_stats = json.loads(es_out.strip().splitlines()[-1])
        got = json.loads(sink_out.strip().splitlines()[-1])
    return Result(name, load["acked_spans"], got["spans"], load["seconds"], load["refused"],
                  load["errors"], peak[0], es_stats)


def decode_rate(payloads: list[bytes], seconds: float = 3.0) -> float:
    """Raw upb parse rate of the same payloads, spans/s on one core."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    spans_per = sum(len(ss.spans) for rs in ExportTraceServiceRequest.FromString(payloads[0])
                    .resource_spans for ss in rs.scope_spans)
    n = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for p in payloads:
            ExportTraceServiceRequest.FromString(p)
        n += len(payloads)
    return n * spans_per / (time.perf_counter() - start)


os.environ.setdefault("PYTHONUNBUFFERED", "1")
