"""Issue 3, "nothing acknowledged is lost", with real processes end to end.

Each test runs the agent through its CLI (``start_agent``): otlp receiver ->
memory_limiter -> otlp exporter with its default persistent queue, forwarding to a
``FlakyUpstream`` that counts the distinct span ids it stored. The client is the
OpenTelemetry SDK's own gRPC exporter: ``export()`` returning SUCCESS is the
acknowledgement, and every span acknowledged so must reach the upstream, whatever the
upstream does meanwhile (down, failing, overloaded) — with duplicates only where the
queue's at-least-once contract allows them (agent/queue/README.md).
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import grpc
import psutil
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port
from tests.flaky_upstream import FlakyUpstream

pytestmark = pytest.mark.integration

AGENT = """
[receivers.otlp]
grpc.endpoint = "127.0.0.1:{grpc}"
http.enabled = false
[processors.memory_limiter]
{limiter}
[exporters.otlp]
endpoint = "{upstream}"
retry_on_failure.initial_interval = "20ms"
retry_on_failure.max_interval = "200ms"
{exporter}
[service]
state_dir = "{state}"
health.endpoint = "127.0.0.1:{health}"
[service.pipelines.traces]
receivers = ["otlp"]
processors = ["memory_limiter"]
exporters = ["otlp"]
"""

RECEIVER, LIMITER, EXPORTER = "receivers.otlp", "processors.memory_limiter", "exporters.otlp"
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


class Agent:
    """One forwarding agent process and the addresses a test talks to."""

    def __init__(self, start_agent, tmp_path: Path, upstream: FlakyUpstream,
                 limiter: str = "", exporter: str = "", http: bool = False) -> None:
        self.grpc, self.health = free_port(), free_port()
        self.state = tmp_path / "state"
        self.state.mkdir(exist_ok=True)
        endpoint = upstream.http_endpoint if http else upstream.endpoint
        self.proc = start_agent(AGENT.format(grpc=self.grpc, health=self.health,
                                             upstream=endpoint, state=self.state,
                                             limiter=limiter, exporter=exporter))
        self.proc.wait_ready(f"127.0.0.1:{self.health}")

    def exporter(self, timeout: float = 10) -> OTLPSpanExporter:
        """An SDK exporter pointed at the agent (the application's side)."""
        return OTLPSpanExporter(endpoint=f"127.0.0.1:{self.grpc}", insecure=True,
                                timeout=timeout)

    def metric(self, name: str, component: str | None = None, **labels: str) -> float:
        """The sum of the agent's self-metric ``name`` over the series matching the labels."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.health}/metrics", timeout=5) as r:
            text = r.read().decode()
        if component is not None:
            labels["component"] = component
        return sum(s.value for family in text_string_to_metric_families(text)
                   for s in family.samples
                   if s.name == name and labels.items() <= s.labels.items())

    def wait_metric(self, name: str, component: str, at_least: float,
                    timeout: float = 15) -> float:
        """Wait until ``name`` of ``component`` reaches ``at_least``; return its value."""
        end = time.monotonic() + timeout
        while (value := self.metric(name, component)) < at_least and time.monotonic() < end:
            time.sleep(0.05)
        return value


def make_spans(n: int, payload: int = 0) -> list[ReadableSpan]:
    """``n`` finished SDK spans with distinct ids (and a ``payload``-byte attribute)."""
    finished = InMemorySpanExporter()
    tp = TracerProvider(resource=Resource.create({"service.name": "ranker"}))
    tp.add_span_processor(SimpleSpanProcessor(finished))
    tracer = tp.get_tracer("app")
    attributes: dict[str, str] = {"payload": "x" * payload} if payload else {}
    for i in range(n):
        with tracer.start_as_current_span("predict", attributes={**attributes, "request.n": i}):
            pass
    tp.shutdown()
    return list(finished.get_finished_spans())


def span_id(span: ReadableSpan) -> bytes:
    """The span id as the upstream sees it (8 bytes)."""
    return span.context.span_id.to_bytes(8, "big")


def chunks(spans: Sequence[ReadableSpan], size: int) -> list[Sequence[ReadableSpan]]:
    """``spans`` cut into export batches of ``size``."""
    return [spans[k:k + size] for k in range(0, len(spans), size)]


def export(exporter: OTLPSpanExporter, batches: list[Sequence[ReadableSpan]]
           ) -> tuple[set[bytes], list[Sequence[ReadableSpan]]]:
    """Export each batch; return the acknowledged span ids and the refused batches."""
    acked: set[bytes] = set()
    refused = []
    for batch in batches:
        if exporter.export(batch) is SpanExportResult.SUCCESS:
            acked |= {span_id(s) for s in batch}
        else:
            refused.append(batch)
    return acked, refused


@pytest.fixture
def upstream():
    with FlakyUpstream() as up:
        yield up


def test_spans_acknowledged_while_upstream_is_down_arrive_once_it_is_up(
        tmp_path, start_agent, upstream):
    agent = Agent(start_agent, tmp_path, upstream)  # the upstream is not listening yet
    exporter = agent.exporter()
    spans = make_spans(400)

    acked, refused = export(exporter, chunks(spans[:300], 20))
    assert refused == []  # the persistent queue has room: the outage is invisible to the app
    # The agent did try, and failed, while the upstream was away; it holds everything.
    assert agent.wait_metric("mlagent_agent_send_failed_items_total", EXPORTER, 1) >= 1
    assert agent.metric("mlagent_agent_queue_size", EXPORTER) == 300
    assert upstream.unique == set()

    upstream.start()
    more, refused = export(exporter, chunks(spans[300:], 20))
    assert refused == []
    acked |= more
    exporter.shutdown()

    assert len(acked) == 400
    assert upstream.wait_for(acked, timeout=15) == set()
    # Failed connections store nothing: retrying them duplicates nothing.
    assert upstream.duplicates <= upstream.duplicate_allowance
    assert agent.metric("mlagent_agent_dropped_items_total") == 0
    assert agent.proc.stop() == 0


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
@pytest.mark.parametrize("fail_before, fail_after", [(0.4, 0.0), (0.25, 0.25)],
                         ids=["fail-before-storing", "fail-before-and-after-storing"])
def test_intermittent_upstream_errors_lose_nothing_and_duplicate_only_what_was_stored(
        tmp_path, start_agent, fail_before, fail_after, protocol):
    # Answers drawn from UNAVAILABLE / RESOURCE_EXHAUSTED (+ RetryInfo) over gRPC,
    # 503 / 429 (+ Retry-After) over HTTP.
    with FlakyUpstream(seed=3, fail_before=fail_before, fail_after=fail_after, codes=RETRYABLE,
                       retry_after=0.01) as upstream:
        upstream.start()
        agent = Agent(start_agent, tmp_path, upstream, exporter=f'protocol = "{protocol}"',
                      http=protocol != "grpc")
        exporter = agent.exporter()
        acked, refused = export(exporter, chunks(make_spans(400), 10))
        exporter.shutdown()
        assert refused == [] and len(acked) == 400

        assert upstream.wait_for(acked, timeout=15) == set()
        # Every batch delivered (its final attempt succeeded): no retry still to come.
        assert agent.wait_metric("mlagent_agent_sent_items_total", EXPORTER, 400) == 400
        stats = upstream.stats()
        assert stats["failed_before"] > 0  # the seeded faults happened
        assert agent.metric("mlagent_agent_retries_total", EXPORTER) >= stats["failed_before"]
        # At least once: a batch stored and then answered with an error is sent again,
        # so exactly those spans (and any stored past the caller's deadline) come twice.
        assert stats["failed_after_spans"] <= upstream.duplicates
        assert upstream.duplicates <= upstream.duplicate_allowance
        if fail_after:
            assert upstream.duplicates > 0
        assert agent.metric("mlagent_agent_dropped_items_total") == 0
        assert agent.proc.stop() == 0


def export_concurrently(agent: Agent, batches: list[Sequence[ReadableSpan]], timeout: float,
                        clients: int = 8) -> tuple[set[bytes], list[Sequence[ReadableSpan]]]:
    """``export`` from ``clients`` threads, each an SDK exporter with a ``timeout`` deadline.

    With a deadline shorter than the retry hint of the agent's refusals, the SDK gives
    up on a refused batch at once instead of sleeping: the clients keep offering load
    as fast as they can encode it.
    """
    results: list[tuple[set[bytes], list[Sequence[ReadableSpan]]]] = []

    def client(part: list[Sequence[ReadableSpan]]) -> None:
        exporter = agent.exporter(timeout=timeout)
        results.append(export(exporter, part))
        exporter.shutdown()

    threads = [threading.Thread(target=client, args=(batches[i::clients],))
               for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return set().union(*(a for a, _ in results)), [b for _, r in results for b in r]


class RssSampler:
    """The peak resident set size of a process, sampled every 20 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self.peak = self._process.memory_info().rss
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._done.wait(0.02):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


# Small bounds: the queue may hold 4 MiB. Either the memory_limiter refuses first
# (above 2 MiB held, retry hint 5 s), or, with its data limits at their defaults,
# the full queue itself does (retry hint 1 s). The client's deadline is below the
# hint, so that a refused client gives up at once (see export_concurrently).
# The queue refuses without waiting for room (block_timeout 0). With puts waiting
# 50 ms for room, requests stay in flight longer and RSS grew by ~45 MiB here
# whatever max_bytes was (1 to 12 MiB), ~23 MiB with the receiver's
# max_concurrent_requests at 2: memory of requests in flight, which the receiver's
# limits bound, not the data limits this test is about.
BOUNDS = {
    "memory_limiter": ('data_soft_limit = "2MiB"\ndata_hard_limit = "4MiB"\nretry_after = "5s"',
                       'sending_queue.max_bytes = "4MiB"', LIMITER, "data_soft_limit", 3.0),
    "sending_queue": ("", 'sending_queue.max_bytes = "4MiB"\nsending_queue.block_timeout = "0s"',
                      EXPORTER, "queue_full", 0.9),
}
# What the agent's RSS may grow by under overload: the 4 MiB of queued data, plus a
# fixed allowance for what is in flight (8 concurrent 200 KiB requests decoded, gRPC
# buffers, allocator high-water marks), which measures ~20 MiB here. Without the
# bounds above, the same load grows it by ~60 MiB: everything offered is queued.
RSS_GROWTH_BUDGET = 40 * 2**20


@pytest.mark.parametrize("bound", BOUNDS)
def test_overload_is_refused_within_memory_bounds_and_acknowledged_spans_arrive(
        tmp_path, start_agent, bound):
    limiter, queue, refuser, reason, client_timeout = BOUNDS[bound]
    # The upstream sheds requests beyond 2 waiting (RESOURCE_EXHAUSTED + RetryInfo).
    with FlakyUpstream(max_pending=2, retry_after=0.05) as upstream:
        upstream.start()
        agent = Agent(start_agent, tmp_path, upstream, limiter=limiter, exporter=queue)
        spans = make_spans(12400, payload=4000)  # ~4 KiB each, 50 per request
        warm_up, load = chunks(spans[:400], 50), chunks(spans[400:], 50)
        # Warm up (threads, channels, allocator) before taking the baseline.
        warm_acked, _ = export_concurrently(agent, warm_up, client_timeout)
        assert upstream.wait_for(warm_acked, timeout=15) == set()
        baseline = psutil.Process(agent.proc.proc.pid).memory_info().rss

        # 48 MiB offered as fast as 8 clients can send, to an upstream taking
        # 200 spans (~800 KiB) a second: >10x what it can take.
        upstream.spans_per_second = 200
        with RssSampler(agent.proc.proc.pid) as rss:
            acked, refused = export_concurrently(agent, load, client_timeout)
        assert acked and refused
        assert rss.peak - baseline <= RSS_GROWTH_BUDGET, (
            f"RSS grew by {(rss.peak - baseline) / 2**20:.1f} MiB")
        # Every refusal is counted, where it happened and at the receiver that answered.
        at_receiver = agent.metric("mlagent_agent_refused_items_total", RECEIVER)
        downstream = (agent.metric("mlagent_agent_refused_items_total", LIMITER)
                      + agent.metric("mlagent_agent_refused_items_total", EXPORTER))
        assert at_receiver == downstream
        # A batch the SDK gave up on was refused at least once, or (its deadline passed
        # on this loaded machine) accepted too late to be acknowledged.
        accepted_late = (agent.metric("mlagent_agent_accepted_items_total", RECEIVER)
                         - len(warm_acked | acked))
        assert at_receiver + accepted_late >= sum(len(b) for b in refused)
        assert agent.metric("mlagent_agent_refused_items_total", refuser, reason=reason) > 0

        # The upstream catches up: the agent's retries of what it shed now succeed, and
        # everything it accepted (acknowledged, or accepted late) is delivered.
        upstream.spans_per_second = None
        assert upstream.wait_for(acked, timeout=15) == set()
        accepted = agent.metric("mlagent_agent_accepted_items_total", RECEIVER)
        assert agent.wait_metric("mlagent_agent_sent_items_total", EXPORTER, accepted) == accepted
        assert upstream.stats()["shed"] > 0
        assert agent.metric("mlagent_agent_retries_total", EXPORTER) > 0
        # And the application's own retries of batches refused to it are accepted now.
        stored = upstream.unique
        retry = [b for b in refused if not {span_id(s) for s in b} & stored][:8]
        assert retry
        exporter = agent.exporter()
        again, still_refused = export(exporter, retry)
        exporter.shutdown()
        assert still_refused == []
        assert upstream.wait_for(again, timeout=15) == set()
        assert upstream.duplicates <= upstream.duplicate_allowance
        assert agent.metric("mlagent_agent_dropped_items_total") == 0
        assert agent.proc.stop() == 0


def test_corrupt_queue_file_is_quarantined_and_the_agent_serves(tmp_path, start_agent, upstream):
    queues = tmp_path / "state" / "queues"
    queues.mkdir(parents=True)
    (queues / "otlp.db").write_bytes(b"this is not an SQLite database\n" * 512)
    upstream.start()
    agent = Agent(start_agent, tmp_path, upstream)

    moved = list(queues.glob("otlp.db.corrupt-*"))
    assert len(moved) == 1
    assert moved[0].read_bytes().startswith(b"this is not an SQLite database")
    assert any("corrupt" in r.get("msg", "") and r.get("path") == str(queues / "otlp.db")
               for r in agent.proc.log_records()), agent.proc.log()

    exporter = agent.exporter()
    acked, refused = export(exporter, chunks(make_spans(50), 10))
    exporter.shutdown()
    assert refused == [] and len(acked) == 50
    assert upstream.wait_for(acked, timeout=15) == set()
    assert agent.proc.stop() == 0
