"""The redact processor: blocked keys, secret-looking values, nested maps, counting."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from agent.component import Signal
from agent.config import decode_dataclass
from agent.pdata import attributes_to_dict, python_to_anyvalue
from agent.processors.redact import RedactConfig, factory
from agent.processors.redact.processor import luhn_ok
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

VISA = "4111 1111 1111 1111"  # the classic test number: passes Luhn


async def run(tmp_path, batch: Any, telemetry: Telemetry | None = None, **cfg: Any) -> Sink:
    sink = Sink()
    p = factory.create(settings_for("redact", telemetry=telemetry), RedactConfig(**cfg),
                       {batch.signal: sink})
    await p.start(make_host(tmp_path))
    await p.consume(batch)
    await p.shutdown()
    return sink


def first_span_attrs(sink: Sink) -> dict[str, Any]:
    return attributes_to_dict(sink.spans()[0].attributes)


async def test_default_blocked_keys_are_dropped_and_the_rest_kept(tmp_path):
    attrs = {
        "http.request.header.authorization": "Basic dXNlcjpwYXNz",
        "db.password": "hunter2",
        "API_KEY": "sk-123",
        "access_token": "abc",
        "http.request.header.x-auth-token": "abc",
        "aws.secret_access_key": "x",
        "http.request.header.cookie": "session=1",
        "gen_ai.usage.input_tokens": 120,
        "http.route": "/v1/predict",
        "ml.prediction.score": 0.9,
    }
    sink = await run(tmp_path, trace_batch([span(attributes=attrs)]))
    assert first_span_attrs(sink) == {"gen_ai.usage.input_tokens": 120,
                                      "http.route": "/v1/predict", "ml.prediction.score": 0.9}


@pytest.mark.parametrize(("action", "expected"), [
    ("mask", "****"),
    ("hash", hashlib.sha256(b"pepper" + b"hunter2").hexdigest()[:16]),
])
async def test_blocked_key_mask_or_salted_hash(tmp_path, action, expected):
    sink = await run(tmp_path, trace_batch([span(attributes={"db.password": "hunter2"})]),
                     key_action=action, salt="pepper")
    assert first_span_attrs(sink) == {"db.password": expected}


async def test_value_patterns_inside_strings(tmp_path):
    attrs = {
        "http.request.header.x-forwarded": "Bearer eyJhbGciOiJIUzI1NiJ9.e30.abc",
        "db.connection_string": "postgresql://svc:s3cr3t@db:5432/app",
        "user": "contact alice.smith@example.com today",
        "note": f"paid with {VISA} ok",
        "order.id": "1234 5678 9012 3456",  # 16 digits, fails Luhn: not a card
        "msg": "the bearer of bad news",
    }
    telemetry = Telemetry()
    sink = await run(tmp_path, trace_batch([span(attributes=attrs)]), telemetry=telemetry)
    got = first_span_attrs(sink)
    assert got["http.request.header.x-forwarded"] == "Bearer ****"
    assert got["db.connection_string"] == "postgresql://svc:****@db:5432/app"
    assert got["user"] == "contact **** today"
    assert got["note"] == "paid with **** ok"
    assert got["order.id"] == "1234 5678 9012 3456"
    assert got["msg"] == "the bearer of bad news"
    snap = telemetry.snapshot("redact")
    assert {k: v for k, v in snap.items() if k.startswith("mlagent_redact")} == {
        "mlagent_redact_redactions_total{reason=bearer}": 1,
        "mlagent_redact_redactions_total{reason=url_password}": 1,
        "mlagent_redact_redactions_total{reason=email}": 1,
        "mlagent_redact_redactions_total{reason=card}": 1,
    }


async def test_hash_action_for_values_keeps_the_rest_of_the_string(tmp_path):
    sink = await run(tmp_path, trace_batch([span(attributes={"u": "mail bob@example.org"})]),
                     value_action="hash", hash_length=8)
    digest = hashlib.sha256(b"bob@example.org").hexdigest()[:8]
    assert first_span_attrs(sink) == {"u": f"mail {digest}"}


async def test_nested_maps_and_arrays(tmp_path):
    body = {
        "user": {"name": "alice", "password": "x", "emails": ["a@example.com", "public"]},
        "headers": [{"authorization": "Bearer abcdefghijkl"}, {"accept": "json"}],
        "text": "ok",
    }
    sink = await run(tmp_path, log_batch([log_record(body, attributes={"ctx": body})]))
    rec = sink.log_records()[0]
    expected = {
        "user": {"name": "alice", "emails": ["****", "public"]},
        "headers": [{}, {"accept": "json"}],
        "text": "ok",
    }
    assert attributes_to_dict(rec.attributes)["ctx"] == expected
    assert attributes_to_dict(rec.body.kvlist_value.values) == expected


async def test_string_log_bodies_and_resource_attributes(tmp_path):
    b = log_batch([log_record("login from carol@example.net with token Bearer 0123456789abc")],
                  resource={"service.name": "svc", "deploy.api-key": "k"})
    sink = await run(tmp_path, b)
    assert sink.log_records()[0].body.string_value == "login from **** with token Bearer ****"
    assert attributes_to_dict(sink.batches[0].request.resource_logs[0].resource.attributes) == {
        "service.name": "svc"}


async def test_allowed_keys_win_over_blocked_and_values(tmp_path):
    attrs = {"auth.token": "t", "contact.email": "x@example.com", "other.email": "x@example.com"}
    sink = await run(tmp_path, trace_batch([span(attributes=attrs)]),
                     allowed_keys=[r"^auth\.token$", r"^contact\."])
    assert first_span_attrs(sink) == {"auth.token": "t", "contact.email": "x@example.com",
                                      "other.email": "****"}


async def test_span_events_links_and_metric_points(tmp_path):
    s = span(attributes={})
    ev = s.events.add(name="exception")
    python_to_anyvalue("failed for dan@example.com", ev.attributes.add(key="exception.message").value)
    link = s.links.add(trace_id=b"\x01" * 16, span_id=b"\x02" * 8)
    python_to_anyvalue("x", link.attributes.add(key="session_token").value)
    sink = await run(tmp_path, trace_batch([s]))
    out: Span = sink.spans()[0]
    assert attributes_to_dict(out.events[0].attributes) == {"exception.message": "failed for ****"}
    assert len(out.links[0].attributes) == 0
    msink = await run(tmp_path, metric_batch([gauge("g", [({"user": "e@example.com",
                                                           "password": "p"}, 1.0)])]))
    dp = msink.metrics()[0].gauge.data_points[0]
    assert attributes_to_dict(dp.attributes) == {"user": "****"}


async def test_too_deep_values_are_masked_whole(tmp_path):
    deep: Any = "leaf"
    for _ in range(5):
        deep = {"k": deep}
    sink = await run(tmp_path, trace_batch([span(attributes={"d": deep})]), max_depth=3)
    assert first_span_attrs(sink) == {"d": {"k": {"k": {"k": "****"}}}}


async def test_custom_patterns_and_builtins_switched_off(tmp_path):
    sink = await run(tmp_path, trace_batch([span(attributes={
        "m": "ssn 123-45-6789, mail e@example.com"})]),
        value_patterns=[], custom_value_patterns=[r"\b\d{3}-\d{2}-\d{4}\b"])
    assert first_span_attrs(sink) == {"m": "ssn ****, mail e@example.com"}


async def test_values_never_logged(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    await run(tmp_path, trace_batch([span(attributes={"db.password": "hunter2",
                                                      "u": "zed@example.com"})]))
    assert "hunter2" not in caplog.text and "zed@example.com" not in caplog.text


def test_luhn():
    assert luhn_ok("4111111111111111") and luhn_ok("378282246310005")
    assert not luhn_ok("4111111111111112") and not luhn_ok("123456789012")


def test_config_validation():
    errors: list[str] = []
    decode_dataclass(RedactConfig, {"blocked_keys": ["("], "hash_length": 100,
                                    "value_patterns": ["emails"]}, "processors.redact", errors)
    assert [e.split(":")[0] for e in errors] == ["processors.redact.value_patterns[0]"]
    assert "did you mean 'email'" in errors[0]
    errors = []
    decode_dataclass(RedactConfig, {"blocked_keys": ["("], "hash_length": 100},
                     "processors.redact", errors)
    assert [e.split(":")[0] for e in errors] == ["processors.redact.blocked_keys[0]",
                                                 "processors.redact.hash_length"]
    assert Signal.LOGS in factory.signals
