"""The enrich processor: host identity, model version chain, hardware, log–trace correlation."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from agent.component import RetryableError, Signal
from agent.config import decode_dataclass
from agent.hardware import GpuReading, HardwareSnapshot, HostReading, host_identity
from agent.pdata import attributes_to_dict, ml_attributes
from agent.processors.enrich import EnrichConfig, EnrichProcessor, factory
from agent.telemetry import Telemetry
from agent.testing import (
    Sink,
    gauge,
    log_batch,
    log_record,
    make_host,
    metric_batch,
    settings_for,
    span,
    trace_batch,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


async def started(tmp_path: Path, signal: Signal = Signal.TRACES, host: Any = None,
                  telemetry: Telemetry | None = None, **cfg: Any) -> tuple[EnrichProcessor, Sink]:
    sink = Sink()
    p = factory.create(settings_for("enrich", telemetry=telemetry), EnrichConfig(**cfg),
                       {signal: sink})
    await p.start(host or make_host(tmp_path))
    return p, sink


def resources(batch: Any) -> list[dict[str, Any]]:
    return [attributes_to_dict(r.resource.attributes) for r in batch.resources()]


def span_attrs(sink: Sink) -> list[dict[str, Any]]:
    return [attributes_to_dict(s.attributes) for s in sink.spans()]


# --------------------------------------------------------------------------- host identity


async def test_host_identity_on_every_resource_without_overwriting_the_sender(tmp_path):
    p, sink = await started(tmp_path)
    await p.consume(trace_batch({"a": [span()], "b": [span()]}))
    await p.consume(trace_batch([span()], resource={"host.name": "pod-7"}))
    await p.shutdown()
    me = host_identity()
    a, b = resources(sink.batches[0])
    assert a["host.name"] == b["host.name"] == me["host.name"]
    assert a["os.type"] == "linux"
    if "host.id" in me:
        assert a["host.id"] == Path("/etc/machine-id").read_text().strip()
    assert resources(sink.batches[1])[0]["host.name"] == "pod-7"


async def test_override_replaces_what_the_sender_set(tmp_path):
    p, sink = await started(tmp_path, override=True)
    await p.consume(trace_batch([span()], resource={"host.name": "pod-7"}))
    attrs = list(sink.batches[0].request.resource_spans[0].resource.attributes)
    assert [kv.value.string_value for kv in attrs if kv.key == "host.name"] == [
        host_identity()["host.name"]]


# --------------------------------------------------------------------------- model version


async def test_version_from_resource_is_kept_and_items_untouched(tmp_path):
    p, sink = await started(tmp_path, model_versions={"ranker": "v3"})
    await p.consume(trace_batch({"ranker": [span(attributes={"k": 1})]},
                                resource={"ml.model.version": "v9"}))
    assert resources(sink.batches[0])[0]["ml.model.version"] == "v9"
    assert span_attrs(sink) == [{"k": 1}]


async def test_version_from_config_mapping_written_once_on_the_resource(tmp_path):
    p, sink = await started(tmp_path, model_versions={"ranker": "v3"})
    await p.consume(trace_batch({"ranker": [span(), span()], "other": [span()]}))
    ranker, other = resources(sink.batches[0])
    assert ranker["ml.model.version"] == "v3"
    assert other["ml.model.version"] == "unknown"
    assert span_attrs(sink) == [{}, {}, {}]  # no per-span writes
    # the columns the connectors read see the version
    assert [{**ml_attributes(rs.resource.attributes), **ml_attributes(sp.attributes)}[
        "ml.model.version"] for rs in sink.batches[0].request.resource_spans
        for ss in rs.scope_spans for sp in ss.spans] == ["v3", "v3", "unknown"]


async def test_span_versions_win_and_fallback_goes_on_the_spans_that_lack_it(tmp_path):
    p, sink = await started(tmp_path, model_versions={"ranker": "v3"}, item_probe_interval=0)
    batch = trace_batch({"ranker": [span("a", attributes={"ml.model.version": "v7"}),
                                    span("b")]})
    await p.consume(batch)
    assert "ml.model.version" not in resources(sink.batches[0])[0]
    assert [a["ml.model.version"] for a in span_attrs(sink)] == ["v7", "v3"]


async def test_probe_remembers_services_that_version_their_spans(tmp_path):
    # Default probe interval: the first batch is scanned; later batches of a service
    # whose spans carry versions keep getting per-span fallbacks.
    p, sink = await started(tmp_path)
    await p.consume(trace_batch({"llm": [span(attributes={"ml.model.version": "7b"})]}))
    await p.consume(trace_batch({"llm": [span("x"), span("y", attributes={
        "ml.model.version": "13b"})]}))
    assert [a["ml.model.version"] for a in span_attrs(sink)] == ["7b", "unknown", "13b"]
    assert all("ml.model.version" not in r for b in sink.batches for r in resources(b))


def write(path: Path, text: str, mtime_ns: int) -> None:
    path.write_text(text)
    os.utime(path, ns=(mtime_ns, mtime_ns))  # distinct stamps even on coarse clocks


@pytest.mark.parametrize("suffix", [".json", ".toml"])
async def test_version_and_name_from_manifest(tmp_path, suffix):
    path = tmp_path / f"models{suffix}"
    if suffix == ".json":
        text = json.dumps({"services": {"ranker": {"ml.model.version": "v4",
                                                   "ml.model.name": "ranker-xgb"}}})
    else:
        text = '[services.ranker]\n"ml.model.version" = "v4"\n"ml.model.name" = "ranker-xgb"\n'
    write(path, text, 1_000_000_000)
    p, sink = await started(tmp_path, manifest=path)
    await p.consume(trace_batch({"ranker": [span()]}, resource={"ml.model.name": "sender"}))
    await p.shutdown()
    res = resources(sink.batches[0])[0]
    assert res["ml.model.version"] == "v4"
    assert res["ml.model.name"] == "sender"  # the sender's own attribute wins


async def test_config_mapping_comes_before_manifest(tmp_path):
    path = tmp_path / "m.json"
    write(path, json.dumps({"services": {"ranker": {"ml.model.version": "v4"}}}), 10**9)
    p, sink = await started(tmp_path, manifest=path, model_versions={"ranker": "v3"})
    await p.consume(trace_batch({"ranker": [span()]}))
    await p.shutdown()
    assert resources(sink.batches[0])[0]["ml.model.version"] == "v3"


async def test_manifest_change_is_picked_up_while_running(tmp_path):
    path = tmp_path / "m.json"
    write(path, json.dumps({"services": {"ranker": {"ml.model.version": "v4"}}}), 10**9)
    p, sink = await started(tmp_path, manifest=path, manifest_poll_interval=0.1)

    async def version_now() -> str:
        await p.consume(trace_batch({"ranker": [span()]}))
        return resources(sink.batches[-1])[0]["ml.model.version"]

    async def wait_for_version(expected: str) -> None:
        for _ in range(200):
            if await version_now() == expected:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"version never became {expected}")

    try:
        assert await version_now() == "v4"
        write(path, json.dumps({"services": {"ranker": {"ml.model.version": "v5"}}}), 2 * 10**9)
        await wait_for_version("v5")
        # a broken rewrite (tool caught mid-write) keeps the last good manifest
        write(path, '{"services": {"ranker": ', 3 * 10**9)
        await asyncio.sleep(0.3)
        assert await version_now() == "v5"
        path.unlink()
        await wait_for_version("unknown")
    finally:
        await p.shutdown()


async def test_unknown_when_no_source_knows(tmp_path):
    p, sink = await started(tmp_path, manifest=tmp_path / "absent.json",
                            unknown_version="n/a")
    await p.consume(log_batch([log_record("x")], resource={"service.name": "s"}))
    await p.shutdown()
    assert resources(sink.batches[0])[0]["ml.model.version"] == "n/a"


async def test_metrics_get_identity_and_known_versions_only(tmp_path):
    host = make_host(tmp_path)
    HardwareSnapshot.of(host).publish(HostReading(1, 0.5, 0.25))
    p, sink = await started(tmp_path, Signal.METRICS, host=host, model_versions={"ranker": "v3"})
    await p.consume(metric_batch([gauge("g", [({}, 1.0)])], resource={"service.name": "ranker"}))
    await p.consume(metric_batch([gauge("g", [({}, 1.0)])], resource={"service.name": "other"}))
    ranker, other = (resources(b)[0] for b in sink.batches)
    assert ranker["ml.model.version"] == "v3" and "ml.model.version" not in other
    assert "host.name" in other and "host.cpu.utilization" not in other


# --------------------------------------------------------------------------- hardware


def reading() -> HostReading:
    return HostReading(
        time_unix_nano=1, cpu_utilization=0.42, memory_utilization=0.61,
        gpus=(GpuReading(0, "GPU-aaaa", "H100", utilization=0.2, memory_used=10 * 2**30,
                         processes={}),
              GpuReading(1, "GPU-bbbb", "H100", utilization=0.8, memory_used=70 * 2**30,
                         processes={4242: 60 * 2**30}),
              GpuReading(2, "GPU-cccc", "H100", utilization=0.6, memory_used=30 * 2**30,
                         processes={4242: 20 * 2**30})))


async def test_hardware_attributes_on_resources_from_the_snapshot(tmp_path):
    host = make_host(tmp_path)
    snap = HardwareSnapshot.of(host)
    snap.publish(reading())
    p, sink = await started(tmp_path, host=host)
    b = trace_batch({"on-gpus": [span()], "no-pid": [span()], "pinned": [span()]})
    rs = b.request.resource_spans
    rs[0].resource.attributes.add(key="process.pid").value.int_value = 4242
    rs[2].resource.attributes.add(key="gpu.id").value.string_value = "GPU-aaaa"
    await p.consume(b)
    on_gpus, no_pid, pinned = resources(sink.batches[0])
    assert on_gpus["host.cpu.utilization"] == 0.42
    assert on_gpus["host.memory.utilization"] == 0.61
    assert on_gpus["gpu.id"] == "1,2"
    assert on_gpus["gpu.utilization"] == pytest.approx(0.7)
    assert on_gpus["gpu.memory.used"] == 100 * 2**30
    assert no_pid["host.cpu.utilization"] == 0.42 and "gpu.utilization" not in no_pid
    assert pinned["gpu.id"] == "GPU-aaaa" and pinned["gpu.utilization"] == 0.2
    # pids of senders reach the host receiver through the service, with their service
    assert snap.processes() == {4242: "on-gpus"}
    # one write per resource: spans untouched
    assert span_attrs(sink) == [{}, {}, {}]


async def test_hardware_on_logs_and_absent_without_host_receiver(tmp_path):
    host = make_host(tmp_path)
    p, sink = await started(tmp_path, Signal.LOGS, host=host)
    await p.consume(log_batch([log_record()], resource={"process.pid": 4242}))
    assert "host.cpu.utilization" not in resources(sink.batches[0])[0]
    HardwareSnapshot.of(host).publish(reading())
    await p.consume(log_batch([log_record()], resource={"process.pid": 4242}))
    res = resources(sink.batches[1])[0]
    assert res["gpu.id"] == "1,2" and res["host.memory.utilization"] == 0.61


async def test_hardware_off_by_config(tmp_path):
    host = make_host(tmp_path)
    HardwareSnapshot.of(host).publish(reading())
    p, sink = await started(tmp_path, host=host, hardware=False)
    await p.consume(trace_batch([span()], resource={"process.pid": 4242}))
    assert not any(k.startswith(("gpu.", "host.cpu")) for k in resources(sink.batches[0])[0])


# --------------------------------------------------------------------------- log–trace correlation


def correlated(sink: Sink) -> list[tuple[str, str, int]]:
    return [(r.trace_id.hex(), r.span_id.hex(), r.flags) for r in sink.log_records()]


async def test_log_trace_correlation_from_each_source(tmp_path):
    telemetry = Telemetry()
    p, sink = await started(tmp_path, Signal.LOGS, telemetry=telemetry)
    records = [
        log_record(attributes={"traceparent": f"00-{TRACE}-{SPAN}-01"}),
        log_record(attributes={"trace_id": TRACE, "span_id": SPAN}),
        log_record(attributes={"otelTraceID": TRACE, "otelSpanID": SPAN}),
        log_record(json.dumps({"msg": "done", "trace_id": TRACE, "span_id": SPAN})),
        log_record(json.dumps({"traceparent": f"00-{TRACE}-{SPAN}-00"})),
        log_record({"message": "m", "traceId": TRACE, "spanId": SPAN}),
    ]
    await p.consume(log_batch(records))
    assert correlated(sink) == [(TRACE, SPAN, 1)] + [(TRACE, SPAN, 0)] * 5
    snap = telemetry.snapshot("enrich")
    assert snap["mlagent_enrich_log_records_correlated_total{source=attributes}"] == 3
    assert snap["mlagent_enrich_log_records_correlated_total{source=json_body}"] == 2
    assert snap["mlagent_enrich_log_records_correlated_total{source=map_body}"] == 1


async def test_existing_context_and_bad_input_are_left_alone(tmp_path):
    p, sink = await started(tmp_path, Signal.LOGS, max_json_body_bytes=100)
    other = bytes.fromhex("11" * 16)
    records = [
        log_record(trace_id=other, attributes={"trace_id": TRACE}),
        log_record(attributes={"traceparent": f"ff-{TRACE}-{SPAN}-01"}),  # invalid version
        log_record(attributes={"traceparent": f"00-{'0' * 32}-{SPAN}-01"}),  # all-zero id
        log_record(attributes={"trace_id": "xyz"}),
        log_record('{"trace_id": "' + TRACE + '", "pad": "' + "x" * 200 + '"}'),  # too big
        log_record('{"trace_id": '),  # not JSON
        log_record("plain text " + TRACE),
        log_record(attributes={"trace_id": TRACE}),  # trace id alone is enough
    ]
    await p.consume(log_batch(records))
    got = correlated(sink)
    assert got[0] == ("11" * 16, "", 0)
    assert got[1:7] == [("", "", 0)] * 6
    assert got[7] == (TRACE, "", 0)


async def test_correlation_off_by_config(tmp_path):
    p, sink = await started(tmp_path, Signal.LOGS, correlate_logs=False)
    await p.consume(log_batch([log_record(attributes={"trace_id": TRACE})]))
    assert correlated(sink) == [("", "", 0)]


# --------------------------------------------------------------------------- contract


async def test_downstream_errors_reach_the_sender_and_shutdown_is_idempotent(tmp_path):
    sink = Sink()
    p = factory.create(settings_for("enrich"), EnrichConfig(), {Signal.TRACES: sink})
    await p.shutdown()  # safe before start
    await p.start(make_host(tmp_path))
    sink.fail_with = RetryableError("full")
    with pytest.raises(RetryableError):
        await p.consume(trace_batch([span()]))
    await p.shutdown()
    await p.shutdown()


def test_config_validation():
    errors: list[str] = []
    cfg = decode_dataclass(EnrichConfig, {"model_versions": {"a": "v1"},
                                          "manifest": "/etc/mlagent/models.json"},
                           "processors.enrich", errors)
    assert errors == [] and cfg.manifest == Path("/etc/mlagent/models.json")
    errors = []
    decode_dataclass(EnrichConfig, {"manifest_poll_interval": "1ms", "max_services": 0},
                     "processors.enrich", errors)
    assert [e.split(":")[0] for e in errors] == ["processors.enrich.manifest_poll_interval",
                                                 "processors.enrich.max_services"]


async def test_repeated_resources_follow_new_readings(tmp_path):
    # The same resource in every batch must carry the latest reading, not the first.
    host = make_host(tmp_path)
    snap = HardwareSnapshot.of(host)
    p, sink = await started(tmp_path, host=host, model_versions={"ranker": "v3"})
    for cpu in (0.1, 0.9):
        snap.publish(HostReading(1, cpu, 0.5))
        await p.consume(trace_batch({"ranker": [span()]}))
        await p.consume(trace_batch({"ranker": [span()]}))
    assert [resources(b)[0]["host.cpu.utilization"] for b in sink.batches] == [0.1, 0.1, 0.9, 0.9]
    assert all(resources(b)[0]["ml.model.version"] == "v3" for b in sink.batches)
    assert all(len(b.request.resource_spans[0].resource.attributes) ==
               len(sink.batches[0].request.resource_spans[0].resource.attributes)
               for b in sink.batches)  # nothing written twice


# --------------------------------------------------------------------------- end to end


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_records(path: Path, message_type: Any) -> list[Any]:
    """The requests a ``file`` exporter with ``format = "proto"`` wrote."""
    if not path.exists():
        return []
    data, out, pos = path.read_bytes(), [], 0
    while pos + 4 <= len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        if pos + 4 + n > len(data):
            break  # a record still being written
        msg = message_type()
        msg.ParseFromString(data[pos + 4:pos + 4 + n])
        out.append(msg)
        pos += 4 + n
    return out


def _wait_for(predicate: Any, what: str, agent: Any, timeout: float = 20.0) -> Any:
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        result = predicate()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"{what} not seen in {timeout}s:\n{agent.log()[-3000:]}")


@pytest.mark.integration
def test_end_to_end_sdk_client_through_host_enrich_redact(tmp_path, start_agent):
    """OTel SDK -> agent (otlp + host receivers, enrich, redact) -> file exporter."""
    from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
        ExportMetricsServiceRequest,
    )
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    try:
        from agent.registry import factories

        factories()
    except ImportError as e:  # another component of the tree is mid-change
        pytest.skip(f"the agent cannot load its components: {e}")
    grpc_port, http_port, health = _free_port(), _free_port(), _free_port()
    out = tmp_path / "out"
    agent = start_agent(f"""
[receivers.otlp]
grpc.endpoint = "127.0.0.1:{grpc_port}"
http.endpoint = "127.0.0.1:{http_port}"
[receivers.host]
interval = "200ms"
[processors.enrich]
model_versions = {{ "ranker" = "v3" }}
[processors.redact]
[exporters.file]
path = "{out}-{{signal}}.bin"
format = "proto"
[service]
state_dir = "{tmp_path / 'state'}"
health.endpoint = "127.0.0.1:{health}"
[service.pipelines.traces]
receivers = ["otlp"]
processors = ["enrich", "redact"]
exporters = ["file"]
[service.pipelines.logs]
receivers = ["otlp"]
processors = ["enrich", "redact"]
exporters = ["file"]
[service.pipelines.metrics]
receivers = ["host"]
processors = ["enrich"]
exporters = ["file"]
""")
    agent.wait_ready(f"127.0.0.1:{health}")
    metrics_file = Path(f"{out}-metrics.bin")
    # Spans must find a hardware reading: wait for the host receiver's first sample.
    _wait_for(lambda: _read_records(metrics_file, ExportMetricsServiceRequest),
              "host metrics", agent)

    resource = Resource.create({"service.name": "ranker", "process.pid": os.getpid()})
    endpoint = f"127.0.0.1:{grpc_port}"
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(SimpleSpanProcessor(
        OTLPSpanExporter(endpoint=endpoint, insecure=True)))
    with tracer_provider.get_tracer("e2e").start_as_current_span("predict") as sp:
        sp.set_attribute("db.password", "hunter2")
        sp.set_attribute("user", "alice@example.com")
    tracer_provider.shutdown()

    logger_provider = LoggerProvider(resource=resource)
    logger_provider.add_log_record_processor(SimpleLogRecordProcessor(
        OTLPLogExporter(endpoint=endpoint, insecure=True)))
    logger = logger_provider.get_logger("e2e")
    logger.emit(body="scored", attributes={"traceparent": f"00-{TRACE}-{SPAN}-01"})
    logger.emit(body=json.dumps({"msg": "done", "trace_id": TRACE, "span_id": SPAN}))
    logger_provider.shutdown()

    traces = _wait_for(lambda: _read_records(Path(f"{out}-traces.bin"), ExportTraceServiceRequest),
                       "spans", agent)

    def logs() -> list[Any]:
        return _read_records(Path(f"{out}-logs.bin"), ExportLogsServiceRequest)

    def log_records() -> list[Any]:
        return [r for req in logs() for rl in req.resource_logs for sl in rl.scope_logs
                for r in sl.log_records]

    _wait_for(lambda: len(log_records()) >= 2, "both log records", agent)
    res = attributes_to_dict(traces[0].resource_spans[0].resource.attributes)
    assert res["ml.model.version"] == "v3"
    assert res["host.name"] == host_identity()["host.name"]
    assert 0.0 <= res["host.cpu.utilization"] <= 1.0
    assert 0.0 < res["host.memory.utilization"] < 1.0
    span_out = traces[0].resource_spans[0].scope_spans[0].spans[0]
    assert attributes_to_dict(span_out.attributes) == {"user": "****"}
    assert [(r.trace_id.hex(), r.span_id.hex()) for r in log_records()] == [(TRACE, SPAN)] * 2
    assert attributes_to_dict(logs()[0].resource_logs[0].resource.attributes)[
        "ml.model.version"] == "v3"

    # enrich told the host receiver about our pid: it now samples this process
    def our_process() -> bool:
        for req in _read_records(metrics_file, ExportMetricsServiceRequest):
            for rm in req.resource_metrics:
                attrs = attributes_to_dict(rm.resource.attributes)
                if attrs.get("process.pid") == os.getpid():
                    return attrs.get("service.name") == "ranker"
        return False

    _wait_for(our_process, "metrics of the sending process", agent)
    assert agent.stop() == 0


async def test_encoded_output_matches_the_enriched_request(tmp_path) -> None:
    """Enrich splices changed resources into the received bytes; what an exporter
    sends must decode to exactly the enriched request."""
    from agent.component import Kind, Signal
    from agent.config import decode_dataclass
    from agent.pdata import TraceBatch
    from agent.processors.enrich import factory
    from agent.testing import Sink, make_host, settings_for, span, trace_batch

    errors: list[str] = []
    cfg = decode_dataclass(factory.config_class, {"model_versions": {"b": "v9"}}, "e", errors)
    sink = Sink()
    p = factory.create(settings_for("enrich", Kind.PROCESSOR), cfg, {Signal.TRACES: sink})
    await p.start(make_host(tmp_path))
    try:
        raw = trace_batch({"a": [span("x")], "b": [span("y", span_id=b"\x05" * 8)]},
                          resource={"host.name": "sender-set"}).to_bytes()
        await p.consume(TraceBatch.from_bytes(raw))
    finally:
        await p.shutdown()
    (out,) = sink.batches
    assert out.to_bytes() != raw
    assert TraceBatch.from_bytes(out.to_bytes()).request == out.request
