"""The ``elasticsearch`` exporter against the strict bulk API contract server
(``tests/es_contract.py``), which is itself proven with the official client."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from elasticsearch import Elasticsearch, helpers
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from agent.component import Kind
from agent.config import decode_dataclass
from agent.exporters.elasticsearch import ElasticsearchConfig, TLSConfig, factory
from agent.exporters.elasticsearch.config import is_data_stream_part
from agent.exporters.elasticsearch.deadletter import DeadLetterFile
from agent.exporters.elasticsearch.ecs import sanitise_part
from agent.pdata import Batch
from agent.queue import QueueConfig, RetryConfig
from agent.telemetry import Telemetry
from agent.testing import log_batch, log_record, make_host, settings_for, span, trace_batch
from tests.conftest import free_port
from tests.es_contract import ElasticsearchContract
from tests.exporters.test_otlp_exporter import self_signed_certificate

FAST_RETRY = RetryConfig(initial_interval=0.01, max_interval=0.05, randomization_factor=0)
LOGS = "logs-mlagent-default"
TRACES = "traces-mlagent-default"


@pytest.fixture
async def es():
    server = ElasticsearchContract()
    await server.start()
    yield server
    await server.stop()


def config(es: ElasticsearchContract, **kw: Any) -> ElasticsearchConfig:
    kw.setdefault("retry_on_failure", FAST_RETRY)
    kw.setdefault("sending_queue", QueueConfig(consumers=1))
    return ElasticsearchConfig(endpoint=es.url, **kw)


async def started(tmp_path: Path, cfg: ElasticsearchConfig, tel: Telemetry):
    exp = factory.create(settings_for("elasticsearch", Kind.EXPORTER, tel), cfg, {})
    await exp.start(make_host(tmp_path))
    return exp


async def export(tmp_path: Path, cfg: ElasticsearchConfig, batches: list[Batch],
                 tel: Telemetry | None = None) -> dict[str, float]:
    """Hand ``batches`` to a fresh exporter, drain it, and return its self-metrics."""
    tel = tel or Telemetry()
    exp = await started(tmp_path, cfg, tel)
    for b in batches:
        await exp.consume(b)
    await exp.shutdown()
    return tel.snapshot("elasticsearch")


def logs(*bodies: str, **kw: Any) -> Batch:
    return log_batch([log_record(b, time=1_000_000_000 + i, **kw) for i, b in enumerate(bodies)],
                     resource={"service.name": "svc"})


# --------------------------------------------------------------------------- the contract


def official_client_session(url: str) -> dict[str, Any]:
    """What the official v8 client sees (it refuses servers without the product header)."""
    es = Elasticsearch(url, request_timeout=5)
    try:
        out: dict[str, Any] = {"info": es.info()["version"]["number"]}
        out["bulk"] = es.bulk(operations=[
            {"create": {"_index": "logs-app-default", "_id": "a"}},
            {"@timestamp": "2024-01-01T00:00:00Z", "message": "first"},
            {"create": {"_index": "logs-app-default", "_id": "a"}},
            {"@timestamp": "2024-01-01T00:00:00Z", "message": "again"},
            {"index": {"_index": "logs-app-default"}},
            {"@timestamp": "2024-01-01T00:00:00Z", "message": "index into a data stream"},
            {"create": {"_index": "logs-app-default", "_id": "b"}},
            {"message": "no timestamp"},
        ]).body
        out["helpers"] = helpers.bulk(es, [{"_index": "plain", "_id": str(i), "n": i}
                                           for i in range(3)])
        return out
    finally:
        es.close()


async def test_official_client_accepts_the_contract_server(es):
    seen = await asyncio.to_thread(official_client_session, es.url)
    assert seen["info"] == "8.15.0"
    statuses = [next(iter(item.values()))["status"] for item in seen["bulk"]["items"]]
    assert seen["bulk"]["errors"] is True
    assert statuses == [201, 409, 400, 400]
    assert seen["helpers"] == (3, [])
    assert [d["message"] for d in es.documents("logs-app-default")] == ["first"]
    assert sorted(d["n"] for d in es.documents("plain")) == [0, 1, 2]


async def test_contract_server_refuses_what_elasticsearch_refuses(es):
    line = b'{"create":{"_index":"logs-a-b","_id":"1"}}\n{"@timestamp":"2024-01-01T00:00:00Z"}'
    async with aiohttp.ClientSession() as s:
        async def post(body: bytes, ctype: str = "application/x-ndjson", path: str = "/_bulk"):
            async with s.post(es.url + path, data=body, headers={"Content-Type": ctype}) as r:
                return r.status, r.headers.get("X-Elastic-Product")

        assert await post(line + b"\n", "application/json") == (406, "Elasticsearch")
        assert await post(line) == (400, "Elasticsearch")  # no final newline
        assert await post(b'{"upsert":{}}\n{}\n') == (400, "Elasticsearch")
        assert await post(line + b"\n", path="/nothing/here") == (404, "Elasticsearch")
        assert await post(line + b"\n") == (200, "Elasticsearch")
        no_index = b'{"create":{"_id":"2"}}\n{"@timestamp":"2024-01-01T00:00:00Z"}\n'
        assert await post(no_index, path="/logs-a-b/_bulk") == (200, "Elasticsearch")
    assert len(es.documents("logs-a-b")) == 2


# --------------------------------------------------------------------------- documents


async def test_logs_and_spans_arrive_as_ecs_documents(tmp_path, es):
    resource = {"service.name": "ranker", "service.version": "1.2.0", "host.name": "gpu-01",
                "deployment.environment": "prod", "team": "ml"}
    lb = log_batch([log_record("scored", time=1_700_000_000_123_456_789, severity=17,
                               trace_id=bytes(range(16)), span_id=b"\xab" * 8,
                               attributes={"ml.prediction.score": 0.25,
                                           "request": {"id": "r1"}})], resource=resource)
    tb = trace_batch([span("predict", trace_id=bytes(range(16)), span_id=b"\xab" * 8,
                           parent_span_id=b"\xcd" * 8, start=1_000, end=5_000, status=2,
                           kind=2, attributes={"ml.model.name": "m"})], resource=resource)
    snap = await export(tmp_path, config(es), [lb, tb])
    assert snap["mlagent_agent_sent_items_total{signal=logs}"] == 1
    assert snap["mlagent_agent_sent_items_total{signal=traces}"] == 1

    (log,) = es.documents(LOGS)
    assert log["@timestamp"] == "2023-11-14T22:13:20.123456789Z"
    assert log["message"] == "scored"
    assert log["log"] == {"level": "error"}
    assert log["trace"] == {"id": bytes(range(16)).hex()}
    assert log["span"] == {"id": "ab" * 8}
    assert log["service"] == {"name": "ranker", "version": "1.2.0", "environment": "prod"}
    assert log["host"] == {"name": "gpu-01"}
    assert log["labels"] == {"team": "ml"}
    assert log["attributes"] == {"ml.prediction.score": 0.25, "request.id": "r1"}
    assert log["data_stream"] == {"type": "logs", "dataset": "mlagent", "namespace": "default"}

    (sp,) = es.documents(TRACES)
    assert sp["trace"]["id"] == bytes(range(16)).hex()
    assert sp["span"] == {"id": "ab" * 8, "name": "predict", "kind": "server",
                          "status": {"code": "error"}}
    assert sp["parent"] == {"id": "cd" * 8}
    assert sp["event"] == {"dataset": "mlagent", "duration": 4_000, "outcome": "failure"}
    assert sp["@timestamp"] == "1970-01-01T00:00:00.000001000Z"
    assert sp["attributes"] == {"ml.model.name": "m"}
    assert sp["service"]["name"] == "ranker"


async def test_data_stream_dataset_attribute_routes_the_document(tmp_path, es):
    batch = log_batch([log_record("a", attributes={"data_stream.dataset": "Model-Audit"}),
                       log_record("b")])
    await export(tmp_path, config(es, namespace="prod"), [batch])
    (routed,) = es.documents("logs-model_audit-prod")
    assert routed["message"] == "a"
    assert routed["data_stream"]["dataset"] == "model_audit"
    assert "attributes" not in routed  # the routing key lives in data_stream.*
    assert [d["message"] for d in es.documents("logs-mlagent-prod")] == ["b"]


async def test_structured_bodies_and_bytes_values_become_json_text(tmp_path, es):
    batch = log_batch([log_record({"event": "drift", "psi": 0.3},
                                  attributes={"blob": b"\x00\xff", "tags": ["a", "b"]})],
                      resource={"gpu.count": 2})
    await export(tmp_path, config(es), [batch])
    (doc,) = es.documents(LOGS)
    assert json.loads(doc["message"]) == {"event": "drift", "psi": 0.3}
    assert doc["attributes"] == {"blob": "AP8=", "tags": ["a", "b"]}
    assert doc["labels"] == {"gpu_count": "2"}


async def test_non_finite_numbers_are_stored_as_null_not_refused(tmp_path, es):
    """JSON has no NaN or infinity (Elasticsearch refuses a document holding one): the
    values go as null and the rest of the document is stored."""
    batch = trace_batch([span("predict", attributes={"ml.prediction.score": float("nan"),
                                                     "loss": float("inf"), "ok": 1.5})])
    await export(tmp_path, config(es), [batch])
    (doc,) = es.documents(TRACES)
    assert doc["attributes"] == {"ml.prediction.score": None, "loss": None, "ok": 1.5}


@given(st.text(max_size=300))
def test_any_routing_attribute_yields_a_valid_data_stream_part_or_none(value):
    """Valid, and short enough in UTF-8 bytes that any ``<type>-<dataset>-<namespace>``
    made of such parts has a backing index name Elasticsearch accepts (255 bytes)."""
    part = sanitise_part(value)
    if part is None:
        return
    assert is_data_stream_part(part)
    assert len(f".ds-traces-{part}-{part}-2024.01.01-000001".encode()) <= 255


async def test_a_long_non_ascii_routing_attribute_still_makes_a_stored_document(tmp_path, es):
    """Elasticsearch limits index names to 255 bytes, not characters: a routing
    attribute of 160 three-byte characters is cut to what fits instead of making a
    data stream name Elasticsearch refuses (invalid_index_name_exception)."""
    dataset = "模型审计" * 40
    namespace = "生产环境" * 40
    batch = log_batch([log_record("routed")],
                      resource={"data_stream.dataset": dataset, "data_stream.namespace": namespace})
    snap = await export(tmp_path, config(es), [batch])
    (doc,) = es.documents()
    assert doc["message"] == "routed"
    stream = doc["data_stream"]
    assert dataset.startswith(stream["dataset"]) and stream["dataset"]
    assert namespace.startswith(stream["namespace"]) and stream["namespace"]
    assert list(es.indices) == [f"logs-{stream['dataset']}-{stream['namespace']}"]
    assert snap["mlagent_agent_sent_items_total{signal=logs}"] == 1
    assert not any(k.startswith("mlagent_agent_dropped") for k in snap)


async def test_contract_server_refuses_index_names_over_255_bytes(es):
    """As Elasticsearch: the limit is in UTF-8 bytes, and a data stream's first backing
    index (``.ds-<name>-<yyyy.mm.dd>-000001``, 22 bytes longer) must fit as well."""
    async def item(index: str) -> dict[str, Any]:
        body = (json.dumps({"create": {"_index": index, "_id": "1"}}) + "\n"
                + '{"@timestamp":"2024-01-01T00:00:00Z"}\n').encode()
        async with aiohttp.ClientSession() as s, s.post(
                es.url + "/_bulk", data=body,
                headers={"Content-Type": "application/x-ndjson"}) as r:
            assert r.status == 200
            return next(iter((await r.json())["items"][0].values()))

    assert (await item("é" * 128))["status"] == 400  # 128 characters, 256 bytes
    assert (await item("é" * 127))["status"] == 201
    assert (await item("logs-" + "a" * 220 + "-default"))["status"] == 201  # backing: 255
    too_long = await item("logs-" + "a" * 221 + "-default")  # 234 bytes, backing 256
    assert too_long["status"] == 400
    assert too_long["error"]["type"] == "invalid_index_name_exception"
    assert "index name is too long, (256 > 255)" in too_long["error"]["reason"]


async def test_dead_letter_file_stops_at_its_size_limit(tmp_path):
    entry = {"index": LOGS, "id": "x", "status": 400, "error": {}, "document": {"m": "y" * 50}}
    probe = DeadLetterFile(tmp_path / "probe.jsonl", max_size=10**6)
    assert await probe.write([entry]) == 0
    line = (tmp_path / "probe.jsonl").stat().st_size
    dlq = DeadLetterFile(tmp_path / "dlq.jsonl", max_size=3 * line + line // 2)
    assert await dlq.write([entry] * 10) == 7  # 7 entries did not fit
    assert await dlq.write([entry]) == 1
    assert len((tmp_path / "dlq.jsonl").read_text().splitlines()) == 3


# --------------------------------------------------------------------------- failures


async def test_per_item_429_retries_only_those_items_until_stored(tmp_path, es):
    es.faults.item_429_attempts = 2
    es.faults.item_429_marker = "busy"
    snap = await export(tmp_path, config(es), [logs("ok1", "busy", "ok2")])
    assert sorted(d["message"] for d in es.documents(LOGS)) == ["busy", "ok1", "ok2"]
    assert es.bulk_sizes == [3, 1, 1]
    assert snap["mlagent_agent_sent_items_total{signal=logs}"] == 3
    assert not any(k.startswith("mlagent_agent_dropped") for k in snap)


@pytest.mark.parametrize("fault, status, error", [
    ("reject_marker", 400, "document_parsing_exception"),
    # An ingest pipeline's fail processor answers 500 on every attempt: refused like any
    # permanent item error, never retried forever (max_elapsed_time = 0 below).
    ("item_500_marker", 500, "fail_processor_exception"),
], ids=["400", "5xx"])
async def test_permanent_item_errors_are_dropped_counted_and_dead_lettered(
        tmp_path, es, fault, status, error):
    setattr(es.faults, fault, "poison")
    cfg = config(es, dead_letter_file=Path("dead/es.jsonl"),
                 retry_on_failure=RetryConfig(initial_interval=0.01, max_interval=0.05,
                                              randomization_factor=0, max_elapsed_time=0))
    snap = await export(tmp_path, cfg, [logs("fine", "poison pill", "also fine")])
    assert sorted(d["message"] for d in es.documents(LOGS)) == ["also fine", "fine"]
    assert es.bulk_requests == 1  # not retried
    assert snap["mlagent_agent_dropped_items_total{reason=permanent_error,signal=logs}"] == 1
    assert snap["mlagent_agent_sent_items_total{signal=logs}"] == 2
    assert snap[("mlagent_agent_elasticsearch_refused_documents_total"
                 f"{{reason={error},signal=logs}}")] == 1
    (line,) = (tmp_path / "dead" / "es.jsonl").read_text().splitlines()
    dead = json.loads(line)
    assert (dead["status"], dead["index"], dead["error"]["type"]) == (status, LOGS, error)
    assert dead["document"]["message"] == "poison pill"


async def test_per_item_429_is_still_retried_until_stored_without_a_deadline(tmp_path, es):
    """429 is the per-item answer that means "later": those items stay retried."""
    es.faults.item_429_attempts = 3
    cfg = config(es, retry_on_failure=RetryConfig(initial_interval=0.01, max_interval=0.05,
                                                  randomization_factor=0, max_elapsed_time=0))
    snap = await export(tmp_path, cfg, [logs("a", "b")])
    assert len(es.documents(LOGS)) == 2
    assert es.bulk_requests == 4
    assert snap["mlagent_agent_sent_items_total{signal=logs}"] == 2
    assert not any(k.startswith("mlagent_agent_dropped") for k in snap)


async def test_same_batch_twice_is_stored_once_without_errors(tmp_path, es):
    batches = [logs("a", "b"), trace_batch([span("s", span_id=b"\x01" * 8),
                                            span("t", span_id=b"\x02" * 8)])]
    again = [b.copy() for b in batches]
    snap = await export(tmp_path, config(es), batches + again)
    assert len(es.documents(LOGS)) == 2
    assert len(es.documents(TRACES)) == 2
    assert es.bulk_requests == 4
    assert snap["mlagent_agent_sent_items_total{signal=logs}"] == 4
    assert not any(k.startswith(("mlagent_agent_dropped", "mlagent_agent_send_failed"))
                   for k in snap)


async def test_413_splits_the_request_and_refuses_only_a_lone_oversized_document(tmp_path, es):
    bodies = [f"doc{i}" for i in range(8)]
    es.faults.max_body_bytes = 1500
    snap = await export(tmp_path, config(es, compression="none"),
                        [logs(*bodies, "x" * 4000, "tail")])
    assert sorted(d["message"] for d in es.documents(LOGS)) == sorted([*bodies, "tail"])
    assert len(es.bulk_sizes) > 1
    assert snap["mlagent_agent_dropped_items_total{reason=permanent_error,signal=logs}"] == 1
    assert snap[("mlagent_agent_elasticsearch_refused_documents_total"
                 "{reason=request_entity_too_large,signal=logs}")] == 1


async def test_refusals_before_a_retry_after_a_413_split_count_once(tmp_path, es):
    """The first half of a split request has a refused document, the second half meets
    a 503: the retry resends what is not settled yet, so the refused document is
    counted, dropped and dead-lettered once, and everything else is stored."""
    pad = "." * 1000  # each document ~1.3 KB: 4 are too large for one request, 2 fit
    es.faults.max_body_bytes = 3000
    es.faults.reject_marker = "poison"
    es.faults.fail_requests, es.faults.fail_requests_marker = 1, "down"
    cfg = config(es, compression="none", dead_letter_file=Path("dead/es.jsonl"))
    snap = await export(tmp_path, cfg, [logs("poison" + pad, "fine" + pad,
                                             "down one" + pad, "down two" + pad)])
    assert sorted(d["message"][:8] for d in es.documents(LOGS)) == ["down one", "down two",
                                                                    "fine...."]
    assert es.faults.fail_requests == 0  # the 503 did happen
    assert snap["mlagent_agent_retries_total{signal=logs}"] == 1
    assert snap[("mlagent_agent_elasticsearch_refused_documents_total"
                 "{reason=document_parsing_exception,signal=logs}")] == 1
    assert snap["mlagent_agent_dropped_items_total{reason=permanent_error,signal=logs}"] == 1
    assert snap["mlagent_agent_sent_items_total{signal=logs}"] == 3
    (line,) = (tmp_path / "dead" / "es.jsonl").read_text().splitlines()
    assert json.loads(line)["document"]["message"].startswith("poison")


async def test_bulk_max_bytes_cuts_a_batch_into_several_requests(tmp_path, es):
    await export(tmp_path, config(es, bulk_max_bytes=1024),
                 [logs(*[f"message {i:04d}" + "." * 100 for i in range(20)])])
    assert len(es.documents(LOGS)) == 20
    assert len(es.bulk_sizes) > 1
    assert sum(es.bulk_sizes) == 20


async def test_whole_request_503_is_retried(tmp_path, es):
    es.faults.fail_requests = 2
    snap = await export(tmp_path, config(es), [logs("a", "b")])
    assert len(es.documents(LOGS)) == 2
    assert snap["mlagent_agent_retries_total{signal=logs}"] == 2


async def test_an_outage_loses_nothing(tmp_path, es):
    tel = Telemetry()
    exp = await started(tmp_path, config(es), tel)
    await es.stop()
    await exp.consume(logs("during", "the", "outage"))
    await exp.consume(trace_batch([span("down")]))
    await send_failed(tel)
    await es.start()  # same port, same stored documents
    await exp.shutdown()
    assert sorted(d["message"] for d in es.documents(LOGS)) == ["during", "outage", "the"]
    assert [d["span"]["name"] for d in es.documents(TRACES)] == ["down"]
    assert not any(k.startswith("mlagent_agent_dropped") for k in tel.snapshot("elasticsearch"))


async def test_persistent_queue_keeps_an_outage_across_a_restart(tmp_path, es):
    """The default queue is persistent: a batch accepted during an outage and not yet
    delivered at shutdown is delivered by the next exporter on the same state dir."""
    cfg = ElasticsearchConfig(endpoint=es.url, retry_on_failure=FAST_RETRY)
    assert cfg.sending_queue.persistent
    tel = Telemetry()
    exp = await started(tmp_path, cfg, tel)
    await es.stop()
    await exp.consume(logs("kept", "on", "disk"))
    await send_failed(tel)
    await exp.shutdown()
    await es.start()
    assert es.documents(LOGS) == []

    exp = await started(tmp_path, cfg, Telemetry())
    await wait_until(lambda: len(es.documents(LOGS)) == 3)
    await exp.shutdown()
    assert sorted(d["message"] for d in es.documents(LOGS)) == ["disk", "kept", "on"]


async def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def send_failed(tel: Telemetry) -> None:
    """Wait until the exporter has failed a send attempt (so the outage was noticed)."""
    await wait_until(lambda: any(k.startswith("mlagent_agent_send_failed")
                                 for k in tel.snapshot("elasticsearch")))


# --------------------------------------------------------------------------- options


async def test_api_key_basic_auth_and_gzip_reach_the_server(tmp_path, es):
    await export(tmp_path, config(es, api_key="c2VjcmV0"), [logs("a")])
    assert es.last_headers["Authorization"] == "ApiKey c2VjcmV0"
    assert es.last_headers["Content-Encoding"] == "gzip"
    await export(tmp_path, config(es, user="elastic", password="pw", compression="none"),
                 [logs("b")])
    assert es.last_headers["Authorization"] == "Basic ZWxhc3RpYzpwdw=="
    assert "Content-Encoding" not in es.last_headers
    assert len(es.documents(LOGS)) == 2


async def test_https_with_ca_file(tmp_path):
    _, key_pem, ca_file = self_signed_certificate(tmp_path)
    (tmp_path / "key.pem").write_bytes(key_pem)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(ca_file, tmp_path / "key.pem")
    server = ElasticsearchContract()
    await server.start(server_ctx)
    try:
        await export(tmp_path, config(server, tls=TLSConfig(ca_file=ca_file)), [logs("tls")])
    finally:
        await server.stop()
    assert [d["message"] for d in server.documents(LOGS)] == ["tls"]


async def test_index_templates_are_created_at_start_when_asked(tmp_path, es):
    await export(tmp_path, config(es, create_index_templates=True, dataset="ranker"), [])
    assert es.templates["mlagent-logs-ranker"]["index_patterns"] == ["logs-ranker-*"]
    tpl = es.templates["mlagent-traces-ranker"]
    assert tpl["data_stream"] == {}
    assert tpl["template"]["mappings"]["properties"]["attributes"] == {"type": "flattened"}


async def test_shutdown_is_safe_without_start_and_twice(tmp_path, es):
    exp = factory.create(settings_for("elasticsearch", Kind.EXPORTER), config(es), {})
    await exp.shutdown()
    await exp.start(make_host(tmp_path))
    await exp.shutdown()
    await exp.shutdown()


def test_config_validation():
    errors: list[str] = []
    cfg = decode_dataclass(ElasticsearchConfig, {}, "exporters.elasticsearch", errors)
    assert errors == []
    assert (cfg.dataset, cfg.namespace, cfg.create_index_templates) == ("mlagent", "default",
                                                                        False)
    decode_dataclass(ElasticsearchConfig, {"endpoint": "localhost:9200", "dataset": "My-Logs",
                                           "api_key": "k", "user": "u"},
                     "exporters.elasticsearch", errors)
    assert errors[0] == ("exporters.elasticsearch.endpoint: 'localhost:9200' is not an http(s) "
                         "URL (e.g. \"http://localhost:9200\")")
    assert errors[1].startswith("exporters.elasticsearch.dataset: 'My-Logs' is not a valid")
    assert errors[2] == ("exporters.elasticsearch.api_key: set either api_key or "
                         "user/password, not both")
    # 40 characters, 120 bytes: with a namespace like it, too long for Elasticsearch.
    errors = []
    decode_dataclass(ElasticsearchConfig, {"dataset": "模型" * 20, "namespace": "生产" * 20},
                     "exporters.elasticsearch", errors)
    assert [e.split(":")[0] for e in errors] == ["exporters.elasticsearch.dataset",
                                                 "exporters.elasticsearch.namespace"]
    assert "at most 100 bytes" in errors[0]


# --------------------------------------------------------------------------- end to end

AGENT_TO_ES = """
[receivers.otlp]
grpc.endpoint = "127.0.0.1:{grpc}"
http.endpoint = "127.0.0.1:{http}"
[processors.batch]
timeout = "50ms"
[exporters.elasticsearch]
endpoint = "{es}"
user = "elastic"
password = "${{env:ES_PASSWORD}}"
retry_on_failure.initial_interval = "50ms"
[service]
state_dir = "{state}"
health.endpoint = "127.0.0.1:{health}"
[service.pipelines.traces]
receivers = ["otlp"]
processors = ["batch"]
exporters = ["elasticsearch"]
[service.pipelines.logs]
receivers = ["otlp"]
processors = ["batch"]
exporters = ["elasticsearch"]
"""


def run_sdk_app(http: int) -> dict[str, str]:
    """An OpenTelemetry SDK application: 10 spans, each with a log record inside.
    Returns span id (hex) -> trace id (hex)."""
    resource = Resource.create({"service.name": "ranker", "service.version": "2.0"})
    tp = TracerProvider(resource=resource)
    tp.add_span_processor(SimpleSpanProcessor(
        OTLPSpanExporter(endpoint=f"http://127.0.0.1:{http}/v1/traces")))
    lp = LoggerProvider(resource=resource)
    lp.add_log_record_processor(SimpleLogRecordProcessor(
        OTLPLogExporter(endpoint=f"http://127.0.0.1:{http}/v1/logs")))
    logger = logging.getLogger("es-e2e-app")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = LoggingHandler(logger_provider=lp)
    logger.addHandler(handler)
    made = {}
    try:
        tracer = tp.get_tracer("app")
        for i in range(10):
            with tracer.start_as_current_span("predict", attributes={"request.n": i}) as sp:
                logger.warning("scored %d", i)
                ctx = sp.get_span_context()
                made[f"{ctx.span_id:016x}"] = f"{ctx.trace_id:032x}"
    finally:
        logger.removeHandler(handler)
        tp.shutdown()
        lp.shutdown()
    return made


@pytest.mark.integration
async def test_sdk_to_agent_to_elasticsearch(tmp_path, es, start_agent):
    es.faults.item_429_attempts = 1  # every document is refused once, then stored
    grpc, http, health = free_port(), free_port(), free_port()
    agent = start_agent(AGENT_TO_ES.format(grpc=grpc, http=http, health=health, es=es.url,
                                           state=tmp_path / "state"),
                        env={"ES_PASSWORD": "s3cret"})
    await asyncio.to_thread(agent.wait_ready, f"127.0.0.1:{health}")
    made = await asyncio.to_thread(run_sdk_app, http)

    await wait_until(lambda: len(es.documents(TRACES)) == 10 and len(es.documents(LOGS)) == 10,
                     timeout=30)
    spans = {d["span"]["id"]: d for d in es.documents(TRACES)}
    assert {k: d["trace"]["id"] for k, d in spans.items()} == made
    assert all(d["span"]["name"] == "predict" and d["service"]["name"] == "ranker"
               for d in spans.values())
    assert sorted(d["attributes"]["request.n"] for d in spans.values()) == list(range(10))
    logs_by_span = {d["span"]["id"]: d for d in es.documents(LOGS)}
    assert {k: d["trace"]["id"] for k, d in logs_by_span.items()} == made
    assert {d["log"]["level"] for d in logs_by_span.values()} == {"WARN"}
    assert sorted(d["message"] for d in logs_by_span.values()) == sorted(
        f"scored {i}" for i in range(10))
    assert es.last_headers["Authorization"] == "Basic ZWxhc3RpYzpzM2NyZXQ="
    assert await asyncio.to_thread(agent.stop) == 0
