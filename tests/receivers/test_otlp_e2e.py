"""The ``otlp`` receiver inside the real agent process (``python -m agent run``).

The receiver feeds the ``debug`` exporter, whose one log line per batch says what
arrived; the agent's JSON log is read back from the process.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from tests.conftest import free_port

pytestmark = pytest.mark.integration

CONFIG = """
[receivers.otlp]
grpc.endpoint = "127.0.0.1:{grpc}"
http.endpoint = "127.0.0.1:{http}"
[exporters.debug]
[service]
state_dir = "{state}"
health.endpoint = "127.0.0.1:{health}"
[service.pipelines.traces]
receivers = ["otlp"]
exporters = ["debug"]
"""


def debug_items(agent) -> int:
    """Spans the debug exporter reported so far."""
    return sum(r.get("items", 0) for r in agent.log_records()
               if r.get("msg", "").endswith("traces batch"))


def wait_until(predicate, what: str, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_agent_serves_otlp_on_both_transports(tmp_path, start_agent):
    grpc, http, health = free_port(), free_port(), free_port()
    agent = start_agent(CONFIG.format(grpc=grpc, http=http, health=health, state=tmp_path / "s"))
    agent.wait_ready(f"127.0.0.1:{health}")
    assert any(f"grpc on 127.0.0.1:{grpc}" in r.get("msg", "")
               and f"http on 127.0.0.1:{http}" in r.get("msg", "") for r in agent.log_records())

    provider = TracerProvider(resource=Resource.create({"service.name": "e2e"}))
    provider.add_span_processor(SimpleSpanProcessor(
        OTLPSpanExporter(endpoint=f"127.0.0.1:{grpc}", insecure=True)))
    with provider.get_tracer("t").start_as_current_span("over-grpc"):
        pass
    provider.shutdown()

    body = json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [
        {"traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b174",
         "name": "over-http"}]}]}]}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{http}/v1/traces", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert (resp.status, resp.read()) == (200, b"{}")

    # A bad request is refused and counted; the agent keeps serving.
    bad = urllib.request.Request(f"http://127.0.0.1:{http}/v1/traces", data=b"{", method="POST",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(bad, timeout=10)
    assert err.value.code == 400

    wait_until(lambda: debug_items(agent) == 2, "2 spans at the debug exporter")
    with urllib.request.urlopen(f"http://127.0.0.1:{health}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    assert 'reason="decode_error"' in metrics
    assert agent.stop() == 0


def test_port_in_use_fails_start_up_with_a_clear_message(tmp_path, start_agent):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        agent = start_agent(CONFIG.format(grpc=taken, http=free_port(), health=free_port(),
                                          state=tmp_path / "s"))
        assert agent.proc.wait(30) != 0
    assert f"cannot listen on 127.0.0.1:{taken}: address in use" in agent.log()
