"""The ``file`` exporter writes whole OTLP requests, rotates by size, resolves paths."""

from __future__ import annotations

import struct
from pathlib import Path

from agent.component import Kind, Signal
from agent.config import decode_dataclass
from agent.exporters.file import FileConfig, RotationConfig, factory
from agent.otlpjson import decode_json
from agent.pdata import BATCH_TYPES, Batch
from agent.queue import QueueConfig, RetryConfig
from agent.telemetry import Telemetry
from agent.testing import (
    gauge,
    log_batch,
    log_record,
    make_host,
    metric_batch,
    settings_for,
    span,
    trace_batch,
)


def read_length_delimited(path: Path) -> list[bytes]:
    data, out, pos = path.read_bytes(), [], 0
    while pos < len(data):
        (n,) = struct.unpack_from(">I", data, pos)
        out.append(data[pos + 4:pos + 4 + n])
        pos += 4 + n
    assert pos == len(data), "torn record at the end of the file"
    return out


def exporter(config: FileConfig, telemetry: Telemetry | None = None):
    return factory.create(settings_for("file", Kind.EXPORTER, telemetry), config, {})


def sample_batches() -> list[Batch]:
    return [
        trace_batch([span("predict", trace_id=bytes(range(16)), span_id=b"\xab" * 8)],
                    resource={"service.name": "svc"}),
        metric_batch([gauge("gpu.util", [({"gpu": "0"}, 0.5)])]),
        log_batch([log_record("hello", trace_id=b"\x01" * 16, span_id=b"\x02" * 8)]),
    ]


async def test_proto_format_round_trips_every_signal_into_its_own_file(tmp_path):
    cfg = FileConfig(path=Path("out/{signal}.binpb"), format="proto")
    exp = exporter(cfg)
    await exp.start(make_host(tmp_path))
    batches = sample_batches()
    expected = [b.to_bytes() for b in batches]
    for b in batches:
        await exp.consume(b)
    await exp.shutdown()

    for b, want in zip(batches, expected, strict=True):
        path = tmp_path / "out" / f"{b.signal}.binpb"  # relative -> under the state dir
        records = read_length_delimited(path)
        assert records == [want]
        assert BATCH_TYPES[b.signal].from_bytes(records[0]).request == b.request


async def test_rotation_keeps_records_whole_and_max_backups(tmp_path):
    one = trace_batch([span("x" * 200)])
    size = len(one.to_bytes()) + 4
    cfg = FileConfig(path=tmp_path / "t.binpb", format="proto",
                     rotation=RotationConfig(max_size=size * 2, max_backups=2))
    exp = exporter(cfg)
    await exp.start(make_host(tmp_path / "state"))
    for i in range(7):
        await exp.consume(trace_batch([span(f"{i}" + "x" * 199)]))
    await exp.shutdown()

    names = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert names == ["t.binpb", "t.binpb.1", "t.binpb.2"]
    spans = {n: [BATCH_TYPES[Signal.TRACES].from_bytes(r).request.resource_spans[0]
                 .scope_spans[0].spans[0].name[0]
                 for r in read_length_delimited(tmp_path / n)] for n in names}
    # Two records per file; the current file holds the newest, .2 the oldest kept.
    assert spans == {"t.binpb": ["6"], "t.binpb.1": ["4", "5"], "t.binpb.2": ["2", "3"]}


async def test_rotation_without_backups_starts_the_file_over(tmp_path):
    cfg = FileConfig(path=tmp_path / "t.binpb", format="proto",
                     rotation=RotationConfig(max_size=10, max_backups=0))
    exp = exporter(cfg)
    await exp.start(make_host(tmp_path))
    for i in range(3):
        await exp.consume(trace_batch([span(f"s{i}")]))
    await exp.shutdown()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["t.binpb"]
    only = read_length_delimited(tmp_path / "t.binpb")
    assert len(only) == 1
    assert b"s2" in only[0]


async def test_appends_to_an_existing_file_across_restarts(tmp_path):
    cfg = FileConfig(path=Path("t.binpb"), format="proto")
    for name in ("first", "second"):
        exp = exporter(cfg)
        await exp.start(make_host(tmp_path))
        await exp.consume(trace_batch([span(name)]))
        await exp.shutdown()
    assert len(read_length_delimited(tmp_path / "t.binpb")) == 2


async def test_json_lines_decode_back_to_the_same_requests(tmp_path):
    exp = exporter(FileConfig(path=Path("otlp.jsonl")))
    await exp.start(make_host(tmp_path))
    batches = sample_batches()
    for b in batches:
        await exp.consume(b.copy())
    await exp.shutdown()

    lines = (tmp_path / "otlp.jsonl").read_bytes().splitlines()
    assert len(lines) == len(batches)
    for b, line in zip(batches, lines, strict=True):
        assert decode_json(b.signal, line) == b.request
    # Ids are hex in OTLP/JSON, not base64.
    assert bytes(range(16)).hex().encode() in lines[0]


async def test_unwritable_path_is_counted_and_does_not_raise(tmp_path):
    (tmp_path / "blocker").write_text("a file where a directory should be")
    tel = Telemetry()
    cfg = FileConfig(path=tmp_path / "blocker" / "t.binpb", format="proto",
                     sending_queue=QueueConfig(consumers=1),
                     retry_on_failure=RetryConfig(enabled=False))
    exp = exporter(cfg, tel)
    await exp.start(make_host(tmp_path))
    await exp.consume(trace_batch([span()]))
    await exp.shutdown()
    snap = tel.snapshot("file")
    assert snap["mlagent_agent_dropped_items_total{reason=retries_exhausted,signal=traces}"] == 1
    assert "mlagent_agent_sent_items_total{signal=traces}" not in snap


async def test_shutdown_is_safe_without_start_and_twice(tmp_path):
    exp = exporter(FileConfig())
    await exp.shutdown()
    await exp.start(make_host(tmp_path))
    await exp.shutdown()
    await exp.shutdown()


def test_config_defaults_and_errors():
    errors: list[str] = []
    cfg = decode_dataclass(FileConfig, {"format": "proto", "rotation": {"max_size": "1KiB"}},
                           "exporters.file", errors)
    assert errors == []
    assert cfg.rotation.max_size == 1024
    assert cfg.rotation.max_backups == 5
    assert str(cfg.path) == "otlp.jsonl"

    errors = []
    decode_dataclass(FileConfig, {"format": "yaml", "rotation": {"max_backups": -1, "max_sise": 1}},
                     "exporters.file", errors)
    assert any(e.startswith("exporters.file.format: 'yaml' is not one of") for e in errors)
    assert "exporters.file.rotation.max_sise: unknown key (did you mean 'max_size'?)" in errors

    errors = []
    decode_dataclass(FileConfig, {"rotation": {"max_backups": -1}}, "exporters.file", errors)
    assert errors == ["exporters.file.rotation.max_backups: must be >= 0"]
